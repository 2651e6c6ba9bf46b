"""The components' own identities on the secured local stack (``make up SECURE=1``), for a run
such as ``make demo``: least-privilege PostgreSQL roles and Kafka ACLs for the run's topics.

``python -m devtools.stack_roles acls|apply-grants [--dir .stack] [--config FILE]`` (the config
and the DSNs come from the environment, ``CUTOVER_CONFIG`` and the stack's ``CUTOVER_*``):

* ``acls``: the Kafka ACLs of the component users (:func:`devtools.kafka_security.grant`) for
  the run's topic prefix (``[kafka] topic_prefix``; the stack grants only ``shop`` at start).
  Before ``cutover init``, which creates the topics as the operator;
* ``apply-grants``: after ``cutover init`` (and again after ``init --reverse``: the grants are
  on what those create, and re-running them changes nothing) it runs ``cutover init
  --print-grants`` and applies each part to its database as the stack's administrator, then
  sets each login role's password: generated once per stack, kept in ``<stack>/secrets/pgpass``
  (libpq's password file, 0600, never printed). It writes ``<stack>/roles.env``: a DSN per
  component (``CUTOVER_ROLE_<PART>_SOURCE_DSN`` / ``..._TARGET_DSN``) naming its role and the
  password file (``passfile=``), so no password is in a DSN, a process list or a log.

A plaintext stack has neither: the demo calls this module only on a secured one.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cutover import grants
from cutover.config import Settings, load_settings
from cutover.errors import CutoverError, StackError
from devtools import kafka_security

REPO = Path(__file__).resolve().parents[1]
#: The login roles of ``[roles]``, as the parts of the demo that run as each.
PARTS: Final = ("producer", "applier", "reverse_applier", "sre")


def passfile(root: Path) -> Path:
    return root / "secrets" / "pgpass"


def role_names(settings: Settings) -> dict[str, str]:
    """{part: role name} of the login roles."""
    return {part: str(getattr(settings.roles, part)) for part in PARTS}


def _passwords(root: Path, roles: Sequence[str]) -> dict[str, str]:
    """Each role's password from the stack's password file; a new one for a role without."""
    known: dict[str, str] = {}
    path = passfile(root)
    if path.exists():
        for line in path.read_text().splitlines():
            *_, user, password = line.split(":")
            known[user] = password
    # URL-safe: no ":" or "\\", which the password file would need escaped.
    return {r: known.get(r) or secrets.token_urlsafe(18) for r in roles}


def _write_passfile(root: Path, passwords: Mapping[str, str]) -> None:
    # Any host, port and database of the stack: the roles exist in both clusters.
    lines = "".join(f"*:*:*:{user}:{pw}\n" for user, pw in sorted(passwords.items()))
    kafka_security._write_private(passfile(root), lines)


def role_dsn(dsn: str, user: str, password_file: Path) -> str:
    """``dsn`` (the administrator's) naming ``user``, its password read from ``password_file``."""
    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    params.update(user=user, passfile=str(password_file))
    return make_conninfo(**params)  # type: ignore[arg-type]


def print_grants(config: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """What ``cutover init --print-grants`` prints, as {database part: script}."""
    done = subprocess.run(
        [sys.executable, "-m", "cli.entry", "--config", str(config), "init", "--print-grants"],
        env={**environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise StackError(f"cutover init --print-grants failed: {done.stderr.strip()[-2000:]}")
    return grants.split(done.stdout)


def apply_grants(root: Path, config: Path, environ: Mapping[str, str]) -> Path:
    """Apply the printed grants as the administrator, set the passwords, write ``roles.env``."""
    settings = load_settings(config, environ)
    names = role_names(settings)
    parts = print_grants(config, environ)
    passwords = _passwords(root, list(names.values()))
    _write_passfile(root, passwords)
    for dsn, part in ((settings.source.dsn, "legacy"), (settings.target.dsn, "commerce")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(parts[part].encode())
            for role, password in passwords.items():
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(password)
                    )
                )
    env_path = root / "roles.env"
    lines = []
    for part, role in names.items():
        for side, dsn in (("SOURCE", settings.source.dsn), ("TARGET", settings.target.dsn)):
            value = role_dsn(dsn, role, passfile(root))
            lines.append(f"CUTOVER_ROLE_{part.upper()}_{side}_DSN={shlex.quote(value)}\n")
    kafka_security._write_private(env_path, "".join(lines))
    return env_path


def acls(root: Path, config: Path, environ: Mapping[str, str]) -> int:
    """The component users' Kafka ACLs for the run's topic prefix; how many."""
    settings = load_settings(config, environ)
    return kafka_security.grant(root, settings.kafka.bootstrap, settings.kafka.topic_prefix)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stack_roles",
        description="The secured stack's component identities for a run: Kafka ACLs for its "
        "topic prefix (acls), least-privilege PostgreSQL roles from `cutover init "
        "--print-grants` (apply-grants).",
    )
    parser.add_argument("action", choices=["acls", "apply-grants"])
    parser.add_argument("--dir", type=Path, default=REPO / ".stack", help="stack folder")
    parser.add_argument("--config", type=Path, default=os.environ.get("CUTOVER_CONFIG"))
    args = parser.parse_args(argv)
    if args.config is None:
        parser.error("--config or CUTOVER_CONFIG is required")
    root: Path = args.dir.resolve()
    try:
        if args.action == "acls":
            count = acls(root, args.config, os.environ)
            print(f"[stack] {count} Kafka ACLs for the run's topics", file=sys.stderr)
        else:
            path = apply_grants(root, args.config, os.environ)
            print(f"[stack] grants applied; the components' DSNs in {path}", file=sys.stderr)
    except CutoverError as exc:
        print(f"stack_roles {args.action}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
