"""Confluent wire format next to single-object encoding: detection by the first bytes, registry
ids resolved once, the compiled encoder's Confluent header, and the registry settings (secrets
masked). No registry here: the id -> schema lookup is a dict (the real one is in
tests/integration/test_schema_registry.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cutover import codec
from cutover.codec import ColumnSpec, SchemaStore
from cutover.config import describe, load_settings
from cutover.errors import (
    ConfigError,
    DecodeError,
    SchemaRegistryError,
    UnknownSchema,
    redact_dsn,
)
from cutover.registry import HEARTBEAT_SUBJECT, client_config, subject_for
from producers.fast_avro import encoder_for

COLUMNS = [ColumnSpec("id", 20, -1), ColumnSpec("name", 25, -1)]
WRITER = codec.writer_schema(codec.envelope_schema("shop", "items", COLUMNS))
RECORD: dict[str, Any] = {
    "before": None,
    "after": {"id": 7, "name": "kopi"},
    "source": {
        "version": "0.1.0", "connector": "kafka-cutover", "name": "shop", "ts_ms": 1,
        "snapshot": "false", "db": "legacy", "schema": "shop", "table": "items",
        "txId": 7, "lsn": 99, "seq": 1,
    },
    "op": "c",
    "ts_ms": 2,
    "transaction": None,
    "unchanged_toast": [],
}  # fmt: skip


def _confluent(schema_id: int) -> bytes:
    return encoder_for(dataclasses.replace(WRITER, header=codec.confluent_header(schema_id)))(
        RECORD
    )


def test_framing_is_told_by_the_first_bytes() -> None:
    single = codec.encode(WRITER, RECORD)
    assert codec.framing(single) == "single-object"
    assert codec.framing(_confluent(3)) == "confluent"
    for bad in (b"", b"\x01abcdef", b"\x00\x01", b"\xc3\x01short"):
        with pytest.raises(DecodeError, match="expected magic c301"):
            codec.framing(bad)


def test_confluent_header_is_magic_zero_and_big_endian_id() -> None:
    assert codec.confluent_header(0x01020304) == b"\x00\x01\x02\x03\x04"
    assert codec.read_schema_id(codec.confluent_header(258) + b"body") == 258
    with pytest.raises(DecodeError):
        codec.read_schema_id(b"\xc3\x01" + bytes(8))


def test_confluent_body_is_the_single_object_body() -> None:
    single = codec.encode(WRITER, RECORD)
    framed = _confluent(42)
    assert framed[:5] == b"\x00\x00\x00\x00\x2a"
    assert framed[5:] == single[codec.HEADER_SIZE :]


def test_store_decodes_both_framings_and_resolves_each_id_once() -> None:
    asked: list[int] = []

    def resolve(schema_id: int) -> str:
        asked.append(schema_id)
        return {42: WRITER.json}[schema_id]

    store = SchemaStore(resolve)
    store.add(WRITER)
    for value in (codec.encode(WRITER, RECORD), _confluent(42), _confluent(42)):
        ws, record = store.decode(value)
        assert ws.fingerprint == WRITER.fingerprint
        assert record["after"] == {"id": 7, "name": "kopi"}
    assert asked == [42]


def test_confluent_message_without_registry_is_a_config_error_not_poison() -> None:
    # ConfigError is not a DecodeError: the applier stops instead of dead-lettering.
    with pytest.raises(ConfigError, match="schema_registry_url") as info:
        SchemaStore().decode(_confluent(5))
    assert not isinstance(info.value, DecodeError)


def test_id_the_registry_does_not_have_is_poison_but_an_outage_is_not() -> None:
    def missing(schema_id: int) -> str:
        raise SchemaRegistryError("no such id", status=404, error_code=40403, reason="not found")

    # The registry answered it has no such schema: the message is poison (dead-lettered).
    with pytest.raises(UnknownSchema, match=r"unknown schema id 5: .*not found") as info:
        SchemaStore(missing).decode(_confluent(5))
    assert info.value.schema_id == 5

    def down(schema_id: int) -> str:
        raise SchemaRegistryError("reading schema id: unreachable")

    # No answer (or a failing registry) is not the message's fault: not a DecodeError, stop.
    with pytest.raises(SchemaRegistryError) as outage:
        SchemaStore(down).decode(_confluent(5))
    assert not isinstance(outage.value, DecodeError)


def test_corrupt_confluent_body_is_a_decode_error() -> None:
    store = SchemaStore(lambda _id: WRITER.json)
    with pytest.raises(DecodeError, match="corrupt Avro body"):
        store.decode(codec.confluent_header(1) + b"\x02")


def test_subjects() -> None:
    assert subject_for("shop.payment", WRITER.name) == "shop.payment-cutover.shop.items.Envelope"
    assert HEARTBEAT_SUBJECT == "cutover.Heartbeat"


def _settings(tmp_path: Path, kafka: str, environ: dict[str, str] | None = None) -> Any:
    path = tmp_path / "cutover.toml"
    path.write_text(f'[source]\ndsn = "host=a"\n[target]\ndsn = "host=b"\n[kafka]\n{kafka}\n')
    return load_settings(path, environ or {})


def test_registry_settings_and_env(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "", {"CUTOVER_SCHEMA_REGISTRY_URL": "http://r:8081"})
    assert settings.kafka.schema_registry_url == "http://r:8081"
    assert client_config(settings.kafka)["url"] == "http://r:8081"
    assert _settings(tmp_path, "").kafka.schema_registry_url is None


def test_registry_password_is_never_shown(tmp_path: Path) -> None:
    secret = "Reg1stry-Pa55"
    settings = _settings(
        tmp_path,
        'schema_registry_url = "https://reg:8081"\nschema_registry_user = "svc"\n'
        'schema_registry_ca = "/etc/ca.pem"',
        {"CUTOVER_SCHEMA_REGISTRY_PASSWORD": secret},
    )
    conf = client_config(settings.kafka)
    assert conf["basic.auth.user.info"] == f"svc:{secret}"
    assert conf["ssl.ca.location"] == "/etc/ca.pem"
    assert secret not in repr(settings)
    assert secret not in str(describe(settings))
    assert secret not in str(SchemaRegistryError(f"refused for svc:{secret}"))
    assert redact_dsn(f"x {secret} y") == "x *** y"


def test_password_in_the_url_is_masked(tmp_path: Path) -> None:
    settings = _settings(tmp_path, 'schema_registry_url = "https://svc:UrlSecret9@reg:8081"')
    assert "UrlSecret9" not in str(describe(settings))


def test_password_without_user_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="schema_registry_user"):
        _settings(tmp_path, 'schema_registry_url = "http://r"\nschema_registry_password = "xyz1"')
