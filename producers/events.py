"""Pure core of the CDC producer: decoded pgoutput messages in, encoded Kafka records out.

Nothing here does I/O. :class:`ChangeStream` is fed the pgoutput messages of a slot in order
and calls ``emit(topic, partition, key, value)`` for every record to produce, so the whole
decoding / routing / hold-back / snapshot-window logic is unit-tested with hand-built messages.

Rules implemented here and in the modules it uses (docs/ARCHITECTURE.md is the contract):

* **Routing** (:mod:`producers.routes`): a change of source table T goes to
  ``<prefix>.<domain of T>``, keyed by its aggregate id, in partition ``crc32(key) % partitions``.
* **Hold-back** (:class:`~producers.windows.HoldBack`): the latest event of the open transaction
  is kept back per (topic, partition) so the last one in each partition can be marked.
* **Envelope** (:mod:`cutover.envelope`): the records are built there, field by name.
* **Positions**: ``source.lsn`` is the commit LSN (``Begin.final_lsn``), ``source.seq`` the
  0-based ordinal of the event among the published events of its transaction; re-reading the
  same WAL yields the same (lsn, seq), so duplicates after a crash are recognisable.
* **No echo**: a transaction whose Origin message names one of our replication origins
  (:func:`cutover.origin.is_ours`: an applier of the other direction wrote it) produces no
  event; its Commit still counts, so the slot advances past it (``echo_dropped`` counts them).
* **Fenced domains** (:mod:`cutover.fence`): between a ``cutover.fence`` message that raises a
  domain's write fence on this database and the next that lowers it, the domain's row changes
  are dropped (``fence_dropped`` counts them). The fence admits only appliers (not echoed anyway)
  and, where it is narrowed, UPDATEs of columns the other side never holds, whose whole-row
  image could carry mapped values older than the other side's by then.
* **TRUNCATE** (:mod:`producers.truncates`): per table, a ``cutover.Truncate`` record to every
  partition of its topic through the hold-back (so in commit order in each partition), all
  copies at one position; or a stop before it, per the table's ``on_truncate``.
* **Snapshot windows** (DBLog, :class:`~producers.windows.ChunkWindow`): between a chunk's low
  and high watermark every key changed in the stream is dropped from the chunk; at the high
  watermark the rest is emitted as op ``r`` at the high watermark's commit LSN, so a streamed
  change always wins.
* **Dead letters** (:mod:`producers.row_letters`): a row the envelope cannot carry (a value, or
  an event over ``max_event_bytes``) is withheld and handed to ``on_letter``; the rest of its
  transaction flows. Without ``on_letter`` the error propagates (the producer stops).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cutover import codec
from cutover import envelope as env
from cutover.codec import ColumnSpec, WriterSchema
from cutover.envelope import HEARTBEAT_KEY, heartbeat_record
from cutover.errors import DecodeError, UncarriableValue, UnmappableRow
from cutover.fence import FENCE_MESSAGE_PREFIX, parse_fence_message
from cutover.mapping import MappingSpec, TableMapping
from cutover.origin import is_ours
from producers import pgoutput, row_letters, truncates
from producers.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    Truncate,
    Update,
)
from producers.pgoutput.rows import ROW_KINDS, read_change
from producers.routes import (
    Encoder,
    Pending,
    SourceInfo,
    TableRoute,
    avro_row,
    build_route,
    encode_change,
    partition_for,
)
from producers.windows import ChunkWindow, HoldBack, WindowSet

__all__ = [
    "HEARTBEAT_KEY",
    "HEARTBEAT_PREFIX",
    "SNAPSHOT_HIGH_PREFIX",
    "SNAPSHOT_LOW_PREFIX",
    "ChangeStream",
    "ChunkWindow",
    "HoldBack",
    "SourceInfo",
    "TableRoute",
    "TxContext",
    "avro_row",
    "build_route",
    "heartbeat_record",
    "partition_for",
    "pg_time_to_ms",
]

HEARTBEAT_PREFIX: Final = "cutover.heartbeat"
SNAPSHOT_LOW_PREFIX: Final = "cutover.snapshot.low"
SNAPSHOT_HIGH_PREFIX: Final = "cutover.snapshot.high"
# Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 UTC).
_PG_EPOCH_US: Final = 946_684_800_000_000

Emit = Callable[[str, int, bytes, bytes], None]


def pg_time_to_ms(pg_us: int) -> int:
    """A protocol timestamp (µs since 2000-01-01 UTC) as Unix milliseconds."""
    return (pg_us + _PG_EPOCH_US) // 1000


@dataclass(frozen=True, slots=True)
class TxContext:
    """The source transaction being read (from its Begin message)."""

    xid: int
    commit_lsn: int
    ts_ms: int


class ChangeStream:
    """Turns the pgoutput messages of one slot into encoded Kafka records (see module doc).

    Callbacks (all synchronous, called before any event that depends on them is emitted):

    * ``emit(topic, partition, key, value)``: produce one record;
    * ``on_schema(route, changes)``: a writer schema not seen before is about to be used; the
      callee publishes it to the schemas topic (and waits for the ack) before returning.
      ``changes`` describes a compatible evolution (empty for a table's first schema);
    * ``on_message(message, tx)``: a logical message other than our watermarks;
    * ``on_letter(letter)``: a row was withheld (:mod:`producers.row_letters`).

    ``fenced_domains`` are the domains whose write fence was up at the stream's start position
    (:func:`cutover.fence.fenced_at`); ``fenced`` follows the fence messages from there.

    ``refused`` holds (table, row key) of the withheld rows still open; a later full image of
    one is delivered normally and listed in ``cleared`` (table, row key, LSN) for the producer
    to resolve once it is acknowledged.
    """

    def __init__(
        self,
        mapping: MappingSpec,
        source: SourceInfo,
        *,
        partitions: Mapping[str, int],
        topic_for: Callable[[str], str],
        emit: Emit,
        on_schema: Callable[[TableRoute, list[str]], None],
        known_columns: Mapping[str, tuple[ColumnSpec, ...]] | None = None,
        clock_ms: Callable[[], int],
        encoder_factory: Callable[[WriterSchema], Encoder] | None = None,
        on_message: Callable[[LogicalMessage, TxContext | None], None] | None = None,
        on_letter: Callable[[row_letters.RowLetter], None] | None = None,
        max_event_bytes: int | None = None,
        carry_truncates: Collection[truncates.Carry] = (),
        fenced_domains: Collection[str] = (),
    ) -> None:
        self._mapping = mapping
        self._source = source
        self._partitions = dict(partitions)
        self._topic_for = topic_for
        self._emit = emit
        self._on_schema = on_schema
        self._on_message = on_message
        self._clock_ms = clock_ms
        self._encoder_factory = encoder_factory
        self._on_letter = on_letter
        self._max_event_bytes = max_event_bytes
        self.refused: set[tuple[str, str]] = set()
        self.cleared: list[tuple[str, str, int]] = []
        self._carry = frozenset(carry_truncates)
        self.fenced: set[str] = set(fenced_domains)
        # The producer publishes this schema at start, before any event can use it.
        self.truncate_writer = codec.writer_schema(codec.truncate_schema())
        factory = encoder_factory or (lambda ws: lambda rec: codec.encode(ws, rec))
        self._truncate_encoder = factory(self.truncate_writer)
        self.truncates = 0
        # Last column list per schema.table: persisted ones first, then what the stream showed.
        self._columns: dict[str, tuple[ColumnSpec, ...]] = dict(known_columns or {})
        self._routes: dict[int, TableRoute] = {}  # relation oid -> route
        self._relations: dict[int, Relation] = {}
        self._route_cache: dict[tuple[str, tuple[ColumnSpec, ...]], TableRoute] = {}
        self._hold: HoldBack[Pending] = HoldBack()
        self._chunks = WindowSet()
        self._window_ids = self._chunks.by_id  # the same dict: tested once per change
        self.tx: TxContext | None = None
        # The open transaction came from one of our appliers: its changes are not events.
        self._echo = False
        self._seq = 0
        self._per_table: dict[str, int] = {}
        # Progress counters, read by the producer loop.
        self.events = 0
        self.events_by_topic: dict[str, int] = {}
        self.snapshot_rows = 0
        self.transactions = 0
        #: Transactions dropped because an applier of the other direction wrote them.
        self.echo_dropped = 0
        #: Row changes dropped because their domain's write fence was up (see module doc).
        self.fence_dropped = 0
        self.changes_in_batch = 0
        self.last_commit_end_lsn: int | None = None

    # -- snapshot windows ----------------------------------------------------------------------

    def add_window(self, window: ChunkWindow) -> None:
        """Register a chunk whose watermarks are (or will be) in the stream."""
        self._chunks.add(window)

    @property
    def windows(self) -> Mapping[str, ChunkWindow]:
        return self._chunks.by_id

    @property
    def completed_chunks(self) -> list[ChunkWindow]:
        """Chunks done (emitted, failed or fenced); the producer records and clears them."""
        return self._chunks.completed

    def forget_windows(self) -> None:
        self._chunks.forget()

    # -- routing -------------------------------------------------------------------------------

    def route_for(self, schema: str, table: str, columns: Sequence[ColumnSpec]) -> TableRoute:
        """The route of ``schema.table`` with these published columns (cached; may publish)."""
        qualified = f"{schema}.{table}"
        cols = tuple(columns)
        cached = self._route_cache.get((qualified, cols))
        if cached is not None:
            return cached
        tm = self._table_mapping(schema, table)
        previous = self._columns.get(qualified)
        changes = (
            codec.check_evolution(qualified, previous, cols)
            if previous is not None and previous != cols
            else []
        )
        topic = self._topic_for(tm.domain)
        partitions = self._partitions.get(topic)
        if partitions is None:
            raise UnmappableRow(qualified, None, f"topic {topic} of domain {tm.domain} is unknown")
        route = build_route(
            tm,
            schema,
            cols,
            topic=topic,
            partitions=partitions,
            source=self._source,
            encoder_factory=self._encoder_factory,
        )
        self._on_schema(route, changes)
        self._route_cache[(qualified, cols)] = route
        self._columns[qualified] = cols
        return route

    def _table_mapping(self, schema: str, table: str) -> TableMapping:
        tm = self._mapping.tables.get(table)
        if tm is None or schema != self._mapping.source_schema:
            raise UnmappableRow(
                f"{schema}.{table}",
                None,
                "the table is published but not in the mapping; remove it from the "
                "publication or add it to the mapping, then re-run cutover init",
            )
        return tm

    # -- feeding -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Handle one raw pgoutput message (a row change by the fused path when it can)."""
        if type(data) is bytes and data and data[0] in ROW_KINDS and self._row_change(data):
            return
        self.handle(pgoutput.parse_message(data))

    def _row_change(self, data: bytes) -> bool:
        """A row change of a known relation by the fused path (:func:`read_change`); False:
        anything else, for the strict path."""
        change = read_change(data, self._relations)
        route = self._routes.get(change[0]) if change is not None else None
        if change is None or route is None:
            return False
        self._change(route, *change[1:])
        return True

    def handle(self, msg: pgoutput.Message) -> None:
        kind = type(msg)
        if kind is Insert:
            assert isinstance(msg, Insert)
            route, rel = self._route_rel(msg.relation_oid)
            row = self._decode(route, rel, msg.new)
            if row is not None:
                self._change(route, "c", None, row)
        elif kind is Update:
            assert isinstance(msg, Update)
            route, rel = self._route_rel(msg.relation_oid)
            row = self._decode(route, rel, msg.new)
            old = self._decode(route, rel, msg.old) if msg.old is not None else None
            if row is not None and (old is not None or msg.old is None):
                self._change(route, "u", old, row)
        elif kind is Delete:
            assert isinstance(msg, Delete)
            route, rel = self._route_rel(msg.relation_oid)
            old = self._decode(route, rel, msg.old)
            if old is not None:
                self._change(route, "d", old, None)
        elif kind is Begin:
            assert isinstance(msg, Begin)
            self.tx = TxContext(msg.xid, msg.final_lsn, pg_time_to_ms(msg.commit_time_us))
            self._seq = 0
            self._echo = False
            self._per_table.clear()
        elif kind is Commit:
            assert isinstance(msg, Commit)
            self._commit(msg)
        elif kind is Relation:
            assert isinstance(msg, Relation)
            self._relation(msg)
        elif kind is LogicalMessage:
            assert isinstance(msg, LogicalMessage)
            self._logical_message(msg)
        elif kind is Origin:
            assert isinstance(msg, Origin)
            self._echo = self.tx is not None and is_ours(msg.name)
        elif kind is Truncate:
            assert isinstance(msg, Truncate)
            self._truncate(msg)
        # Type messages carry nothing the events need.

    def _lsn_text(self) -> str:
        return env.lsn_to_str(self.tx.commit_lsn) if self.tx else "?"

    def _relation(self, rel: Relation) -> None:
        self._relations[rel.oid] = rel
        cols = tuple(ColumnSpec(c.name, c.type_oid, c.type_modifier) for c in rel.columns)
        self._routes[rel.oid] = self.route_for(rel.namespace, rel.name, cols)

    def _decode(
        self, route: TableRoute, rel: Relation, raw: pgoutput.RawTuple
    ) -> dict[str, object] | None:
        """The decoded tuple, or None when a value did not decode (the row is withheld)."""
        try:
            return pgoutput.decode_tuple(rel, raw)
        except UncarriableValue as exc:
            self._refuse(exc, route, exc.row or {})
            return None

    def _refuse(self, exc: UncarriableValue, route: TableRoute, row: Mapping[str, object]) -> None:
        """Withhold one row: its letter goes to ``on_letter`` (no callback: the error stops)."""
        if self._on_letter is None:
            raise exc
        letter = row_letters.letter_for(exc, route, row, self.tx.commit_lsn if self.tx else 0)
        self.refused.add((letter.table, letter.key))
        self._on_letter(letter)

    def _clear(self, route: TableRoute, row: Mapping[str, object], lsn: int) -> None:
        """A full image of a withheld row is being delivered: its letter can be resolved."""
        refused = (route.qualified, row_letters.row_key(route.mapping.primary_key, row))
        if refused in self.refused:
            self.refused.discard(refused)
            self.cleared.append((*refused, lsn))

    def _route_rel(self, oid: int) -> tuple[TableRoute, Relation]:
        try:
            return self._routes[oid], self._relations[oid]
        except KeyError:
            raise DecodeError(
                f"change for relation oid {oid} before its Relation message"
            ) from None

    def _change(
        self,
        route: TableRoute,
        op: str,
        old: dict[str, object] | None,
        new: dict[str, object] | None,
    ) -> None:
        tx = self.tx
        if tx is None:
            raise DecodeError("pgoutput change outside a transaction (no Begin message)")
        if self._window_ids:
            # An echoed change too: the row's value came from the other side, which holds it;
            # a chunk row read before it must not overwrite it there.
            self._chunks.drop_changed(route, old, new)
        if self._echo:
            return
        if self.fenced and route.mapping.domain in self.fenced:
            self.fence_dropped += 1
            return
        keyed = new if new is not None else old
        assert keyed is not None
        key, partition = route.key_bytes_of(keyed)
        seq = self._seq
        table = route.table
        order = self._per_table.get(table, 0) + 1
        try:
            pending = encode_change(
                route, op, old, new, tx=tx, seq=seq, order=order, now_ms=self._clock_ms()
            )
        except UncarriableValue as exc:
            # Before seq and order are taken: the transaction's other events keep theirs.
            self._refuse(exc, route, keyed)
            return
        self._seq = seq + 1
        self._per_table[table] = order
        pending.key = key
        pending.partition = partition
        previous = self._hold.push(route.topic, partition, pending)
        if previous is not None:
            self._send(previous)
        self.changes_in_batch += 1

    def _truncate(self, msg: Truncate) -> None:
        """A TRUNCATE: stop per policy, or one truncate record per table to every partition."""
        tx = self.tx
        if tx is None:
            raise DecodeError("pgoutput TRUNCATE outside a transaction (no Begin message)")
        if self._echo:
            return  # an applier of the other direction wrote it: no event (no echo)
        routes = [self._route_rel(oid)[0] for oid in msg.relation_oids]
        stops = [
            r.qualified
            for r in routes
            if r.mapping.on_truncate == "stop"
            and truncates.Carry(r.qualified, tx.commit_lsn) not in self._carry
        ]
        if stops:
            raise truncates.stopped(stops, tx.commit_lsn, tx.xid)
        now = self._clock_ms()
        for route in routes:
            self._chunks.truncated(route.qualified)
            seq = self._seq
            self._seq = seq + 1
            order = self._per_table.get(route.table, 0) + 1
            self._per_table[route.table] = order
            key = f"__truncate__{route.qualified}".encode()
            for partition in range(route.partitions):
                record = env.truncate_record(
                    route.source_block,
                    position=(tx.commit_lsn, seq),
                    tx_id=tx.xid,
                    commit_ms=tx.ts_ms,
                    now_ms=now,
                    transaction=env.transaction_block(tx.xid, tx.commit_lsn, seq + 1, order),
                    cascade=msg.cascade,
                    restart_identity=msg.restart_identity,
                )
                pending = Pending(route, key, partition, record, self._truncate_encoder)
                previous = self._hold.push(route.topic, partition, pending)
                if previous is not None:
                    self._send(previous)
            self.changes_in_batch += 1
            self.truncates += 1

    def _send(self, pending: Pending) -> None:
        route = pending.route
        if pending.encoder is not None:  # a truncate record: small, and it carries no row
            assert pending.record is not None
            value = pending.encoder(pending.record)
        else:
            if pending.value is not None:
                value = bytes(pending.value)
            else:
                assert pending.record is not None
                value = route.encoder(pending.record)
            if self._oversize(route, pending, value):
                return
        self._emit(route.topic, pending.partition, pending.key, value)
        self.events += 1
        topic = route.topic
        self.events_by_topic[topic] = self.events_by_topic.get(topic, 0) + 1

    def _oversize(self, route: TableRoute, pending: Pending, value: bytes) -> bool:
        """Withhold an event over the size limit (True); else note a withheld row it carries.

        Checked on the encoded value, which is produced anyway: free for every other event.
        The event's seq is then missing from its transaction (consumers need no gap-free seq)
        and, if it was the last one of its partition, the unit closes at the next heartbeat.
        """
        row = pending.row
        assert row is not None
        limit = self._max_event_bytes
        if limit is not None and len(value) > limit:
            message = f"{route.qualified}: the event is {len(value)} bytes, over the limit {limit}"
            exc = UncarriableValue(
                message, table=route.qualified, column=None, reason="message_too_large"
            )
            self._refuse(exc, route, row)
            return True
        if self.refused and not pending.partial and self.tx is not None:
            self._clear(route, row, self.tx.commit_lsn)
        return False

    def _commit(self, msg: Commit) -> None:
        for pending in self._hold.drain():
            pending.mark_last()
            self._send(pending)
        if self._chunks.closing:
            tx = self.tx
            assert tx is not None
            self._chunks.emit_closing(
                tx.commit_lsn,
                self.fenced,
                self._clock_ms,
                lambda route, row, index, now: self._snapshot_row(route, row, tx, index, now),
            )
        if self._echo:
            self.echo_dropped += 1
            self._echo = False
        self.tx = None
        self.transactions += 1
        self.last_commit_end_lsn = msg.end_lsn

    def _logical_message(self, msg: LogicalMessage) -> None:
        prefix = msg.prefix
        if prefix in (SNAPSHOT_LOW_PREFIX, SNAPSHOT_HIGH_PREFIX):
            chunk_id = msg.content.decode("utf-8", "replace")
            self._chunks.watermark(prefix == SNAPSHOT_LOW_PREFIX, chunk_id, self.tx is not None)
            return
        if prefix == FENCE_MESSAGE_PREFIX:
            fence = parse_fence_message(msg.content)
            if fence is not None:
                domain, fenced = fence
                if fenced:
                    self.fenced.add(domain)
                else:
                    self.fenced.discard(domain)
            return
        if self._on_message is not None:
            self._on_message(msg, self.tx)

    def _snapshot_row(
        self, route: TableRoute, row: dict[str, object], tx: TxContext, index: int, now: int
    ) -> bool:
        """Emit one row of a closing chunk as op ``r`` at the high watermark's position
        (``index`` is its seq); False when it is withheld."""
        if isinstance(row, row_letters.RefusedRow):  # a value that did not decode
            self._refuse(row.error, route, row)
            return False
        key, partition = route.key_bytes_of(row)
        try:
            pending = encode_change(
                route, env.SNAPSHOT_OP, None, row, tx=tx, seq=index, order=None, now_ms=now
            )
        except UncarriableValue as exc:
            self._refuse(exc, route, row)
            return False
        pending.key, pending.partition = key, partition
        value = bytes(pending.value) if pending.value is not None else b""
        if pending.record is not None:
            value = route.encoder(pending.record)
        if self._oversize(route, pending, value):
            return False
        self._emit(route.topic, partition, pending.key, value)
        self.snapshot_rows += 1
        return True

    @property
    def in_transaction(self) -> bool:
        return self.tx is not None

    def reset_batch_counters(self) -> None:
        self.changes_in_batch = 0
