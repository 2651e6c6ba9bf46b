"""The one PostgreSQL module: connections and the one translation of psycopg errors.

:func:`connect` opens every connection the product makes, so every DSN's password is registered
for masking (:func:`cutover.errors.register_dsn`) before libpq can echo a piece of it in a parse
error. :func:`translate` turns a ``psycopg.Error`` into :class:`~cutover.errors.DatabaseError`
with the side (source/target) and the SQLSTATE, worded one way everywhere::

    <side> database: <doing>: <what PostgreSQL said> (SQLSTATE <code>)
"""

from __future__ import annotations

from typing import Any

import psycopg

from cutover.errors import DatabaseError, register_dsn

Conn = psycopg.Connection[Any]


def translate(exc: psycopg.Error, doing: str, side: str) -> DatabaseError:
    """The one translation of a psycopg error: side, what we were doing, the SQLSTATE.

    The message passes through :func:`cutover.errors.redact_dsn` (in DatabaseError), so a DSN or
    a registered password in the server's or libpq's text is masked.
    """
    # The primary message only: DETAIL and the statement's LINE may quote row values.
    diag = exc.diag
    detail = (diag.message_primary or str(exc)).strip() or type(exc).__name__
    if diag.constraint_name:
        detail = f"{detail} (constraint {diag.constraint_name})"
    return DatabaseError(f"{doing}: {detail}", side=side, sqlstate=exc.sqlstate)


def connect(
    dsn: str,
    *,
    side: str,
    application_name: str,
    autocommit: bool = True,
    doing: str = "connecting",
    **kwargs: Any,
) -> Conn:
    """A psycopg connection; DatabaseError (password masked) when it cannot be opened."""
    register_dsn(dsn)
    try:
        return psycopg.connect(
            dsn, autocommit=autocommit, application_name=application_name, **kwargs
        )
    except psycopg.Error as exc:
        error = translate(exc, doing, side)
        if "SSL error" in error.message or "certificate" in error.message:
            # libpq's own words ("invalid padding", "unable to get local issuer") rarely say
            # what to check.
            error = DatabaseError(
                f"{error.message}; TLS: the server's certificate must be signed by the CA in "
                "sslrootcert and, with sslmode=verify-full, name the host the DSN connects to",
                side=side,
                sqlstate=error.sqlstate,
            )
        raise error from None


def superuser_warning(conn: Conn, component: str) -> str | None:
    """A warning with the fix when ``conn``'s role is a superuser (None when it is not).

    Not a refusal: a sandbox may run as one. In production each component runs as its own
    least-privilege role (``cutover init --print-grants``), so a bug or a wrong mapping cannot
    read a social column or write a table outside its part.
    """
    row = conn.execute(
        "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if row is None or not row[1]:
        return None
    return (
        f"{component} connects as {row[0]}, a superuser: it could read excluded columns and "
        "write any table; run it as its own least-privilege role (cutover init --print-grants "
        "prints the roles and grants; [roles] names them)"
    )
