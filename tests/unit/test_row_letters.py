"""Producer dead letters (pure part): a row the envelope cannot carry is withheld, named by
table, key, LSN and a value-free reason; the rest of its transaction flows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cutover.codec import ColumnSpec, SchemaStore
from cutover.errors import DecodeError, UncarriableValue
from cutover.mapping import MappingSpec, load_mapping
from cutover.values import UNCHANGED
from producers import row_letters
from producers.events import ChangeStream, ChunkWindow, SourceInfo, TableRoute
from producers.pgoutput import Begin, Commit, Insert, LogicalMessage, Update, decode_tuple
from producers.row_letters import RefusedRow, RowLetter, halt_message
from tests.unit.test_producer_events import (
    PRODUCTS,
    USERS,
    product,
    products_rel,
    user,
    users_rel,
)

REPO = Path(__file__).resolve().parents[2]
LSN = 0x1A2B3C


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping(REPO / "examples" / "shop" / "mapping.toml")


@dataclass
class Stream:
    """A ChangeStream with a letter callback, wired to lists."""

    mapping: MappingSpec
    max_event_bytes: int | None = None
    letters: list[RowLetter] = field(default_factory=list)
    sent: list[tuple[str, int, bytes, bytes]] = field(default_factory=list)
    store: SchemaStore = field(default_factory=SchemaStore)
    stream: ChangeStream = field(init=False)

    def __post_init__(self) -> None:
        self.stream = ChangeStream(
            self.mapping,
            SourceInfo(version="1.0", name="shop", db="legacy"),
            partitions={f"shop.{d}": 4 for d in ("payment", "data", "merchant")},
            topic_for=lambda d: f"shop.{d}",
            emit=lambda t, p, k, v: self.sent.append((t, p, k, v)),
            on_schema=self._on_schema,
            clock_ms=lambda: 42,
            on_letter=self.letters.append,
            max_event_bytes=self.max_event_bytes,
        )
        self.stream.handle(users_rel())
        self.stream.handle(products_rel())

    def _on_schema(self, route: TableRoute, _changes: list[str]) -> None:
        self.store.add(route.writer)

    def tx(self, *msgs: Any, lsn: int = LSN) -> None:
        self.stream.handle(Begin(lsn, 849_138_845_123_456, 7))
        for m in msgs:
            self.stream.handle(m)
        self.stream.handle(Commit(0, lsn, lsn + 8, 849_138_845_123_456))

    def records(self) -> list[dict[str, Any]]:
        return [self.store.decode(value)[1] for _t, _p, _k, value in self.sent]


def _bad_price(pid: int) -> tuple[Any, ...]:
    row = list(product(pid, 5))
    row[4] = b"NaN"
    return tuple(row)


def _no_value_in(letter: RowLetter, *values: bytes) -> None:
    shown = b"".join(v for _k, v in letter.headers() if isinstance(v, bytes))
    shown += letter.payload() + letter.describe().encode() + repr(letter.record()).encode()
    for value in values:
        assert value not in shown


def test_nan_in_a_decimal_withholds_that_row_only(mapping: MappingSpec) -> None:
    s = Stream(mapping)
    s.tx(Insert(PRODUCTS, product(1, 5)), Insert(PRODUCTS, _bad_price(2)), Insert(USERS, user(3)))
    (letter,) = s.letters
    assert (letter.table, letter.key, letter.lsn) == ("shop.products", '{"id": 2}', LSN)
    assert (letter.reason, letter.column, letter.domain) == (
        "non_finite_decimal",
        "price_idr",
        "merchant",
    )
    assert letter.message_key == b"5"  # the aggregate id: the merchant
    _no_value_in(letter, b"NaN")
    recs = s.records()
    assert [r["after"]["id"] for r in recs] == [1, 3]
    # The others keep a gap-free order, and each partition's last event still closes it.
    assert [r["source"]["seq"] for r in recs] == [0, 1]
    assert all(r["transaction"]["last_in_partition"] for r in recs)


def test_infinite_timestamp_is_named_by_column_and_key(mapping: MappingSpec) -> None:
    s = Stream(mapping)
    bad = (b"9", b"Ann", b"a@x", None, b"2026-01-01 00:00:00+00", b"infinity")
    s.tx(Update(USERS, None, None, bad), Insert(USERS, user(4)))
    (letter,) = s.letters
    assert (letter.table, letter.key) == ("shop.users", '{"id": 9}')
    assert (letter.reason, letter.column) == ("infinite_timestamp", "updated_at")
    _no_value_in(letter, b"infinity", b"Ann")
    assert [r["after"]["id"] for r in s.records()] == [4]


def test_the_decoder_raises_a_typed_value_free_error() -> None:
    bad = (b"9", b"Ann", b"a@x", None, b"-infinity", b"2026-01-01 00:00:00+00")
    with pytest.raises(UncarriableValue) as info:
        decode_tuple(users_rel(), bad)
    exc = info.value
    assert isinstance(exc, DecodeError)  # the stream stops on it when nothing handles it
    assert (exc.table, exc.column, exc.reason) == ("shop.users", "created_at", "infinite_timestamp")
    assert exc.row is not None and exc.row["id"] == 9 and exc.row["created_at"] is None
    with pytest.raises(UncarriableValue) as info:
        decode_tuple(users_rel(), (b"9", None, None, None, b"2026-13-45 00:00:00+00", None))
    assert info.value.reason == "timestamp_out_of_range"


def test_an_event_over_the_size_limit_is_withheld(mapping: MappingSpec) -> None:
    s = Stream(mapping, max_event_bytes=20_000)
    big = product(2, 5, desc=b"x" * 30_000)
    s.tx(Insert(PRODUCTS, big), Insert(PRODUCTS, product(3, 5, desc=b"y" * 10_000)))
    (letter,) = s.letters
    assert (letter.key, letter.reason, letter.column) == ('{"id": 2}', "message_too_large", None)
    assert [r["after"]["id"] for r in s.records()] == [3]


def test_the_size_limit_is_the_encoded_event(mapping: MappingSpec) -> None:
    s = Stream(mapping)
    s.tx(Insert(PRODUCTS, product(2, 5, desc="é€😀".encode() * 3000)))
    ((_t, _p, _k, value),) = s.sent
    exact = Stream(mapping, max_event_bytes=len(value))
    exact.tx(Insert(PRODUCTS, product(2, 5, desc="é€😀".encode() * 3000)))
    assert len(exact.sent) == 1 and exact.letters == []  # exactly at the limit: carried
    over = Stream(mapping, max_event_bytes=len(value) - 1)
    over.tx(Insert(PRODUCTS, product(2, 5, desc="é€😀".encode() * 3000)))
    assert over.sent == [] and [x.reason for x in over.letters] == ["message_too_large"]


def test_an_oversize_fix_does_not_clear_the_letter(mapping: MappingSpec) -> None:
    s = Stream(mapping, max_event_bytes=20_000)
    s.tx(Insert(PRODUCTS, _bad_price(2)), lsn=0x100)
    s.tx(Update(PRODUCTS, None, None, product(2, 5, desc=b"z" * 30_000)), lsn=0x200)
    assert s.stream.cleared == [] and len(s.letters) == 2
    assert s.stream.refused == {("shop.products", '{"id": 2}')}


def test_without_a_letter_callback_the_error_stops(mapping: MappingSpec) -> None:
    s = Stream(mapping)
    s.stream._on_letter = None
    with pytest.raises(UncarriableValue, match="price_idr"):
        s.tx(Insert(PRODUCTS, _bad_price(2)))


def test_a_later_full_image_clears_the_letter(mapping: MappingSpec) -> None:
    s = Stream(mapping)
    s.tx(Insert(PRODUCTS, _bad_price(2)), lsn=0x100)
    assert s.stream.refused == {("shop.products", '{"id": 2}')}
    # An update leaving a TOAST column unchanged does not: commerce would keep an old value.
    partial = list(product(2, 5))
    partial[3] = UNCHANGED
    s.tx(Update(PRODUCTS, None, None, tuple(partial)), lsn=0x200)
    assert s.stream.cleared == []
    s.tx(Update(PRODUCTS, None, None, product(2, 5)), lsn=0x300)
    assert s.stream.cleared == [("shop.products", '{"id": 2}', 0x300)]
    assert s.stream.refused == set()


def _users_route(s: Stream) -> TableRoute:
    cols = tuple(ColumnSpec(c.name, c.type_oid, c.type_modifier) for c in users_rel().columns)
    return s.stream.route_for("shop", "users", cols)


def test_a_snapshot_row_that_did_not_decode_is_a_letter(mapping: MappingSpec) -> None:
    s = Stream(mapping)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    good = {
        "id": 1,
        "display_name": "A",
        "email": None,
        "phone": None,
        "created_at": at,
        "updated_at": at,
    }
    error = UncarriableValue(
        "x", table="shop.users", column="updated_at", reason="infinite_timestamp"
    )
    refused = RefusedRow({**good, "id": 2, "updated_at": None}, error)
    window = ChunkWindow(
        chunk_id="1:1:abc", route=_users_route(s), rows={(1,): good, (2,): refused}, request_id=1
    )
    s.stream.add_window(window)
    low = LogicalMessage(True, 0, "cutover.snapshot.low", b"1:1:abc")
    high = LogicalMessage(True, 0, "cutover.snapshot.high", b"1:1:abc")
    s.tx(low, lsn=0x10)
    s.tx(high, lsn=0x20)
    (letter,) = s.letters
    assert (letter.key, letter.lsn, letter.reason) == ('{"id": 2}', 0x20, "infinite_timestamp")
    assert [r["after"]["id"] for r in s.records()] == [1]
    assert window.emitted == 1


def test_halt_names_table_key_lsn_and_the_resume_command() -> None:
    letter = RowLetter(
        "payment",
        "shop.payment",
        "shop.orders",
        '{"id": 7}',
        b"3",
        LSN,
        "non_finite_decimal",
        "total_idr",
    )
    text = halt_message(letter)
    for part in (
        "shop.orders",
        '{"id": 7}',
        "0/1A2B3C",
        "non_finite_decimal",
        "cutover snapshot --table orders",
    ):
        assert part in text
    headers = dict(letter.headers())
    assert headers["cutover.origin"] == b"producer"
    assert headers["cutover.lsn"] == b"0/1A2B3C"
    assert json.loads(letter.payload())["reason"] == "non_finite_decimal"


def test_row_key_is_json_of_the_primary_key() -> None:
    assert row_letters.row_key(
        ("order_id", "line_no"), {"order_id": 3, "line_no": 1, "qty": 9}
    ) == ('{"order_id": 3, "line_no": 1}')
