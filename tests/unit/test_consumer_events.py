"""consumers.events: decoded envelope records → typed changes (no services)."""

from __future__ import annotations

from typing import Any

import pytest

from consumers.events import HEARTBEAT_SCHEMA, Change, Heartbeat, from_record
from cutover.errors import DecodeError
from cutover.values import UNCHANGED

ENVELOPE = "cutover.shop.products.Envelope"


def _record(op: str = "u", **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "before": None,
        "after": {"id": 1, "merchant_id": 7, "description": None, "stock": 3},
        "source": {
            "version": "1",
            "connector": "cutover",
            "name": "shop",
            "ts_ms": 1700,
            "snapshot": "false",
            "db": "legacy",
            "schema": "shop",
            "table": "products",
            "txId": 9,
            "lsn": 4096,
            "seq": 2,
        },
        "op": op,
        "ts_ms": 1800,
        "transaction": {
            "id": "9:4096",
            "total_order": 3,
            "data_collection_order": 1,
            "last_in_partition": False,
        },
        "unchanged_toast": [],
    }
    rec.update(over)
    return rec


def test_update_carries_position_row_and_open_unit() -> None:
    event = from_record(ENVELOPE, _record())
    assert isinstance(event, Change)
    assert (event.schema, event.table, event.op) == ("shop", "products", "u")
    assert event.position == (4096, 2)
    assert event.ts_ms == 1700  # the source commit time, not the producer's
    assert event.row["stock"] == 3
    assert event.closes is False
    assert event.snapshot is False


def test_unchanged_toast_columns_are_restored_as_unchanged_not_null() -> None:
    event = from_record(ENVELOPE, _record(unchanged_toast=["description"]))
    assert isinstance(event, Change)
    assert event.row["description"] is UNCHANGED
    assert event.row["stock"] == 3


def test_unchanged_toast_naming_an_unknown_column_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="nope"):
        from_record(ENVELOPE, _record(unchanged_toast=["nope"]))


def test_last_in_partition_closes_the_unit() -> None:
    rec = _record()
    rec["transaction"]["last_in_partition"] = True
    assert from_record(ENVELOPE, rec).closes is True


def test_event_without_transaction_block_is_a_unit_of_its_own() -> None:
    assert from_record(ENVELOPE, _record(transaction=None)).closes is True


def test_snapshot_row_closes_and_is_marked() -> None:
    rec = _record("r")
    rec["source"]["snapshot"] = "true"
    event = from_record(ENVELOPE, rec)
    assert isinstance(event, Change)
    assert event.closes and event.snapshot


def test_delete_takes_the_before_row() -> None:
    rec = _record(
        "d", after=None, before={"id": 1, "merchant_id": 7, "description": None, "stock": None}
    )
    event = from_record(ENVELOPE, rec)
    assert isinstance(event, Change)
    assert event.op == "d"
    assert event.row["id"] == 1
    assert event.before is None


def test_update_keeps_before_for_key_changes() -> None:
    before = {"id": 0, "merchant_id": 7, "description": None, "stock": None}
    event = from_record(ENVELOPE, _record(before=before))
    assert isinstance(event, Change)
    assert event.before == before


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"op": "x"}, "op"),
        ({"after": None}, "after"),
        ({"source": {"lsn": 1}}, "schema"),
    ],
)
def test_malformed_records_are_decode_errors(over: dict[str, Any], message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        from_record(ENVELOPE, _record(**over))


def test_delete_without_before_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="before"):
        from_record(ENVELOPE, _record("d", after=None))


def test_heartbeat() -> None:
    event = from_record(HEARTBEAT_SCHEMA, {"ts_ms": 5, "lsn": 77, "producer": "p1"})
    assert event == Heartbeat(ts_ms=5, lsn=77, producer="p1")
    assert event.closes is True
