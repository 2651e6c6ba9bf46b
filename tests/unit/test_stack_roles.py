"""devtools.stack_roles: the secured stack's per-component DSNs and role passwords."""

from __future__ import annotations

from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from devtools import stack_roles

ADMIN = "postgresql://cutover:adminpw@127.0.0.1:5433/legacy?sslmode=verify-full&sslrootcert=/ca"


def test_a_role_dsn_names_the_role_and_the_password_file_never_a_password() -> None:
    dsn = stack_roles.role_dsn(ADMIN, "cutover_producer", Path("/s/secrets/pgpass"))
    params = conninfo_to_dict(dsn)
    assert params["user"] == "cutover_producer" and params["passfile"] == "/s/secrets/pgpass"
    assert "password" not in params and "adminpw" not in dsn
    # TLS and the address stay the administrator's.
    assert (params["sslmode"], params["sslrootcert"], params["port"]) == (
        "verify-full",
        "/ca",
        "5433",
    )


def test_passwords_are_made_once_per_stack_and_kept_private(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    first = stack_roles._passwords(tmp_path, ["a", "b"])
    stack_roles._write_passfile(tmp_path, first)
    assert stack_roles.passfile(tmp_path).stat().st_mode & 0o077 == 0
    again = stack_roles._passwords(tmp_path, ["a", "b", "c"])
    assert again["a"] == first["a"] and again["b"] == first["b"] and again["c"]
    assert len(set(again.values())) == 3
    # libpq's format: host:port:database:user:password, any address of the stack.
    assert f"*:*:*:a:{first['a']}" in stack_roles.passfile(tmp_path).read_text().splitlines()
