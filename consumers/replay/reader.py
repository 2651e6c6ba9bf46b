"""Replay files, part 3: reading (a fast path for our own files, fastavro for others)."""

from __future__ import annotations

import io
import json
import mmap
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from consumers.replay.avro import BRANCH_NULL, BRANCH_RAW, FORMAT, OCF_MAGIC, SYNC_SIZE, read_long
from cutover.codec import MAGIC, SchemaStore, heartbeat_schema, truncate_schema
from cutover.errors import (
    DecodeError,
    UsageError,
)


@dataclass(frozen=True, slots=True)
class Recorded:
    """One recorded message; ``value`` holds the original message value bytes."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    fingerprint: str | None
    value: bytes | None


class ReplayFile:
    """A replay file opened for reading (a context manager); iterate for :class:`Recorded`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = path.open("rb")
        except FileNotFoundError:
            raise UsageError(f"{path}: no such replay file") from None
        except IsADirectoryError:
            raise UsageError(f"{path} is a folder, not a replay file") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if size < len(OCF_MAGIC) + SYNC_SIZE + 2:
                raise self._corrupt("too short to be an Avro object container file")
            self._buf = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse_header()
        except BaseException:
            self._fh.close()
            raise

    def _corrupt(self, problem: str) -> DecodeError:
        return DecodeError(f"{self.path}: not a valid cutover replay file: {problem}")

    def _parse_header(self) -> None:
        buf = self._buf
        if buf[:4] != OCF_MAGIC:
            raise self._corrupt(
                f"expected the Avro magic 4f626a01, found {bytes(buf[:4]).hex() or 'nothing'}"
            )
        meta: dict[str, bytes] = {}
        try:
            pos = 4
            while True:
                count, pos = read_long(buf, pos)
                if count == 0:
                    break
                if count < 0:  # a negative count is followed by the block's size in bytes
                    count = -count
                    _size, pos = read_long(buf, pos)
                for _ in range(count):
                    klen, pos = read_long(buf, pos)
                    key = bytes(buf[pos : pos + klen]).decode()
                    pos += klen
                    vlen, pos = read_long(buf, pos)
                    meta[key] = bytes(buf[pos : pos + vlen])
                    pos += vlen
            self.sync = bytes(buf[pos : pos + SYNC_SIZE])
            self._data_start = pos + SYNC_SIZE
        except (IndexError, UnicodeDecodeError):
            raise self._corrupt("truncated or damaged header") from None
        if len(self.sync) != SYNC_SIZE:
            raise self._corrupt("truncated header")
        self.metadata = meta
        if meta.get("cutover.format", b"").decode(errors="replace") != FORMAT:
            raise self._corrupt(
                f"an Avro file, but without cutover.format = {FORMAT} metadata: "
                "not written by `cutover replay record`"
            )
        try:
            self.schema: dict[str, Any] = json.loads(meta["avro.schema"])
            self.writer_schemas: dict[str, str] = json.loads(meta["cutover.writer_schemas"])
            self.recording: dict[str, Any] = json.loads(meta.get("cutover.recording", b"{}"))
        except (KeyError, ValueError) as exc:
            raise self._corrupt(f"bad metadata: {exc}") from None
        self.codec = meta.get("avro.codec", b"null").decode()
        if self.codec not in ("null", "deflate"):
            raise self._corrupt(f"codec {self.codec} is not supported (null or deflate)")
        self._store: SchemaStore | None = None
        self._parsed: Any = None

    @property
    def events(self) -> int | None:
        """How many messages the file holds, as recorded in its metadata."""
        value = self.recording.get("events")
        return int(value) if isinstance(value, int) else None

    def schema_store(self) -> SchemaStore:
        """Every writer schema of the file (and the heartbeat schema)."""
        if self._store is None:
            store = SchemaStore()
            store.add(heartbeat_schema())
            store.add(truncate_schema())
            for fp, text in self.writer_schemas.items():
                ws = store.add_json(text)
                if ws.fingerprint_hex != fp:
                    raise self._corrupt(f"writer schema {fp} has fingerprint {ws.fingerprint_hex}")
            self._store = store
        return self._store

    def __enter__(self) -> ReplayFile:
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf is not None:
            buf.close()
        self._fh.close()

    def __iter__(self) -> Iterator[Recorded]:
        buf = self._buf
        end = len(buf)
        pos = self._data_start
        sync = self.sync
        fast = self.codec == "null"
        block = 0
        while pos < end:
            try:
                count, pos = read_long(buf, pos)
                size, pos = read_long(buf, pos)
            except IndexError:
                raise self._corrupt(f"truncated block header at byte {pos}") from None
            stop = pos + size
            if count < 0 or size < 0 or stop + SYNC_SIZE > end:
                raise self._corrupt(f"block {block} at byte {pos} runs past the end of the file")
            if buf[stop : stop + SYNC_SIZE] != sync:
                raise self._corrupt(f"block {block} at byte {pos} is damaged (sync marker)")
            if fast and count == 1:
                yield self._fast(buf, pos, stop, block)
            else:
                yield from self._generic(bytes(buf[pos:stop]), count, block)
            pos = stop + SYNC_SIZE
            block += 1

    def _fast(self, buf: Any, pos: int, stop: int, block: int) -> Recorded:
        """Parse one record whose value is the rest of its block (the module doc says why)."""
        try:
            n, pos = read_long(buf, pos)
            topic = bytes(buf[pos : pos + n]).decode()
            pos += n
            partition, pos = read_long(buf, pos)
            offset, pos = read_long(buf, pos)
            timestamp_ms, pos = read_long(buf, pos)
            has_key, pos = read_long(buf, pos)
            key: bytes | None = None
            if has_key:
                n, pos = read_long(buf, pos)
                key = bytes(buf[pos : pos + n])
                pos += n
            headers: list[tuple[str, bytes | None]] = []
            while True:
                count, pos = read_long(buf, pos)
                if count == 0:
                    break
                if count < 0:
                    count = -count
                    _size, pos = read_long(buf, pos)
                for _ in range(count):
                    n, pos = read_long(buf, pos)
                    hkey = bytes(buf[pos : pos + n]).decode()
                    pos += n
                    has_value, pos = read_long(buf, pos)
                    hvalue: bytes | None = None
                    if has_value:
                        n, pos = read_long(buf, pos)
                        hvalue = bytes(buf[pos : pos + n])
                        pos += n
                    headers.append((hkey, hvalue))
            has_fp, pos = read_long(buf, pos)
            fingerprint: str | None = None
            if has_fp:
                n, pos = read_long(buf, pos)
                fingerprint = bytes(buf[pos : pos + n]).decode()
                pos += n
            branch, pos = read_long(buf, pos)
            value: bytes | None
            if branch == BRANCH_NULL:
                value = None
            elif branch == BRANCH_RAW:
                n, pos = read_long(buf, pos)
                value = bytes(buf[pos : pos + n])
            elif fingerprint is not None and len(fingerprint) == 16:
                value = MAGIC + bytes.fromhex(fingerprint)[::-1] + bytes(buf[pos:stop])
            else:
                raise ValueError("a decoded value without its writer fingerprint")
        except (IndexError, ValueError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"record in block {block} is damaged ({exc})") from None
        return Recorded(
            topic, partition, offset, timestamp_ms, key, tuple(headers), fingerprint, value
        )

    def _generic(self, data: bytes, count: int, block: int) -> Iterator[Recorded]:
        """Blocks written by other tools: decode with fastavro, re-encode the value."""
        if self.codec == "deflate":
            try:
                data = zlib.decompress(data, -15)
            except zlib.error:
                raise self._corrupt(f"block {block} does not inflate") from None
        if self._parsed is None:
            self._parsed = parse_schema(self.schema)
        store = self.schema_store()
        stream = io.BytesIO(data)
        for _ in range(count):
            try:
                rec: dict[str, Any] = schemaless_reader(stream, self._parsed, None)  # type: ignore[assignment]
            except Exception as exc:  # fastavro raises many kinds for damaged data
                raise self._corrupt(f"record in block {block} is damaged ({exc})") from None
            fingerprint = rec.get("value_schema")
            value = rec.get("value")
            raw: bytes | None
            if value is None or isinstance(value, bytes):
                raw = value
            else:
                ws = store.get(int(fingerprint, 16)) if fingerprint else None
                if ws is None:
                    raise self._corrupt(f"a value of unknown writer schema {fingerprint}")
                out = io.BytesIO()
                out.write(ws.header)
                schemaless_writer(out, ws.parsed, value)
                raw = out.getvalue()
            yield Recorded(
                rec["topic"],
                rec["partition"],
                rec["offset"],
                rec["timestamp_ms"],
                rec["key"],
                tuple((h["key"], h["value"]) for h in rec["headers"]),
                fingerprint,
                raw,
            )
