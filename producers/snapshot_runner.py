"""Snapshot requests, run chunk by chunk alongside the change stream (DBLog).

The producer asks :class:`SnapshotRunner` at each turn of its loop to start the next chunk of
the oldest open request (:meth:`SnapshotRunner.maybe_start_chunk`, which reads the chunk with
:mod:`producers.snapshot` and opens its watermark window in the stream), and tells it after step 5
of the commit protocol which windows completed (:meth:`SnapshotRunner.chunk_done`): only then,
with the chunk's rows acknowledged and the slot past its high watermark, is progress recorded in
``snapshot_progress``, so a killed producer resumes with that chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from cutover.config import Settings
from cutover.control_store import ControlStore
from cutover.control_store import producer as producer_state
from cutover.errors import CutoverError
from cutover.mapping import MappingSpec
from producers import coverage, snapshot
from producers.events import ChangeStream, ChunkWindow
from producers.pgoutput import lsn_to_str

_REQUEST_POLL_S: Final = 1.0
# Key chunks re-reading rows changed with unchanged TOAST values inside a window, at most.
_MAX_REREADS: Final = 5

ProgressCallback = Callable[[dict[str, Any]], None]


class SnapshotRunner:
    """The snapshot request in progress, and what its next chunk must read."""

    def __init__(
        self,
        settings: Settings,
        store: ControlStore,
        mapping: MappingSpec,
        stream: ChangeStream,
        *,
        log: Any,
        progress: ProgressCallback | None = None,
        watch_capture: bool = False,
    ) -> None:
        self.settings = settings
        self.watch_capture = watch_capture
        self.store = store
        self.mapping = mapping
        self.stream = stream
        self.log = log
        self.progress = progress
        self.request: producer_state.SnapshotRequest | None = None
        self._polled = 0.0
        self._estimate: int | None = None
        self._reread_parent: ChunkWindow | None = None

    def poll(self, *, force: bool = False) -> bool:
        """Pick the oldest open snapshot request (polled at most once a second)."""
        if self.request is not None:
            return True
        now = time.monotonic()
        if not force and now - self._polled < _REQUEST_POLL_S:
            return False
        self._polled = now
        requests = producer_state.open_requests(self.store, self.settings.source.slot)
        if not requests:
            return False
        request = requests[0]
        if request.status == "pending":
            producer_state.mark_request(self.store, request.id, "running")
            self.log.info(
                "snapshot.started",
                table=request.source_table,
                request=request.id,
                kind=request.kind,
                where=request.where_sql,
            )
        self.request = request
        self._estimate = snapshot.estimate_rows(
            self.store.conn, self.mapping.source_schema, request.source_table
        )
        return True

    def maybe_start_chunk(self) -> None:
        if self.stream.windows or not self.poll():
            return
        request = self.request
        assert request is not None
        if not snapshot.request_is_open(self.store.conn, request.id):
            self.log.warning("snapshot.cancelled", table=request.source_table, request=request.id)
            self.request = None
            return
        tm = self.mapping.tables.get(request.source_table)
        if tm is None:
            self._fail_request(request, "table is not in the mapping")
            return
        schema = self.mapping.source_schema
        if self.watch_capture:
            # A table that left the publication while its snapshot waited is a capture loss,
            # the same stop as mid-stream (exit 3, CAPTURE BLOCKED), not a usage error.
            coverage.check_publication(
                self.store.conn, self.settings.source.publication, self.mapping
            )
        columns = snapshot.published_column_specs(
            self.store.conn, self.settings.source.publication, schema, tm.source_table
        )
        route = self.stream.route_for(schema, tm.source_table, columns)
        parent = self._reread_parent
        keys: tuple[tuple[object, ...], ...] = ()
        if parent is not None:
            keys = tuple(parent.reread)
            parent.reread = []
            self._reread_parent = None
        try:
            chunk = snapshot.read_chunk(
                self.store.conn,
                schema=schema,
                table=tm.source_table,
                columns=columns,
                primary_key=tm.primary_key,
                request=request,
                last_pk=request.last_pk,
                chunk_rows=self.settings.source.snapshot_chunk_rows,
                keys=keys,
            )
        except CutoverError as exc:
            reason = snapshot.request_fault(exc)
            if reason is None:
                raise
            self._fail_request(request, reason)
            return
        self.stream.add_window(
            ChunkWindow(
                chunk_id=chunk.chunk_id,
                route=route,
                rows=chunk.rows,
                request_id=request.id,
                last_pk=chunk.last_pk,
                selected=chunk.selected,
                final=chunk.final,
                parent=parent,
                keys=keys,
                attempt=parent.attempt + 1 if parent is not None else 0,
            )
        )

    def _fail_request(self, request: producer_state.SnapshotRequest, reason: str) -> None:
        """Mark a request failed for its own fault (it stays visible in ``snapshot --list``)."""
        producer_state.mark_request(self.store, request.id, "failed", reason)
        self.log.error(
            "snapshot.failed", table=request.source_table, request=request.id, error=reason
        )
        self.request = None

    def chunk_done(self, window: ChunkWindow) -> None:
        """After step 5: record a chunk's progress, or schedule what must be read again."""
        request = self.request
        if request is None or request.id != window.request_id:
            return
        root = window.parent or window
        if window.state == "fenced":
            # Judged at the high watermark, in WAL order: the stream's fence state at the start
            # of a chunk may be behind a raise or a lower the database has already seen.
            self._fail_request(request, snapshot.fenced_reason(window.route.mapping.domain))
            return
        if window.state == "failed":
            self.log.warning("snapshot.chunk_retry", chunk=window.chunk_id)
            if window.parent is not None:
                window.parent.reread.extend(window.keys)
                self._reread_parent = window.parent
            return  # a range chunk is simply read again under new watermarks
        if window.parent is not None:
            root.emitted += window.emitted
        if window.reread:
            if window.attempt < _MAX_REREADS:
                # Rows the stream changed with unchanged TOAST values inside the window: read
                # them again before the chunk counts as done (progress is not recorded yet).
                root.reread = list(window.reread)
                root.attempt = window.attempt
                self._reread_parent = root
                self.log.info("snapshot.reread", chunk=window.chunk_id, keys=len(window.reread))
                return
            self.log.warning(
                "snapshot.reread_gave_up",
                chunk=window.chunk_id,
                keys=len(window.reread),
                note="rows updated continuously with unchanged TOAST values",
            )
        producer_state.record_progress(
            self.store, request.id, root.last_pk, root.emitted, done=root.final
        )
        rows = request.rows_emitted + root.emitted
        event = {
            "table": request.source_table,
            "request": request.id,
            "chunk": request.chunks + 1,
            "selected": root.selected,
            "emitted": root.emitted,
            "dropped": root.dropped,
            "rows": rows,
            "estimate": self._estimate,
            "done": root.final,
            "lsn": lsn_to_str(window.high_lsn),
        }
        self.log.info("snapshot.chunk_done", **event)
        if self.progress is not None:
            self.progress(event)
        if root.final:
            self.log.info(
                "snapshot.done", table=request.source_table, request=request.id, rows=rows
            )
            self.request = None
        else:
            self.request = replace(
                request,
                status="running",
                last_pk=root.last_pk,
                rows_emitted=rows,
                chunks=request.chunks + 1,
            )
