"""The secured stack's PostgreSQL side, without a server: the server's configuration and the
clients' DSNs (verify-full against the stack's CA) that ``.stack/env`` carries to a shell."""

from __future__ import annotations

import subprocess
from pathlib import Path

from devtools import pg_security, stack, tls


def test_secure_cluster_config_is_tls_only_and_idempotent(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "postgresql.conf").write_text("port = 5432\n")
    (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 scram-sha-256\n")
    ca = tls.make_ca(tmp_path / "tls")
    issued = pg_security.secure_cluster(data, ca)
    conf = (data / "postgresql.conf").read_text()
    assert "ssl = on" in conf and f"ssl_key_file = '{issued.key}'" in conf
    assert issued.key.stat().st_mode & 0o077 == 0
    hba = [line.split() for line in (data / "pg_hba.conf").read_text().splitlines()]
    tcp = [line for line in hba if line and line[0].startswith("host")]
    assert tcp and all(line[0] in ("hostssl", "hostnossl") for line in tcp)
    assert all(line[-1] == "reject" for line in tcp if line[0] == "hostnossl")
    pg_security.secure_cluster(data, ca)
    assert (data / "postgresql.conf").read_text() == conf


def test_secured_stack_dsns_verify_full_and_survive_the_shell(tmp_path: Path) -> None:
    state = stack.StackState(
        kafka_port=1, controller_port=2, legacy_port=3, commerce_port=4, password="pw",
        ca_cert=str(tmp_path / "tls" / "ca.crt"),
    )  # fmt: skip
    dsn = state.env()["CUTOVER_SOURCE_DSN"]
    assert dsn.endswith(f"/legacy?sslmode=verify-full&sslrootcert={tmp_path}/tls/ca.crt")
    stack.write_env(tmp_path, state)
    assert stack.read_env(tmp_path)["CUTOVER_SOURCE_DSN"] == dsn
    sourced = subprocess.run(
        ["sh", "-c", f'set -a; . "{tmp_path}/env"; printf %s "$CUTOVER_SOURCE_DSN"'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert sourced.stdout == dsn
    plain = stack.StackState(kafka_port=1, controller_port=2, legacy_port=3, commerce_port=4,
                             password="pw")  # fmt: skip
    assert "sslmode" not in plain.env()["CUTOVER_TARGET_DSN"]
