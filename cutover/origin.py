"""Replication origins: how the appliers mark the transactions they write.

A session with a replication origin set up (``pg_replication_origin_session_setup``) commits
transactions that carry the origin's id; pgoutput announces them with an Origin message, so the
producer of the other direction can drop them (no echo), and the write fence
(:mod:`cutover.fence`) lets them through (the appliers are the one writer a fenced side admits).

An origin can be active in one session at a time, so each applier session (apply consumers,
dead-letter retry, replay) takes the first free origin of one small pool, ``cutover_apply_<n>``.
The pool is fixed and small because every origin that was ever set up holds one of the server's
``max_replication_slots`` origin states until it is dropped: one origin per group or process
would exhaust them (PostgreSQL then refuses with SQLSTATE 53400).
"""

from __future__ import annotations

from typing import Any

import psycopg

from cutover import pg
from cutover.errors import DatabaseError

Conn = psycopg.Connection[Any]

#: Every origin this tool sets up starts with this; producers drop transactions that carry one.
ORIGIN_PREFIX = "cutover_"
#: Applier sessions of one database cluster that can write at the same time (each needs one of
#: the cluster's ``max_replication_slots`` origin states, PostgreSQL's default being 10).
POOL_SIZE = 8
#: The pool, in the order sessions try it.
ORIGIN_NAMES: tuple[str, ...] = tuple(f"{ORIGIN_PREFIX}apply_{n}" for n in range(POOL_SIZE))
# SQLSTATE (object_in_use) of "replication origin with ID n is already active for PID m".
_IN_USE = "55006"


def is_ours(origin_name: str | None) -> bool:
    """Whether a transaction's origin (pgoutput's Origin message) was set up by this tool."""
    return origin_name is not None and origin_name.startswith(ORIGIN_PREFIX)


def setup_session(conn: Conn, *, side: str) -> str:
    """Set up a free replication origin of the pool in ``conn``'s session; return its name.

    ``conn`` must be idle. Raises DatabaseError when the role may not use replication origins
    (superuser, or EXECUTE granted on the ``pg_replication_origin_*`` functions), when the
    server has no origin state left, or when every origin of the pool is busy.
    """
    if conn.execute("SELECT pg_replication_origin_session_is_setup()").fetchone() == (True,):
        raise DatabaseError("a replication origin is already set up in this session", side=side)
    for name in ORIGIN_NAMES:
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_replication_origin_create(%s) "
                    "WHERE pg_replication_origin_oid(%s) IS NULL",
                    (name, name),
                )
            conn.execute("SELECT pg_replication_origin_session_setup(%s)", (name,))
        except psycopg.errors.UniqueViolation:
            continue  # another session created it at the same moment: try it next round
        except psycopg.Error as exc:
            if exc.sqlstate == _IN_USE:
                continue
            raise pg.translate(
                exc,
                f"setting up replication origin {name} (the applier's role needs superuser or "
                "EXECUTE on pg_replication_origin_create / pg_replication_origin_session_setup; "
                f"the server needs max_replication_slots >= {POOL_SIZE} plus its slots)",
                side,
            ) from None
        return name
    raise DatabaseError(
        f"all {POOL_SIZE} replication origins {ORIGIN_PREFIX}apply_* are in use: run fewer "
        "appliers against this database, or look in pg_stat_activity for sessions that did "
        "not end",
        side=side,
    )
