"""``cutover console``: the web console (docs/CONSOLE.md), and ``cutover console hash-password``.

The console serves the overview, the actions, the audit trail and the dead letters on
``--host``/``--port`` (uvicorn). Users and roles come from ``[console]`` in the config; the
session secret from ``CUTOVER_CONSOLE_SECRET`` or ``[console] session_secret_file``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from consumers.dlq import list_dead_letters, retry_dead_letters
from cutover.config import Settings
from cutover.errors import ConfigError, UsageError, register_secret
from cutover.mapping import load_mapping

if TYPE_CHECKING:
    from cli.main import Context

EPILOG = """\
examples:
  cutover console hash-password < password.txt
  CUTOVER_CONSOLE_SECRET=$(openssl rand -hex 32) cutover console --port 8080

exit codes: 0 stopped cleanly, 2 no users / no session secret / bad flags, 3 the server failed."""

#: A secret shorter than this is refused: it signs every session cookie.
MIN_SECRET_CHARS = 32


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "console",
        help="serve the web console (overview, actions, audit, dead letters) behind a login",
        description=(__doc__ or "").replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument(
        "--secure-cookies",
        action="store_true",
        help="mark the session cookie Secure (served over TLS, e.g. behind a reverse proxy)",
    )
    parser.set_defaults(handler=run)
    actions = parser.add_subparsers(dest="console_action", metavar="ACTION")
    hasher = actions.add_parser(
        "hash-password",
        help="print the password hash for [console.users.NAME] (password read from stdin)",
    )
    hasher.set_defaults(handler=run_hash)


def run_hash(_args: argparse.Namespace, _context: Context) -> int:
    from console.auth import hash_password

    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("no password on stdin: `cutover console hash-password < FILE`")
    print(hash_password(password))
    return 0


def session_secret(settings: Settings) -> str:
    """The secret from the environment, else the file; refused if missing or short."""
    console = settings.console
    secret = console.session_secret
    if secret is None and console.session_secret_file is not None:
        try:
            secret = console.session_secret_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"[console] session_secret_file {console.session_secret_file}: {exc.strerror}"
            ) from None
    if not secret or len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"the console needs a session secret of at least {MIN_SECRET_CHARS} characters: "
            "set CUTOVER_CONSOLE_SECRET or [console] session_secret_file"
        )
    register_secret(secret)
    return secret


def run(args: argparse.Namespace, context: Context) -> int:
    import uvicorn

    from console.app import create_app
    from console.web import Env

    settings = context.settings
    if not settings.console.users:
        raise ConfigError("no console users: add [console.users.NAME] to the config")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, not {args.port}")
    secret = session_secret(settings)
    env = Env(
        settings,
        load_mapping(settings.mapping_path).domains,
        list_letters=list_dead_letters,
        retry_letters=retry_dead_letters,
    )
    app = create_app(env, secret, https_only=args.secure_cookies)
    print(f"cutover console on http://{args.host}:{args.port}/", flush=True)
    # Our own logging is configured (cutover.logging); uvicorn keeps its access log off.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
    return 0
