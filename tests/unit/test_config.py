"""Settings: TOML file + CUTOVER_* overrides, typed, frozen, with errors that name the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cutover.config import describe, load_settings
from cutover.errors import ConfigError, redact_dsn

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-pw"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cutover.toml"
    path.write_text(text)
    return path


def test_file_then_environment_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
[source]
dsn = "host=a dbname=legacy password={SECRET}"
slot = "my_slot"
[target]
dsn = "host=b dbname=commerce"
[kafka]
bootstrap = "file:9092"
partitions = 3
[kafka.producer]
"linger.ms" = 5
[mapping]
file = "maps/m.toml"
""",
    )
    settings = load_settings(
        path, {"CUTOVER_KAFKA_BOOTSTRAP": "env:1", "CUTOVER_TOPIC_PREFIX": "t"}
    )
    assert settings.source.slot == "my_slot"
    assert settings.kafka.bootstrap == "env:1"
    assert settings.kafka.partitions == 3
    assert settings.kafka.topic("payment") == "t.payment"
    assert settings.kafka.dlq_topic == "t.dlq"
    assert settings.kafka.producer == {"linger.ms": 5}
    assert settings.mapping_path == (tmp_path / "maps" / "m.toml").resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.source.slot = "x"  # type: ignore[misc]
    assert SECRET not in repr(settings)
    assert SECRET not in str(describe(settings))


def test_environment_alone_is_enough_when_file_optional(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./cutover.toml here
    settings = load_settings(
        None,
        {"CUTOVER_SOURCE_DSN": "host=x", "CUTOVER_TARGET_DSN": "host=y"},
        require_file=False,
    )
    assert settings.source.dsn == "host=x"
    assert settings.kafka.partitions == 6


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[source]\ndsn='x'\nslott='y'\n[target]\ndsn='y'\n", "unknown setting [source] slott"),
        ("[sources]\n", "unknown section 'sources'"),
        ("[source]\ndsn='x'\n[target]\ndsn='y'\n[kafka]\npartitions='6'\n", "partitions must"),
        ("[source]\ndsn='x'\n[target]\ndsn='y'\n[kafka]\npartitions=0\n", "must be positive"),
        ("[source]\ndsn='x'\n[target]\ndsn='y'\n[apply]\ndlq_policy='skip'\n", "one of"),
        (
            "[source]\ndsn='x'\n[target]\ndsn='y'\n[kafka]\napply_assignment='sticky'\n",
            "[kafka] apply_assignment must be one of ['cooperative-sticky', 'range']",
        ),
        (
            "[source]\ndsn='x'\n[target]\ndsn='y'\n[gates]\nmin_reads_soak_minutes=-1\n",
            "min_reads_soak_minutes must be 0 or more",
        ),
        ("[source]\ndsn='x'\n[target]\ndsn='y'\n[reverse]\nslott='s'\n", "[reverse] slott"),
        (
            "[source]\ndsn='x'\n[target]\ndsn='y'\n[kafka]\nmin_insync_replicas='2'\n",
            "min_insync_replicas must be of type int | None",
        ),
        (
            "[source]\ndsn='x'\n[target]\ndsn='y'\n[kafka]\nmin_insync_replicas=0\n",
            "min_insync_replicas must be positive",
        ),
        (
            "[source]\ndsn='x'\n[target]\ndsn='y'\n[kafka]\nreplication_factor=3\n"
            "min_insync_replicas=4\n",
            "min_insync_replicas = 4 is more than [kafka] replication_factor = 3",
        ),
        ("[target]\ndsn='y'\n", "missing setting [source] dsn"),
        ("[source\n", "not valid TOML"),
        (
            "[source]\ndsn='x'\nslot='Cutover-Slot'\n[target]\ndsn='y'\n",
            "[source] slot = 'Cutover-Slot' is not a valid replication slot name",
        ),
        (
            "[source]\ndsn='x'\n[target]\ndsn='y'\n[reverse]\nslot='" + "r" * 64 + "'\n",
            "[reverse] slot = 'rrrr",
        ),
    ],
)
def test_bad_config_names_the_setting(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text), {})
    assert needle in str(info.value)
    assert info.value.exit_code == 2


def test_reverse_and_soak_settings(tmp_path: Path) -> None:
    text = (
        "[source]\ndsn='x'\n[target]\ndsn='y'\n[gates]\nmin_reads_soak_minutes=0\n"
        "[reverse]\nslot='rs'\ngroup_id='rg'\n"
    )
    settings = load_settings(_write(tmp_path, text), {})
    assert settings.gates.min_reads_soak_minutes == 0
    assert settings.gates.min_writes_soak_minutes == 1440
    assert (settings.reverse.slot, settings.reverse.group_id) == ("rs", "rg")
    assert settings.reverse.publication == "cutover_reverse_pub"
    assert settings.kafka.reverse_topic("payment") == "shop.reverse.payment"


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config FILE or set CUTOVER_CONFIG"):
        load_settings(tmp_path / "nope.toml", {})


def test_missing_dsn_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CUTOVER_TARGET_DSN"):
        load_settings(_write(tmp_path, "[source]\ndsn='x'\n"), {})


def test_example_config_loads() -> None:
    settings = load_settings(
        REPO / "examples" / "shop" / "cutover.toml",
        {"CUTOVER_SOURCE_DSN": "host=x", "CUTOVER_TARGET_DSN": "host=y"},
    )
    assert settings.mapping_path == (REPO / "examples" / "shop" / "mapping.toml").resolve()
    assert settings.mapping_path.exists()


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=a password={SECRET} user=u",
        f"host=a password='{SECRET}' user=u",
        f"postgresql://user:{SECRET}@host:5432/db",
        f"host=a PASSWORD = {SECRET}",
    ],
)
def test_redact_dsn_masks_passwords(dsn: str) -> None:
    assert SECRET not in redact_dsn(dsn)
    assert "***" in redact_dsn(dsn)


def test_replication_settings(tmp_path: Path) -> None:
    text = "[source]\ndsn='x'\n[target]\ndsn='y'\n[kafka]\nreplication_factor=3\n"
    assert load_settings(_write(tmp_path, text), {}).kafka.min_insync_replicas is None
    settings = load_settings(_write(tmp_path, text + "min_insync_replicas=3\n"), {})
    assert (settings.kafka.replication_factor, settings.kafka.min_insync_replicas) == (3, 3)
