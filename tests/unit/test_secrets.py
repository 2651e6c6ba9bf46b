"""DSN passwords never reach a message or a log line, even when libpq cannot parse the DSN.

A password holding ``%``, a space or ``@`` breaks the DSN's syntax, and libpq/psycopg then echo
the token they choke on (``invalid percent-encoded token: "SEK%RIT5"``, ``failed to resolve host
'RIT6@127.0.0.1'``). No service is needed: parse errors happen before any connection, and the
rest connect to a closed loopback port.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from cutover import pg
from cutover.config import load_settings
from cutover.errors import DatabaseError, dsn_passwords, redact_dsn
from cutover.logging import _mask_secrets

PASSWORDS = (
    "SEK%RIT5",
    "SEK@RIT6",
    "SEK RIT7",
    "SEK:/?#RIT8",
    "SEK'RI\"T@9%zz",
    "S%E@K R:I/T?1#0&x=y",
)
FRAGMENT = re.compile(r"[\s@%:/?#&'\"=\\]+")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = _closed_port()


def _url(password: str) -> str:
    return f"postgresql://me:{password}@127.0.0.1:{PORT}/db?connect_timeout=2"


def _keyword(password: str) -> str:
    return f"host=127.0.0.1 port={PORT} user=me dbname=db connect_timeout=2 password={password}"


def _quoted(password: str) -> str:
    escaped = password.replace("\\", "\\\\").replace("'", "\\'")
    return f"host=127.0.0.1 port={PORT} user=me dbname=db connect_timeout=2 password='{escaped}'"


SHAPES: dict[str, Callable[[str], str]] = {"url": _url, "keyword": _keyword, "quoted": _quoted}


def _leaks(text: str, password: str) -> list[str]:
    pieces = {password, *FRAGMENT.split(password)}
    return [p for p in pieces if len(p) >= 3 and p != "SEK" and p in text]


def _unique(password: str, tag: str) -> str:
    # The masking registry is process-wide: a test of the shape-only masks needs passwords no
    # other test has registered.
    return password.replace("SEK", f"Q{tag}Z")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("origin", ["environment", "config file"])
def test_connect_errors_never_show_the_password(
    origin: str, password: str, shape: str, tmp_path: Path
) -> None:
    password = _unique(password, f"{origin[0]}{shape[0]}{PASSWORDS.index(password)}")
    dsn = SHAPES[shape](password)
    config = tmp_path / "cutover.toml"
    environ = {"CUTOVER_SOURCE_DSN": "dbname=unused"}
    if origin == "environment":
        config.write_text("")
        environ["CUTOVER_TARGET_DSN"] = dsn
    else:
        escaped = dsn.replace("\\", "\\\\").replace('"', '\\"')
        config.write_text(f'[target]\ndsn = "{escaped}"\n')
    settings = load_settings(config, environ)
    assert settings.target.dsn == dsn
    with pytest.raises(DatabaseError) as err:
        pg.connect(settings.target.dsn, side="target", application_name="t")
    assert err.value.side == "target"
    assert not _leaks(str(err.value), password), str(err.value)
    logged = _mask_secrets(None, "error", {"event": "x", "error": str(err.value), "raw": dsn})
    assert not _leaks(str(logged), password), logged


@pytest.mark.parametrize("password", PASSWORDS)
def test_parse_errors_are_masked_by_shape_when_the_password_is_unknown(password: str) -> None:
    password = _unique(password, f"u{PASSWORDS.index(password)}")
    for dsn in (_url(password), _keyword(password)):
        message = ""
        try:
            psycopg.connect(dsn).close()
        except psycopg.Error as exc:
            message = str(exc)
        assert message, "connected to a closed port"
        assert password not in redact_dsn(f"connecting to {dsn}: {message}")
        # What libpq echoed of the DSN (a piece of the password) is masked in its message alone.
        echoed = re.findall(r'token: "([^"]*)"|after "([^"]*)"|host \'([^\']*)@', message)
        assert not [e for group in echoed for e in group if e and e in redact_dsn(message)]


def test_dsn_passwords_are_found_by_shape() -> None:
    assert dsn_passwords("postgresql://u:a@b@c@h:1/db") == {"a@b@c"}
    assert dsn_passwords("postgresql://u:a b%c@h/db") == {"a b%c"}
    assert dsn_passwords("host=h password='it\\'s secret' port=1") == {"it's secret"}
    assert dsn_passwords("host=h password=plain port=1") == {"plain"}
    assert dsn_passwords("postgresql://h/db?password=qp&x=1") == {"qp"}
    assert dsn_passwords("postgresql://u@h/db") == set()


def test_libpq_echoes_are_masked_by_shape() -> None:
    assert redact_dsn('invalid percent-encoded token: "ab%cd"') == (
        'invalid percent-encoded token: "***"'
    )
    assert redact_dsn("failed to resolve host 'tail@127.0.0.1': no") == (
        "failed to resolve host '***@127.0.0.1': no"
    )
    assert redact_dsn('missing "=" after "tail" in connection info string') == (
        'missing "=" after "***" in connection info string'
    )
    assert 'found in "***"' in redact_dsn('unexpected spaces found in "a b", use %20')
    assert redact_dsn("postgresql://u:p@q w@host/db") == "postgresql://u:***@host/db"
