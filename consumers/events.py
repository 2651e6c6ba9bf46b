"""Decoded Avro records → typed change events, for the apply path (pure: no I/O).

The envelope format, its positions and the record → event function live in
:mod:`cutover.envelope`, shared with the producer that builds the records; this module names
what the consumer side uses of it; consumer modules import their event types from here.
"""

from __future__ import annotations

from cutover.envelope import (
    HEARTBEAT_SCHEMA,
    Change,
    Event,
    Heartbeat,
    Position,
    from_record,
)

__all__ = [
    "HEARTBEAT_SCHEMA",
    "Change",
    "Event",
    "Heartbeat",
    "Position",
    "from_record",
]
