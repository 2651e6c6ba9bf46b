"""Replay files, part 2: writing (records are spooled; the header is written last)."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastavro import parse_schema

from consumers.replay.avro import (
    BRANCH_NULL,
    BRANCH_RAW,
    FIRST_SCHEMA_BRANCH,
    FORMAT,
    OCF_MAGIC,
    SYNC_SIZE,
    encode_bytes,
    encode_long,
    file_schema,
    union_branches,
)
from consumers.replay.filters import table_of_schema
from cutover.codec import HEADER_SIZE, MAGIC, WriterSchema
from cutover.errors import UsageError


@dataclass(slots=True)
class Branch:
    index: int
    schema: WriterSchema
    #: Writer schema without logical types, and an empty reader schema of the same name:
    #: validating a body by skipping every field costs a third of decoding it.
    plain: Any
    skipper: Any
    table: tuple[str, str] | None
    #: The encoded ``value_schema`` field and union index, written with every record.
    tail: bytes


def _encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    parts = [encode_long(len(headers))]
    for hkey, hvalue in headers:
        parts.append(encode_bytes(hkey.encode()))
        parts.append(b"\x00" if hvalue is None else b"\x02" + encode_bytes(hvalue))
    parts.append(b"\x00")
    return b"".join(parts)


def file_header(metadata: Mapping[str, bytes], sync: bytes) -> bytes:
    """The object container file header: magic, metadata map, sync marker."""
    out = [OCF_MAGIC, encode_long(len(metadata))]
    for key, value in metadata.items():
        out.append(encode_bytes(key.encode()))
        out.append(encode_bytes(value))
    out.append(b"\x00")
    out.append(sync)
    return b"".join(out)


class ReplayWriter:
    """Writes a replay file: records are spooled, the header (which needs every writer schema
    met) is written when the file is finished; the file appears atomically (rename)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: folder {out.parent} does not exist")
        self.sync = os.urandom(SYNC_SIZE)
        self._one = encode_long(1)
        fd, spool = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".spool", dir=out.parent)
        self._spool_path = Path(spool)
        self._spool: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self.branches: list[Branch] = []
        self._by_fp: dict[int, Branch] = {}
        self._heads: dict[tuple[str, int], bytes] = {}
        self._headers: dict[tuple[tuple[str, bytes | None], ...], bytes] = {}
        self._last_ts: int | None = None
        self._last_ts_enc = b""
        self.records = 0
        self.raw = 0

    def branch_for(self, schema: WriterSchema) -> Branch:
        """The union branch of ``schema``, assigned at first use (file order = union order)."""
        branch = self._by_fp.get(schema.fingerprint)
        if branch is None:
            index = FIRST_SCHEMA_BRANCH + len(self.branches)
            branch = Branch(
                index,
                schema,
                parse_schema(json.loads(schema.canonical)),
                parse_schema({"type": "record", "name": schema.name, "fields": []}),
                table_of_schema(schema.name),
                b"\x02" + encode_bytes(schema.fingerprint_hex.encode()) + encode_long(index),
            )
            self.branches.append(branch)
            self._by_fp[schema.fingerprint] = branch
        return branch

    def write(
        self,
        topic: str,
        partition: int,
        *,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None,
        value: bytes | None,
        branch: Branch | None,
    ) -> None:
        """Write one message; ``branch`` None stores the value as raw bytes.

        The hot path of recording: fields that repeat (topic and partition, headers, the last
        timestamp, the schema fields) are encoded once and cached.
        """
        head = self._heads.get((topic, partition))
        if head is None:
            head = self._heads[(topic, partition)] = encode_bytes(topic.encode()) + encode_long(
                partition
            )
        if timestamp_ms != self._last_ts:
            self._last_ts = timestamp_ms
            self._last_ts_enc = encode_long(timestamp_ms)
        if headers:
            hkey = tuple(headers)
            hdr = self._headers.get(hkey)
            if hdr is None:
                hdr = _encode_headers(headers)
                if len(self._headers) < 1000:  # headers that vary (e.g. DLQ reasons): no cache
                    self._headers[hkey] = hdr
        else:
            hdr = b"\x00"
        body: bytes | memoryview
        if branch is not None and value is not None:
            tail = branch.tail
            body = memoryview(value)[HEADER_SIZE:]
        elif value is None:
            tail, body = b"\x00" + encode_long(BRANCH_NULL), b""
        else:
            self.raw += 1
            fp = b"\x00"
            if len(value) >= HEADER_SIZE and value[:2] == MAGIC:
                fp = b"\x02" + encode_bytes(value[2:HEADER_SIZE][::-1].hex().encode())
            tail, body = fp + encode_long(BRANCH_RAW), encode_bytes(value)
        parts = [
            head,
            encode_long(offset),
            self._last_ts_enc,
            b"\x00" if key is None else b"\x02" + encode_bytes(key),
            hdr,
            tail,
            body,
        ]
        size = sum(map(len, parts))
        # One record per block: count 1, size, the record, the sync marker (module doc).
        self._spool.write(b"".join([self._one, encode_long(size), *parts, self.sync]))
        self.records += 1

    def finish(self, recording: Mapping[str, Any]) -> int:
        """Write the header and the records to ``out``; returns the file size in bytes."""
        self._spool.close()
        schema = file_schema(
            union_branches(
                [(f"{b.schema.fingerprint:016x}", json.loads(b.schema.json)) for b in self.branches]
            )
        )
        metadata = {
            "avro.schema": json.dumps(schema, separators=(",", ":")).encode(),
            "avro.codec": b"null",
            "cutover.format": FORMAT.encode(),
            "cutover.writer_schemas": json.dumps(
                {f"{b.schema.fingerprint:016x}": b.schema.json for b in self.branches}
            ).encode(),
            "cutover.recording": json.dumps(recording, sort_keys=True).encode(),
        }
        partial = self.out.with_name(f".{self.out.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with partial.open("wb") as fh, self._spool_path.open("rb") as spool:
                fh.write(file_header(metadata, self.sync))
                while chunk := spool.read(1 << 22):
                    fh.write(chunk)
            os.replace(partial, self.out)
        finally:
            partial.unlink(missing_ok=True)
            self._spool_path.unlink(missing_ok=True)
        return self.out.stat().st_size

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)
