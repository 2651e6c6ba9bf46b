"""cutover.envelope: build → real codec → parse round trips, the exact wire bytes, positions and
LSN text (no services)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

import schemas
from cutover import envelope as env
from cutover.codec import (
    ColumnSpec,
    SchemaStore,
    WriterSchema,
    encode,
    envelope_schema,
    heartbeat_schema,
    read_fingerprint,
    truncate_schema,
    writer_schema,
)
from cutover.envelope import Change, Heartbeat, Position, lsn_to_str, str_to_lsn
from cutover.errors import DecodeError
from cutover.values import UNCHANGED
from producers.fast_avro import encoder_for

LSN = 0x16_B374D848  # prints as 16/B374D848
NUMERIC_14_2 = ((14 << 16) | 2) + 4
COLUMNS = [
    ColumnSpec("id", 20, -1),
    ColumnSpec("price_idr", 1700, NUMERIC_14_2),
    ColumnSpec("updated_at", 1184, -1),
    ColumnSpec("description", 25, -1),
    ColumnSpec("stock", 23, -1),
]
SOURCE = env.source_block(
    version="0.1.0", connector="postgresql", name="shop", db="legacy", schema="shop",
    table="products",
)  # fmt: skip
AFTER = {
    "id": 7,
    "price_idr": Decimal("12.50"),
    "updated_at": datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC),
    "description": None,  # unchanged TOAST: null, listed in unchanged_toast
    "stock": 3,
}
BEFORE = {"id": 7, "price_idr": None, "updated_at": None, "description": None, "stock": 2}

# The bytes the producer wrote before the envelope module existed (recorded from the previous
# hand-built dicts): the module must not change the wire format by a single byte.
FINGERPRINT = "7b56bc919a298225"
UPDATE_BYTES = bytes.fromhex(
    "c3012582299a91bc567b02020e000000020402020e020404e202aac481f6fad7b0060002060a302e312e3014"
    "706f737467726573716c0873686f7080f38cd2d9660a66616c73650c6c65676163790873686f701070726f64"
    "756374738a0e90e1a6b7d6050402c0fb8cd2d966021e3930313a393735303030353937323006020102166465"
    "736372697074696f6e00"
)
SNAPSHOT_BYTES = bytes.fromhex(
    "c3012582299a91bc567b0002020e020404e202aac481f6fad7b0060002060a302e312e3014706f7374677265"
    "73716c0873686f7080f38cd2d96608747275650c6c65676163790873686f701070726f64756374738c0ea080"
    "8080e0050006c0fb8cd2d9660000"
)
HEARTBEAT_BYTES = bytes.fromhex("c30183da1d5b93c59f9ac0fb8cd2d96690e1a6b7d605047031")


def _update() -> dict[str, Any]:
    record = env.change_record(
        SOURCE,
        op="u",
        before=dict(BEFORE),
        after=dict(AFTER),
        unchanged=["description"],
        position=(LSN, 2),
        tx_id=901,
        commit_ms=1764378123456,
        now_ms=1764378124000,
        transaction=env.transaction_block(901, LSN, 3, 1),
    )
    env.mark_last_in_partition(record)
    return record


def _snapshot_row() -> dict[str, Any]:
    return env.change_record(
        SOURCE,
        op=env.SNAPSHOT_OP,
        before=None,
        after=dict(AFTER),
        unchanged=[],
        position=(0x17_00000010, 0),
        tx_id=902,
        commit_ms=1764378123456,
        now_ms=1764378124000,
        transaction=None,
    )


def _writer(store: SchemaStore, fingerprint: int) -> WriterSchema:
    writer = store.get(fingerprint)
    assert writer is not None
    return writer


@pytest.fixture(scope="module")
def store() -> SchemaStore:
    store = SchemaStore()
    store.add(envelope_schema("shop", "products", COLUMNS))
    store.add(heartbeat_schema())
    return store


def test_built_envelopes_encode_to_the_recorded_bytes(store: SchemaStore) -> None:
    writer = _writer(store, int(FINGERPRINT, 16))
    fast = encoder_for(writer)
    for record, golden in ((_update(), UPDATE_BYTES), (_snapshot_row(), SNAPSHOT_BYTES)):
        assert encode(writer, record) == golden
        assert fast(record) == golden  # the producer's compiled encoder agrees
    hb = _writer(store, read_fingerprint(HEARTBEAT_BYTES))
    assert encode(hb, env.heartbeat_record(1764378124000, LSN, "p1")) == HEARTBEAT_BYTES


def test_streamed_change_round_trips_through_the_codec(store: SchemaStore) -> None:
    writer, record = store.decode(encode(_writer(store, int(FINGERPRINT, 16)), _update()))
    event = env.from_record(writer.name, record)
    assert event == Change(
        schema="shop",
        table="products",
        op="u",
        lsn=LSN,
        seq=2,
        ts_ms=1764378123456,
        row={**AFTER, "description": UNCHANGED},
        before=BEFORE,
        closes=True,
        snapshot=False,
    )
    assert event.position == Position(LSN, 2)
    assert str(event.position) == "16/B374D848#2"


def test_snapshot_row_round_trips_as_a_closed_unit(store: SchemaStore) -> None:
    writer, record = store.decode(SNAPSHOT_BYTES)
    event = env.from_record(writer.name, record)
    assert isinstance(event, Change)
    assert (event.op, event.snapshot, event.closes, event.before) == ("r", True, True, None)
    assert event.position == Position(0x17_00000010, 0)
    assert event.row == AFTER
    assert record[env.SOURCE][env.SRC_SNAPSHOT] == "true"


def test_held_back_change_stays_open_until_marked(store: SchemaStore) -> None:
    record = _update()
    record[env.TRANSACTION][env.TX_LAST_IN_PARTITION] = False
    writer, decoded = store.decode(encode(_writer(store, int(FINGERPRINT, 16)), record))
    event = env.from_record(writer.name, decoded)
    assert isinstance(event, Change) and event.closes is False


def test_heartbeat_round_trips(store: SchemaStore) -> None:
    writer, record = store.decode(HEARTBEAT_BYTES)
    assert writer.name == env.HEARTBEAT_SCHEMA
    event = env.from_record(writer.name, record)
    assert event == Heartbeat(ts_ms=1764378124000, lsn=LSN, producer="p1")
    assert event.closes


def names(template: str) -> list[str]:
    return [str(f["name"]) for f in schemas.load(template)["fields"]]


def test_field_names_are_the_schema_templates() -> None:
    assert list(env.FIELDS) == names("envelope")
    source = {v for k, v in vars(env).items() if k.startswith("SRC_")}
    assert source == set(names("source"))
    tx = {v for k, v in vars(env).items() if k.startswith("TX_")}
    assert tx == set(names("transaction"))
    assert {env.HB_TS_MS, env.HB_LSN, env.HB_PRODUCER} == set(names("heartbeat"))
    block = env.change_record(
        SOURCE, op="c", before=None, after={}, unchanged=[], position=(1, 0), tx_id=1,
        commit_ms=0, now_ms=0, transaction=None,
    )  # fmt: skip
    assert set(block[env.SOURCE]) == source


def test_parse_refuses_a_delete_without_before() -> None:
    record = _snapshot_row()
    record[env.OP] = "d"
    with pytest.raises(DecodeError, match="delete event without a before row"):
        env.from_record("cutover.shop.products.Envelope", record)


# --- positions and LSN text ------------------------------------------------------------------


def test_positions_order_by_commit_lsn_then_seq() -> None:
    shuffled = [Position(LSN, 1), Position(0x17_00000000, 0), Position(LSN, 0), Position(5, 99)]
    assert sorted(shuffled) == [
        Position(5, 99),
        Position(LSN, 0),
        Position(LSN, 1),
        Position(0x17_00000000, 0),
    ]
    assert Position(LSN, 0) < Position(LSN + 1, 0) and Position(LSN, 1) > Position(LSN, 0)
    assert max(Position(LSN, 3), Position(LSN, 10)) == Position(LSN, 10)


def test_position_is_frozen_and_prints_as_pg_lsn() -> None:
    pos = Position(LSN, 7)
    with pytest.raises(AttributeError):
        pos.lsn = 1  # type: ignore[misc]
    assert (pos.lsn, pos.seq) == (LSN, 7)
    assert str(pos) == "16/B374D848#7"
    assert str(Position(0, 0)) == "0/0#0"


@pytest.mark.parametrize(
    ("lsn", "text"),
    [
        (0, "0/0"),
        (LSN, "16/B374D848"),
        (0xFFFFFFFF, "0/FFFFFFFF"),
        ((1 << 64) - 1, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_lsn_round_trip(lsn: int, text: str) -> None:
    assert lsn_to_str(lsn) == text
    assert str_to_lsn(text) == lsn


def test_str_to_lsn_accepts_lower_case() -> None:
    assert str_to_lsn("16/b374d848") == LSN


@pytest.mark.parametrize(
    "text", ["", "16", "16/", "/1", "16/B374D848/0", "G/0", "123456789/0", " 1/0"]
)
def test_str_to_lsn_rejects(text: str) -> None:
    with pytest.raises(DecodeError, match="is not an LSN"):
        str_to_lsn(text)


@pytest.mark.parametrize("lsn", [-1, 1 << 64])
def test_lsn_to_str_rejects_out_of_range(lsn: int) -> None:
    with pytest.raises(DecodeError, match="outside the unsigned 64-bit range"):
        lsn_to_str(lsn)


# A truncate of shop.invoices, recorded when the truncate record was introduced.
TRUNCATE_BYTES = bytes.fromhex(
    "c301c74ff915afa44fc70a302e312e3014706f737467726573716c0873686f7080f38cd2d9660a66616c73650c"
    "6c65676163790873686f7010696e766f696365738e0e90e1a6b7d605080274c0fb8cd2d966021e3930333a3937"
    "3530303035393732300a02010000"
)


def _truncate(last: bool) -> dict[str, Any]:
    source = env.source_block(
        version="0.1.0", connector="postgresql", name="shop", db="legacy", schema="shop",
        table="invoices",
    )  # fmt: skip
    record = env.truncate_record(
        source,
        position=(LSN, 4),
        tx_id=903,
        commit_ms=1764378123456,
        now_ms=1764378124000,
        transaction=env.transaction_block(903, LSN, 5, 1),
    )
    if last:
        env.mark_last_in_partition(record)
    return record


def test_truncate_record_encodes_to_the_recorded_bytes_and_round_trips() -> None:
    writer = writer_schema(truncate_schema())
    assert writer.name == env.TRUNCATE_SCHEMA
    assert encode(writer, _truncate(True)) == TRUNCATE_BYTES
    assert encoder_for(writer)(_truncate(True)) == TRUNCATE_BYTES
    store = SchemaStore()
    store.add(truncate_schema())
    decoded_writer, record = store.decode(TRUNCATE_BYTES)
    event = env.from_record(decoded_writer.name, record)
    assert event == Change(
        schema="shop",
        table="invoices",
        op=env.TRUNCATE_OP,
        lsn=LSN,
        seq=4,
        ts_ms=1764378123456,
        row={},
        before=None,
        closes=True,
        snapshot=False,
    )
    assert isinstance(event, Change) and event.truncate
    # A copy that is not the last of its transaction in its partition keeps the unit open.
    _, record = store.decode(encode(writer, _truncate(False)))
    open_event = env.from_record(env.TRUNCATE_SCHEMA, record)
    assert isinstance(open_event, Change) and not open_event.closes


def test_truncate_record_with_another_op_is_refused() -> None:
    record = _truncate(True)
    record[env.OP] = "d"
    with pytest.raises(DecodeError, match="truncate event op"):
        env.from_record(env.TRUNCATE_SCHEMA, record)


def test_the_other_ops_keep_their_envelope_fingerprint() -> None:
    # The truncate is its own record: the Op enum, hence every table's fingerprint, is unchanged.
    writer = writer_schema(envelope_schema("shop", "products", COLUMNS))
    assert writer.fingerprint_hex == FINGERPRINT
