"""Producer dead letters: classify a per-row conversion failure without echoing values.

A value the envelope cannot carry (NaN or +-infinity in a decimal, an infinite or
out-of-range timestamp, an event over the broker's message size limit) must stop one
row, not the stream.  This module holds the pure part of that rule: it turns the
exception raised while converting or producing one row into a short, value-free
reason and the Kafka headers of the producer's dead letter.  Column values never
appear: the error texts of the decoders echo the offending input (which may be a
social column), so the reason is rebuilt from the exception's class and a fixed
vocabulary instead of being copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Substrings of the known conversion messages, mapped to a value-free reason.  Order
# matters: the first match wins.
_KNOWN: Final = (
    ("has no avro decimal representation", "non_finite_decimal"),
    ("decimal precision is bigger", "decimal_precision_overflow"),
    ("msg_size_too_large", "message_too_large"),
    ("message size too large", "message_too_large"),
    ("cannot decode timestamp", "unrepresentable_timestamp"),
    ("cannot decode date", "unrepresentable_date"),
    ("cannot decode", "undecodable_value"),
)


@dataclass(frozen=True, slots=True)
class RowLetter:
    """What the producer publishes about one refused row: no column values."""

    table: str
    key: str
    lsn: int
    error_class: str
    reason: str

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers, in the spirit of the consumer's (``cutover.*``)."""
        return [
            ("cutover.origin", b"producer"),
            ("cutover.table", self.table.encode()),
            ("cutover.key", self.key.encode()),
            ("cutover.lsn", str(self.lsn).encode()),
            ("cutover.error_class", self.error_class.encode()),
            ("cutover.error", self.reason.encode()),
        ]


def classify(exc: BaseException) -> str | None:
    """Return the value-free reason for a per-row failure, or None if not per-row.

    None means the failure is not about one row's values (a broker outage, a bug):
    the producer must keep failing loudly for those.
    """
    text = str(exc).lower()
    for needle, reason in _KNOWN:
        if needle in text:
            return reason
    if isinstance(exc, OverflowError):  # date/time constructors out of range
        return "value_out_of_range"
    return None


def letter_for(exc: BaseException, *, table: str, key: str, lsn: int) -> RowLetter | None:
    """The dead letter for ``exc`` on one row, or None when it is not a per-row error."""
    reason = classify(exc)
    if reason is None:
        return None
    return RowLetter(table, key, lsn, type(exc).__name__, reason)
