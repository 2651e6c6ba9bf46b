"""The console's rules without services: passwords, roles, CSRF, the failed-login limit, the
[console] config section, the overview merge; and the app's refusals (Starlette's test client,
no database: the readers are not started)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from console.actions import filter_entries
from console.app import create_app
from console.auth import (
    ACTIONS,
    LoginLimiter,
    authenticate,
    csrf_ok,
    hash_password,
    may,
    verify_password,
)
from console.live import merge, sample_of
from console.web import Env
from control.audit import AuditEntry
from cutover.config import ConsoleUser, describe, load_settings
from cutover.errors import ConfigError

SECRET = "x" * 40


def test_password_hash_round_trip() -> None:
    digest = hash_password("correct horse")
    assert digest.startswith("$argon2id$")
    assert "correct horse" not in digest
    assert hash_password("correct horse") != digest  # salted
    assert verify_password(digest, "correct horse")
    assert not verify_password(digest, "correct hors")
    assert not verify_password("not a hash", "correct horse")
    with pytest.raises(ValueError):
        hash_password("")


def test_authenticate_names_and_passwords() -> None:
    users = [ConsoleUser("ann", "operator", hash_password("pw-ann"))]
    assert authenticate(users, "ann", "pw-ann") == users[0]
    assert authenticate(users, "ann", "pw-bob") is None
    assert authenticate(users, "bob", "pw-ann") is None
    assert authenticate(users, "änn", "pw-ann") is None  # a non-ASCII name is a no, not a crash


def test_permissions() -> None:
    for action in ACTIONS:
        assert may("operator", action)
        assert not may("viewer", action)
    assert may("viewer", "view") and may("operator", "view")
    assert not may("admin", "view")  # unknown role: nothing
    assert not may("operator", "drop-database")  # unknown action: refused


def test_csrf_check() -> None:
    assert csrf_ok("abc", "abc")
    assert not csrf_ok("abc", "abd")
    assert not csrf_ok("abc", None)
    assert not csrf_ok(None, "abc")
    assert not csrf_ok("", "")


def test_login_limiter_per_user_and_address() -> None:
    now = [1000.0]
    limiter = LoginLimiter(3, 300, clock=lambda: now[0])
    for _ in range(3):
        assert not limiter.blocked("ann", "10.0.0.1")
        limiter.failed("ann", "10.0.0.1")
    assert limiter.blocked("ann", "10.0.0.1")
    assert limiter.blocked("ann", "10.0.0.2")  # the user, from elsewhere
    assert limiter.blocked("bob", "10.0.0.1")  # the address, another user
    assert not limiter.blocked("bob", "10.0.0.2")
    assert 0 < limiter.retry_after_s("ann", "10.0.0.2") <= 301
    now[0] += 301  # the window slid past every failure
    assert not limiter.blocked("ann", "10.0.0.1")
    assert limiter.retry_after_s("ann", "10.0.0.1") == 0
    limiter.failed("ann", "10.0.0.1")
    limiter.succeeded("ann")
    assert limiter._failures.get("user:ann") is None


def _config(tmp_path: Path, console: str) -> Path:
    path = tmp_path / "cutover.toml"
    path.write_text('[source]\ndsn = "host=a"\n[target]\ndsn = "host=b"\n' + console)
    return path


def _two_users(tmp_path: Path, console: str) -> Path:
    """A config whose ``[console]`` is ``console`` plus ann (operator) and vic (viewer), both
    with the password "pw"."""
    digest = hash_password("pw")
    users = "".join(
        f'[console.users.{name}]\nrole = "{role}"\npassword_hash = "{digest}"\n'
        for name, role in (("ann", "operator"), ("vic", "viewer"))
    )
    return _config(tmp_path, f"[console]\n{console}{users}")


def test_console_section(tmp_path: Path) -> None:
    path = _two_users(tmp_path, 'session_secret_file = "secret.txt"\nmax_failed_logins = 7\n')
    settings = load_settings(path, {"CUTOVER_CONSOLE_SECRET": SECRET})
    console = settings.console
    assert [(u.name, u.role) for u in console.users] == [("ann", "operator"), ("vic", "viewer")]
    assert console.max_failed_logins == 7
    assert console.failed_login_window_s == 300
    assert console.session_secret_file == (tmp_path / "secret.txt").resolve()
    assert console.session_secret == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(describe(settings))
    digest = console.users[0].password_hash
    assert digest.startswith("$argon2")  # the file's hash, kept out of repr and describe:
    assert digest not in repr(settings) and digest not in str(describe(settings))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[console]\nport = 1\n", "unknown setting [console] port"),
        ('[console.users.a]\nrole = "admin"\npassword_hash = "h"\n', "role must be one of"),
        ('[console.users.a]\nrole = "viewer"\npassword = "plain"\n', "password_hash"),
        ("[console]\nmax_failed_logins = 0\n", "positive"),
    ],
)
def test_console_section_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_settings(_config(tmp_path, text), {})


def test_merge_and_sample() -> None:
    status = {
        "progress_percent": 60,
        "writes_on_commerce": 0,
        "completed": 0,
        "domains": [{"domain": "payment", "state": "reads_switched", "weight": 60}],
    }
    monitor = {
        "topics": [{"domain": "payment", "applied_lag": 4, "apply_rate_msgs_per_s": 12.5}],
        "slot": {"name": "s", "wal_status": "reserved"},
        "producer": {"heartbeat_age_s": 1.0},
        "errors": ["kafka: down"],
    }
    gated = {"domains": [{"domain": "payment", "gates": [], "gates_pass": True}]}
    o = merge(status, monitor, gated, {"payment": {"total": 2}}, ["x"])
    d = o["domains"][0]
    assert (d["lag"], d["apply_rate"], d["gates_pass"], d["reverse_lag"]) == (
        4,
        12.5,
        True,
        {"total": 2},
    )
    assert o["errors"] == ["x", "kafka: down"]
    assert o["slot"]["wal_status"] == "reserved"
    assert sample_of(o, 5) == {
        "t": 5,
        "lag": {"payment": 4},
        "rate": {"payment": 12.5},
        "reverse_lag": {"payment": 2},
    }
    assert merge(None, None, None, {}, [])["domains"] == []


def test_audit_filter() -> None:
    from datetime import UTC, datetime

    def entry(actor: str, outcome: str) -> AuditEntry:
        at = datetime.now(UTC)
        return AuditEntry(
            1, at, actor, "switch-reads", "d", outcome, False, None, None, None, None, [], {}
        )

    entries = [entry("ann", "done"), entry("bob", "refused")]
    assert filter_entries(entries, actor="ann") == entries[:1]
    assert filter_entries(entries, outcome="refused") == entries[1:]
    assert filter_entries(entries) == entries


# ------------------------------------------------------------------ the app's refusals


class _NoReader:
    """Stands in for the readers (no services in unit tests)."""

    version = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def overview(self) -> dict[str, Any]:
        return merge(None, None, None, {}, [])

    def samples(self) -> list[dict[str, Any]]:
        return []

    def refresh_gates(self) -> None: ...


def _never(*_a: Any) -> Any:
    raise AssertionError("must not be reached")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = load_settings(_two_users(tmp_path, "max_failed_logins = 3\n"), {})
    env = Env(settings, {"payment": 60}, list_letters=_never, retry_letters=_never)
    app = create_app(env, SECRET, collector=_NoReader())  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def _login(c: TestClient, user: str, password: str = "pw") -> Any:
    token = _token(c.get("/login").text)
    return c.post(
        "/login",
        data={"username": user, "password": password, "csrf_token": token},
        follow_redirects=False,
    )


def test_pages_need_a_login(client: TestClient) -> None:
    r = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/api/overview").status_code == 401
    assert client.post("/actions/switch-reads/payment/dry-run").status_code == 403


def test_login_cookie_and_failed_login_limit(client: TestClient) -> None:
    for _ in range(3):
        assert _login(client, "ann", "wrong").status_code == 401
    assert _login(client, "ann", "pw").status_code == 429  # even the right password, for now
    client.cookies.clear()
    r = _login(client, "vic")
    assert r.status_code == 429  # same client address: limited too


def test_session_cookie_flags(client: TestClient) -> None:
    r = _login(client, "ann")
    assert r.status_code == 303
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_login_needs_csrf(client: TestClient) -> None:
    client.get("/login")
    r = client.post("/login", data={"username": "ann", "password": "pw"}, follow_redirects=False)
    assert r.status_code == 403


def test_viewer_refused_and_no_buttons(client: TestClient) -> None:
    assert _login(client, "vic").status_code == 303
    page = client.get("/", headers={"accept": "text/html"})
    assert page.status_code == 200 and "dry run" not in page.text
    token = _token(page.text)
    r = client.post("/actions/switch-reads/payment/dry-run", data={"csrf_token": token})
    assert r.status_code == 403
    r = client.post("/dead-letters/retry", data={"csrf_token": token, "id": "all"})
    assert r.status_code == 403


def test_operator_needs_csrf_and_confirmation(client: TestClient) -> None:
    assert _login(client, "ann").status_code == 303
    page = client.get("/", headers={"accept": "text/html"})
    assert "switch-reads (dry run)" in page.text
    assert client.post("/actions/switch-reads/payment/dry-run").status_code == 403
    bad = client.post("/actions/switch-reads/payment/dry-run", data={"csrf_token": "nope"})
    assert bad.status_code == 403
    token = _token(page.text)
    wrong = client.post(
        "/actions/switch-reads/payment", data={"csrf_token": token, "confirm": "data"}
    )
    assert wrong.status_code == 400 and "type the domain name" in wrong.text
    unknown = client.post("/actions/drop/payment/dry-run", data={"csrf_token": token})
    assert unknown.status_code == 404


# ------------------------------------------------------------------ the CLI command


def test_cli_hash_password_reads_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
    assert main(["console", "hash-password"]) == 0
    digest = capsys.readouterr().out.strip()
    assert verify_password(digest, "s3cret pass")
    assert "s3cret pass" not in digest
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["console", "hash-password"]) == 2


def test_session_secret_from_env_or_file(tmp_path: Path) -> None:
    from cli.commands.console import session_secret

    path = _config(tmp_path, '[console]\nsession_secret_file = "s.txt"\n')
    with pytest.raises(ConfigError, match="No such file"):
        session_secret(load_settings(path, {}))  # the file is missing
    (tmp_path / "s.txt").write_text("short\n")
    with pytest.raises(ConfigError, match="at least 32"):
        session_secret(load_settings(path, {}))
    (tmp_path / "s.txt").write_text("f" * 40 + "\n")
    assert session_secret(load_settings(path, {})) == "f" * 40
    env = {"CUTOVER_CONSOLE_SECRET": SECRET}
    assert session_secret(load_settings(path, env)) == SECRET  # the environment wins
