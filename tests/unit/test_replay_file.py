"""Replay files without services: the Avro container written by hand is standard Avro (fastavro
reads it back decoded), the fast reader gives the original message bytes back, evolved schemas
share a file, and damaged files are refused with a clear message."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import fastavro
import pytest

from consumers.replay import (
    FORMAT,
    Recorded,
    ReplayFile,
    ReplayWriter,
    encode_long,
    file_schema,
    read_long,
    union_branches,
)
from cutover.codec import ColumnSpec, SchemaStore, encode, envelope_schema, writer_schema
from cutover.errors import DecodeError, UsageError
from devtools.apply_support import EventFactory, Message, ShopModel


def _messages(n: int, seed: int = 3) -> tuple[EventFactory, list[Message]]:
    factory = EventFactory("t", 3)
    model = ShopModel(factory, seed=seed, description_size=200)
    out: list[Message] = []
    while len(out) < n:
        out.extend(model.step(ts_ms=1_700_000_000_000 + len(out)))
    return factory, out[:n]


def _rows(path: Path) -> list[dict[str, Any]]:
    """The file read by a standard Avro reader (fastavro)."""
    with path.open("rb") as fh:
        return [cast(dict[str, Any], r) for r in fastavro.reader(fh)]


def _write(path: Path, factory: EventFactory, messages: Sequence[Message]) -> ReplayWriter:
    store = SchemaStore()
    for ws in factory.schemas.values():
        store.add(ws)
    writer = ReplayWriter(path)
    for i, m in enumerate(messages):
        found = store.get(int.from_bytes(m.value[2:10], "little"))
        assert found is not None
        writer.write(
            m.topic,
            m.partition,
            offset=i,
            timestamp_ms=1_700_000_000_000 + i,
            key=m.key,
            headers=list(m.headers),
            value=m.value,
            branch=writer.branch_for(found),
        )
    writer.finish({"topic": "t.payment", "partitions": {"0": [0, len(messages)]},
                   "events": len(messages)})  # fmt: skip
    return writer


def test_long_encoding_round_trips() -> None:
    for n in [0, 1, -1, 63, 64, -65, 300, 2**31, -(2**40), 2**62]:
        data = encode_long(n)
        assert read_long(data, 0) == (n, len(data))
        out = io.BytesIO()
        fastavro.schemaless_writer(out, "long", n)
        assert out.getvalue() == data


def test_file_is_standard_avro_and_the_fast_reader_restores_the_bytes(tmp_path: Path) -> None:
    factory, messages = _messages(300)
    path = tmp_path / "r.avro"
    _write(path, factory, messages)
    store = SchemaStore()
    for ws in factory.schemas.values():
        store.add(ws)
    # Any Avro reader: values come back decoded, typed.
    with path.open("rb") as fh:
        reader = fastavro.reader(fh)
        assert reader.metadata["cutover.format"] == FORMAT
        rows = list(reader)
    assert len(rows) == len(messages)
    for row, m in zip(rows, messages, strict=True):
        assert isinstance(row, dict)
        _ws, expected = store.decode(m.value)
        assert row["value"] == expected
        assert row["key"] == m.key
        assert row["headers"] == [{"key": k, "value": v} for k, v in m.headers]
    # Ours: the original single-object bytes, key, headers, partition, in order.
    with ReplayFile(path) as replay:
        got = list(replay)
        assert replay.events == len(messages)
        assert set(replay.writer_schemas) == {ws.fingerprint_hex for ws in factory.schemas.values()}
    assert [(r.topic, r.partition, r.key, r.value) for r in got] == [
        (m.topic, m.partition, m.key, m.value) for m in messages
    ]
    assert got[0].headers == (("cutover.kind", b"change"),)


def test_null_and_undecodable_values_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "r.avro"
    writer = ReplayWriter(path)
    poison = b"\xc3\x01" + b"\x01" * 8 + b"garbage"
    for i, value in enumerate([None, b"not avro at all", poison]):
        writer.write("t.data", 0, offset=i, timestamp_ms=i, key=None, headers=None,
                     value=value, branch=None)  # fmt: skip
    writer.finish({"events": 3})
    values = [r["value"] for r in _rows(path)]
    assert values == [None, b"not avro at all", poison]
    with ReplayFile(path) as replay:
        got = list(replay)
    assert [r.value for r in got] == [None, b"not avro at all", poison]
    assert got[2].fingerprint == "0101010101010101"
    assert got[0].key is None and got[0].headers == ()


def _cols(*names: str) -> list[ColumnSpec]:
    return [ColumnSpec(n, 20 if n == "id" else 25, -1) for n in names]


def test_two_versions_of_one_table_share_a_file(tmp_path: Path) -> None:
    """After ALTER TABLE ADD COLUMN both envelope versions are union branches (renamed)."""
    v1 = writer_schema(envelope_schema("shop", "users", _cols("id", "email")))
    v2 = writer_schema(envelope_schema("shop", "users", _cols("id", "email", "phone")))
    other = writer_schema(envelope_schema("shop", "merchants", _cols("id", "shop_name")))
    branches = union_branches([(ws.fingerprint_hex, json.loads(ws.json)) for ws in (v1, other, v2)])
    names = [b["name"] if isinstance(b, dict) else b for b in branches]
    assert names[0] == "cutover.shop.users.Envelope"
    assert names[2] == f"cutover.shop.users.Envelope_{v2.fingerprint_hex}"
    fastavro.parse_schema(file_schema(branches))  # every named type defined once
    source = {"version": "1", "connector": "c", "name": "n", "ts_ms": 1, "snapshot": "false",
              "db": "d", "schema": "shop", "table": "users", "txId": 1, "lsn": 16,
              "seq": 0}  # fmt: skip

    def rec(after: dict[str, Any]) -> dict[str, Any]:
        return {"before": None, "after": after, "source": source, "op": "c", "ts_ms": 2,
                "transaction": None, "unchanged_toast": []}  # fmt: skip

    values = [
        encode(v1, rec({"id": 1, "email": "a"})),
        encode(v2, rec({"id": 2, "email": "b", "phone": "+62"})),
        encode(other, rec({"id": 3, "shop_name": "s"}) | {"source": source | {"table": "m"}}),
    ]
    path = tmp_path / "evolved.avro"
    writer = ReplayWriter(path)
    for i, (value, ws) in enumerate(zip(values, (v1, v2, other), strict=True)):
        writer.write("t.data", 0, offset=i, timestamp_ms=i, key=b"k", headers=None,
                     value=value, branch=writer.branch_for(ws))  # fmt: skip
    writer.finish({"events": 3})
    afters = [r["value"]["after"] for r in _rows(path)]
    assert afters == [
        {"id": 1, "email": "a"},
        {"id": 2, "email": "b", "phone": "+62"},
        {"id": 3, "shop_name": "s"},
    ]
    with ReplayFile(path) as replay:
        assert [r.value for r in replay] == values


def test_files_rewritten_by_other_tools_are_read_too(tmp_path: Path) -> None:
    """Several records per block and deflate: the generic path re-encodes the same bytes."""
    factory, messages = _messages(50)
    ours = tmp_path / "ours.avro"
    _write(ours, factory, messages)
    with ours.open("rb") as fh:
        # Record names kept, so the writer below picks the same union branches.
        reader = fastavro.reader(fh, return_record_name=True)
        meta = {k: v for k, v in reader.metadata.items() if not k.startswith("avro.")}
        schema = json.loads(reader.metadata["avro.schema"])
        rows = list(reader)
    theirs = tmp_path / "theirs.avro"
    with theirs.open("wb") as fh:
        fastavro.writer(fh, schema, rows, codec="deflate", metadata=meta, sync_interval=4000)
    with ReplayFile(theirs) as replay:
        assert [r.value for r in replay] == [m.value for m in messages]


def test_missing_and_damaged_files_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such replay file"):
        ReplayFile(tmp_path / "nope.avro")
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"this is not an avro file at all, really")
    with pytest.raises(DecodeError, match="Avro magic"):
        ReplayFile(junk)
    plain = tmp_path / "plain.avro"
    with plain.open("wb") as fh:
        fastavro.writer(fh, {"type": "record", "name": "X", "fields": []}, [{}])
    with pytest.raises(DecodeError, match="not written by `cutover replay record`"):
        ReplayFile(plain)
    factory, messages = _messages(20)
    good = tmp_path / "good.avro"
    _write(good, factory, messages)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.avro"
    truncated.write_bytes(data[: len(data) - 40])
    with ReplayFile(truncated) as replay, pytest.raises(DecodeError, match="past the end"):
        list(replay)
    flipped = bytearray(data)
    flipped[len(data) - 5] ^= 0xFF  # inside the last sync marker
    damaged = tmp_path / "damaged.avro"
    damaged.write_bytes(bytes(flipped))
    with ReplayFile(damaged) as replay, pytest.raises(DecodeError, match="damaged"):
        list(replay)


def test_recorded_is_plain_data() -> None:
    rec = Recorded("t", 0, 1, 2, None, (), None, None)
    assert rec.offset == 1


def test_playing_to_a_target_commits_only_where_no_unit_is_open() -> None:
    from consumers.engine import Decoder
    from consumers.replay import Pacer, PlaySummary, Rate
    from consumers.replay.target import _FileSource

    factory, messages = _messages(700)
    store = SchemaStore()
    for ws in factory.schemas.values():
        store.add(ws)
    records = [
        Recorded(m.topic, m.partition, i, 1_700_000_000_000 + i, m.key, m.headers, None, m.value)
        for i, m in enumerate(messages)
    ]
    records.append(Recorded("t.payment", 0, 700, 0, None, (), None, b"junk"))
    summary = PlaySummary("f", "db", Rate().describe())
    source = _FileSource(
        iter(records), Decoder(store), pacer=Pacer(Rate()), batch_max=37, summary=summary,
        progress=None, total=len(records),
    )  # fmt: skip
    last_closes: dict[tuple[str, int], bool] = {}
    seen = commits = 0
    junk = []
    while (batch := source.next_batch()) is not None:
        for tp, entries in batch.entries.items():
            seen += len(entries)
            for entry in entries:
                if entry.event is not None:
                    last_closes[tp] = entry.event.closes
                else:
                    junk.append(entry)
        if batch.commit and not source._done:
            commits += 1
            assert all(last_closes.values())  # no source transaction is cut by a COMMIT
        elif not batch.commit:
            assert not all(last_closes.values())
    assert seen == summary.played == len(records)
    assert commits > 0
    # The undecodable message is in a batch, with its error (it becomes a dead letter).
    assert len(junk) == 1 and isinstance(junk[0].error, DecodeError)
    # The file ends inside a unit (messages[:700] cut a step): the last batch commits anyway.
    assert summary.open_units_at_end == sum(not c for c in last_closes.values()) > 0
