"""Unit tests for the pure classification of producer per-row conversion errors."""

from __future__ import annotations

from producers.row_letters import classify, letter_for


def test_nan_decimal_is_a_row_error() -> None:
    assert classify(ValueError("NaN has no Avro decimal representation")) == "non_finite_decimal"


def test_infinite_timestamp_is_a_row_error_and_hides_the_value() -> None:
    exc = ValueError("cannot decode timestamptz (oid 1184) from b'infinity': bad")
    letter = letter_for(exc, table="shop.orders", key='{"id": 7}', lsn=42)
    assert letter is not None
    assert letter.reason == "unrepresentable_timestamp"
    headers = dict(letter.headers())
    assert headers["cutover.origin"] == b"producer"
    assert headers["cutover.lsn"] == b"42"
    assert b"infinity" not in b"".join(headers.values())


def test_oversized_message_is_a_row_error() -> None:
    assert classify(RuntimeError("KafkaError MSG_SIZE_TOO_LARGE")) == "message_too_large"


def test_overflow_is_a_row_error() -> None:
    assert classify(OverflowError("date value out of range")) == "value_out_of_range"


def test_other_failures_are_not_row_errors() -> None:
    assert classify(ConnectionError("broker down")) is None
    assert letter_for(ConnectionError("x"), table="t", key="k", lsn=1) is None
