"""cutover.grants: the least-privilege roles and grants `cutover init --print-grants` prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cutover import grants
from cutover.config import Settings, load_settings
from cutover.mapping import load_mapping

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
SECRET = "pw-never-printed-42"
ENV = {
    "CUTOVER_SOURCE_DSN": f"postgresql://admin:{SECRET}@db1:5432/legacy_db",
    "CUTOVER_TARGET_DSN": f"host=db2 dbname=commerce_db user=admin password={SECRET}",
}


def _settings(tmp_path: Path, roles: str = "") -> Settings:
    config = tmp_path / "cutover.toml"
    text = (SHOP / "cutover.toml").read_text()
    config.write_text(text.replace('"mapping.toml"', f'"{SHOP / "mapping.toml"}"') + roles)
    return load_settings(config, ENV)


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, str]:
    settings = _settings(tmp_path)
    mapping = load_mapping(settings.mapping_path)
    names = (grants.database_of(settings.source.dsn), grants.database_of(settings.target.dsn))
    return grants.split(grants.render(grants.grant_scripts(settings, mapping, names)))


def _statements(script: str, *words: str) -> list[str]:
    return [s for s in script.splitlines() if not s.startswith("--") and all(w in s for w in words)]


def test_one_script_per_database_named_from_the_dsns(scripts: dict[str, str]) -> None:
    assert list(scripts) == ["legacy", "commerce"]
    assert 'ON DATABASE "legacy_db"' in scripts["legacy"]
    assert 'ON DATABASE "commerce_db"' in scripts["commerce"]
    assert all(line.endswith(";") for s in scripts.values() for line in _statements(s, " "))


def test_producer_reads_only_the_published_columns(scripts: dict[str, str]) -> None:
    users = _statements(scripts["legacy"], 'ON TABLE "shop"."users" TO "cutover_producer"')
    assert len(users) == 1
    assert users[0].startswith("GRANT SELECT (")  # column-level, never the whole table
    columns = set(re.findall(r'"(\w+)"', users[0].split(" ON ")[0]))
    assert {"id", "email", "display_name"} <= columns
    assert not columns & {"bio", "handle", "follower_count"}  # the social columns
    # No whole-table SELECT on a shop table for anyone on legacy.
    assert not _statements(scripts["legacy"], "GRANT SELECT ON TABLE", '"shop".')
    assert "LOGIN REPLICATION" in scripts["legacy"]


def test_applier_writes_commerce_only(scripts: dict[str, str]) -> None:
    assert not _statements(scripts["legacy"], 'TO "cutover_applier"')
    assert not _statements(scripts["legacy"], '"cutover_applier",')
    writes = _statements(scripts["commerce"], "INSERT, UPDATE, DELETE", 'TO "cutover_applier"')
    assert any('"commerce"."customers"' in s for s in writes)
    assert _statements(scripts["commerce"], "pg_replication_origin_session_setup", "applier")
    # The applier checks for an origin before setting one up (cutover.origin); PUBLIC may not.
    for side, role in (("commerce", "cutover_applier"), ("legacy", "cutover_reverse_applier")):
        assert _statements(scripts[side], "pg_replication_origin_session_is_setup", role)
    assert not _statements(scripts["legacy"], "TO PUBLIC")
    # The reverse applier writes the mapped legacy columns, plus what it fills on insert.
    reverse = _statements(scripts["legacy"], '"shop"."users" TO "cutover_reverse_applier"')
    assert reverse and "bio" not in reverse[0] and '"handle"' in reverse[0].split("INSERT")[1]


def test_sre_keeps_the_control_tables_and_the_fence(scripts: dict[str, str]) -> None:
    commerce = scripts["commerce"]
    assert 'GRANT "cutover_control" TO "cutover_sre";' in commerce
    assert _statements(commerce, '"cutover"."audit" OWNER TO "cutover_control"')
    # The owner's own rights back the foreign keys between its tables (checked as the owner).
    assert 'GRANT USAGE, CREATE ON SCHEMA "cutover" TO "cutover_control";' in commerce
    assert _statements(scripts["legacy"], "SELECT, UPDATE", "write_fence", "cutover_sre")
    # Raising and lowering log the fence; the producer reading a side reads the log at start.
    for side in ("legacy", "commerce"):
        assert _statements(scripts[side], "SELECT, INSERT", "write_fence_log", "cutover_sre")
        assert _statements(scripts[side], "GRANT SELECT ON", "write_fence_log", "cutover_producer")


def test_role_names_from_config_and_no_secret(tmp_path: Path) -> None:
    settings = _settings(tmp_path, '[roles]\nproducer = "cdc_reader"\nsre = "ops"\n')
    mapping = load_mapping(settings.mapping_path)
    text = grants.render(grants.grant_scripts(settings, mapping, ("l", "c")))
    assert '"cdc_reader"' in text and '"ops"' in text and "cutover_producer" not in text
    assert SECRET not in text and "PASSWORD '" not in text
    assert "\\password cdc_reader" in text  # how to set it instead


def test_cli_prints_without_connecting(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.config_path is not None
    done = subprocess.run(
        [sys.executable, "-m", "cli.entry", "--config", str(settings.config_path), "init",
         "--print-grants"],
        capture_output=True, text=True, env={**ENV, "PATH": ""}, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    # db1/db2 do not resolve: a connection attempt would fail with exit 3.
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(grants.DATABASE_MARKER + "legacy")
    assert SECRET not in done.stdout + done.stderr


def test_reverse_and_write_switch_grants(scripts: dict[str, str]) -> None:
    # The reverse applier rebuilds the legacy invoice url (a `reverse` template names it on
    # purpose, though excluded from the publication): it may update it, never read it.
    invoices = _statements(scripts["legacy"], '"shop"."invoices" TO "cutover_reverse_applier"')
    assert len(invoices) == 1
    select, update = invoices[0].split(" UPDATE (")[0], invoices[0].split(" UPDATE (")[1]
    assert '"url"' not in select and '"url"' in update.split(")")[0]
    # A social column stays out of every reverse grant.
    users = _statements(scripts["legacy"], '"shop"."users" TO "cutover_reverse_applier"')
    assert '"bio"' not in users[0] and '"follower_count"' not in users[0].split("INSERT")[0]
    # switch-writes' reverse-path gate: the SRE reads the reverse producer's heartbeat.
    assert _statements(
        scripts["commerce"], "GRANT SELECT ON TABLE", '"producer_state"', 'TO "cutover_sre"'
    )


def test_sre_can_complete(scripts: dict[str, str]) -> None:
    # complete: the reverse publication loses a domain's tables, the last domain drops the
    # forward slot and publication; owners only (the SRE is a member of the owner role).
    legacy, commerce = scripts["legacy"], scripts["commerce"]
    assert _statements(legacy, 'ALTER PUBLICATION "cutover_pub" OWNER TO "cutover_control"')
    assert _statements(commerce, 'ALTER PUBLICATION "cutover_reverse_pub" OWNER TO')
    assert 'GRANT "cutover_control" TO "cutover_sre";' in legacy
    assert 'ALTER ROLE "cutover_sre" REPLICATION;' in legacy
    assert "REPLICATION" not in "".join(_statements(commerce, 'ALTER ROLE "cutover_sre"'))
