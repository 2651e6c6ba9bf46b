"""Pure parser for the pgoutput logical replication protocol, version 1.

The CDC producer reads changes with::

    pg_logical_slot_peek_binary_changes(slot, NULL, n,
        'proto_version', '1', 'publication_names', 'pub', 'messages', 'true')

Each row's ``data`` is one pgoutput message whose first byte names its type. This module turns
those bytes into frozen dataclasses and does no I/O, so it can be tested with hand-built bytes
and reused by anything that holds the messages (SQL interface or a walsender stream).

Two layers, deliberately separate:

1. :func:`parse_message` — protocol framing only. Column values stay *raw*: ``None`` for SQL
   NULL (kind ``n``), :data:`~cutover.values.UNCHANGED` for an unchanged TOAST value (kind
   ``u``, which is not NULL: the applier must keep what it has), or ``bytes`` holding the
   still-encoded text output of the column's type (kind ``t``). A binary-format value (kind
   ``b``, only sent when the ``binary`` option is on) is kept as a :class:`BinaryValue`, a
   ``bytes`` subclass, so nobody can mistake it for text.
2. :func:`decode_tuple` / :func:`decode_value` — PostgreSQL *text* output format to typed Python
   values, keyed by type OID. Unknown OIDs decode to ``str``.

Assumptions about the decoding session (the one that calls the SQL function, because the type
output functions run with its settings):

* ``DateStyle`` is ``ISO`` (the default). Other styles make date/time columns fail loudly.
* ``bytea_output`` is ``hex`` (the default); ``escape`` is accepted too.
* ``extra_float_digits`` is at its default (1): since PostgreSQL 12 floats are then printed in
  the shortest form that round-trips exactly.
* The database encoding is UTF-8; names and text values are decoded as UTF-8.

Choices that are not forced by the protocol:

* ``timestamp``/``timestamptz``/``date`` values ``infinity`` and ``-infinity``, BC dates and years
  after 9999 have no :mod:`datetime` equivalent. They raise :class:`DecodeError` rather than being
  clamped to ``datetime.max``/``min``, which would silently change the value and compare equal to
  a real timestamp. The caller treats the row as a poison message.
* ``json``/``jsonb`` decode to their text (``str``), not to parsed objects: ``json.loads`` turns
  numbers into floats (losing digits), drops duplicate keys and would not round-trip to the exact
  text the source holds. Whoever needs the structure parses the string.
* :func:`decode_tuple` refuses binary-format values: their bytes are the type's ``send`` format,
  and running a text converter over them would produce garbage without an error.

Strictness: every message must be consumed exactly; trailing bytes are an error. That is what
catches a peer that speaks another protocol version (e.g. streamed transactions carry an extra
xid) instead of mis-reading it.
"""

from __future__ import annotations

from cutover.envelope import lsn_to_str, str_to_lsn
from producers.pgoutput.messages import (
    PG_EPOCH,
    Begin,
    BinaryValue,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    OldKind,
    Origin,
    RawTuple,
    RawValue,
    Relation,
    Truncate,
    TypeMsg,
    Update,
    pg_ts_to_datetime,
)
from producers.pgoutput.parser import parse_message
from producers.pgoutput.values import decode_tuple, decode_value

__all__ = [
    "PG_EPOCH",
    "Begin",
    "BinaryValue",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "OldKind",
    "Origin",
    "RawTuple",
    "RawValue",
    "Relation",
    "Truncate",
    "TypeMsg",
    "Update",
    "decode_tuple",
    "decode_value",
    "lsn_to_str",
    "parse_message",
    "pg_ts_to_datetime",
    "str_to_lsn",
]
