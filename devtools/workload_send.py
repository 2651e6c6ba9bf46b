"""The workload's wire: planned transactions sent through libpq's pipeline mode directly.

Why not ``cursor.execute`` inside ``conn.pipeline()``: psycopg's pipeline runs its Python
result-processing generator after every ``execute`` (and flushes the socket each time), which
cost ~190 µs of client CPU and ~200 µs of the backend's per workload transaction, more than the
pipeline being measured spends on the transaction's events. Here each batch of transactions is
queued with ``PQsendQueryPrepared`` (statements prepared once per connection, parameters
dumped to text by psycopg's own adapters, the server infers their types from the statement),
sent with one flush, and its results read up to the sync point: ~25 µs of client CPU and
~120 µs of the backend per transaction (``bench/workload_rate.py``; figures in the README).

The commit protocol is unchanged: every transaction is BEGIN, its statements, COMMIT (or
ROLLBACK); a batch counts only once its sync came back without error, and the first error of a
batch is raised as the :class:`psycopg.Error` PostgreSQL reported (the rest of the batch was
skipped by the server).
"""

from __future__ import annotations

import re
import select
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import psycopg
from psycopg import errors, pq
from psycopg.adapt import PyFormat, Transformer

if TYPE_CHECKING:
    from devtools.workload import Operation

__all__ = ["PipelineSender", "numbered"]

_PLACEHOLDER: Final = re.compile(r"%s")


def numbered(text: str) -> bytes:
    """``%s`` placeholders to ``$1 .. $n`` (the statements are constants with no other ``%``)."""
    if "%" in _PLACEHOLDER.sub("", text):
        raise ValueError(f"only %s placeholders are supported: {text!r}")
    count = iter(range(1, text.count("%s") + 1))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", text).encode()


class PipelineSender:
    """Sends batches of planned transactions over one autocommit connection (module doc)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._pg = conn.pgconn
        self._encoding = conn.info.encoding
        self._dumper = Transformer(conn)
        self._names: dict[str, bytes] = {}

    def send(self, ops: Iterable[Operation]) -> None:
        """Run the transactions of ``ops`` as one pipelined batch; raise the first error (the
        sender is not used again after an error: the workload stops there)."""
        pg = self._pg
        pg.enter_pipeline_mode()
        try:
            for op in ops:
                pg.send_query_params(b"BEGIN", None)
                for text, params in op.statements:
                    name = self._names.get(text) or self._prepare(text)
                    values = self._dumper.dump_sequence(params, [PyFormat.TEXT] * len(params))
                    pg.send_query_prepared(name, values)
                pg.send_query_params(b"ROLLBACK" if op.rollback else b"COMMIT", None)
            pg.pipeline_sync()
            pg.flush()
            failed = self._read_to_sync()
        except BaseException:
            # Interrupted half-way (a lost connection, Ctrl-C): results are pending, so the
            # pipeline cannot be left and the connection is of no more use. Closed here, the
            # caller's rollback-on-close has nothing to trip over (and hides nothing).
            pg.finish()
            raise
        pg.exit_pipeline_mode()
        if failed is not None:
            raise errors.error_from_result(failed, encoding=self._encoding)

    def _prepare(self, text: str) -> bytes:
        # Prepared once per connection inside the pipeline (a failure surfaces at the sync).
        name = f"workload_{len(self._names)}".encode()
        self._pg.send_prepare(name, numbered(text))
        self._names[text] = name
        return name

    def _read_to_sync(self) -> pq.abc.PGresult | None:
        """Every result up to the sync point; the first error among them, if any."""
        pg, failed = self._pg, None
        while True:
            while pg.is_busy():
                # select() waits without the GIL (cdc_latency runs the workload in a thread).
                select.select([pg.socket], [], [])
                pg.consume_input()
            result = pg.get_result()
            if result is None:
                continue
            if result.status == pq.ExecStatus.PIPELINE_SYNC:
                return failed
            if result.status == pq.ExecStatus.FATAL_ERROR and failed is None:
                failed = result
