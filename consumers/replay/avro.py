"""Replay files, part 1: the Avro container basics (binary primitives, the file schema).

See :mod:`consumers.replay` for the file layout.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

FORMAT: Final = "cutover-replay/1"
OCF_MAGIC: Final = b"Obj\x01"
SYNC_SIZE: Final = 16
#: Dead letters of ``play --to-target`` are recorded under this consumer group name.
REPLAY_GROUP: Final = "cutover-replay"
_PRIMITIVES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_NAMED: Final = frozenset({"record", "error", "enum", "fixed"})
#: Union branches before the writer schemas: null, then the raw bytes of undecodable values.
BRANCH_NULL: Final = 0
BRANCH_RAW: Final = 1
FIRST_SCHEMA_BRANCH: Final = 2

# ====================================================================== Avro binary primitives


_SMALL: Final = [bytes([(n << 1) & 0xFF]) for n in range(64)]


def encode_long(n: int) -> bytes:
    """Avro ``long``: zig-zag, then base-128 varint."""
    if 0 <= n < 64:
        return _SMALL[n]
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode_bytes(data: bytes) -> bytes:
    return encode_long(len(data)) + data


def read_long(buf: Any, pos: int) -> tuple[int, int]:
    """Decode an Avro ``long`` at ``pos`` of ``buf``; returns (value, next position)."""
    b = buf[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


# ====================================================================== file schema (pure)

_HEADER_SCHEMA: Final[dict[str, Any]] = {
    "type": "record",
    "name": "Header",
    "namespace": "cutover.replay",
    "fields": [
        {"name": "key", "type": "string"},
        {"name": "value", "type": ["null", "bytes"]},
    ],
}


def union_branches(schemas: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Any]:
    """The writer schemas ``(fingerprint hex, schema JSON)`` as branches of one Avro union.

    Every named type is defined once: an identical later definition becomes a reference to the
    first; a different one with the same full name (a newer version of a table's envelope) is
    renamed ``<fullname>_<fingerprint>``, and the references to it in the same schema follow.
    """
    defined: dict[str, str] = {}
    return [_rewrite(copy.deepcopy(dict(s)), "", defined, {}, fp) for fp, s in schemas]


def _fullname(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _rewrite(
    node: Any, namespace: str, defined: dict[str, str], renames: dict[str, str], fp: str
) -> Any:
    if isinstance(node, str):
        if node in _PRIMITIVES:
            return node
        full = _fullname(node, namespace)
        return renames.get(full, full)
    if isinstance(node, list):
        return [_rewrite(n, namespace, defined, renames, fp) for n in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind in ("array", "map"):
        attr = "items" if kind == "array" else "values"
        node[attr] = _rewrite(node[attr], namespace, defined, renames, fp)
        return node
    if kind not in _NAMED:
        # A primitive with attributes (logical types), or {"type": <reference or schema>}.
        node["type"] = _rewrite(kind, namespace, defined, renames, fp)
        return node
    full = _fullname(str(node["name"]), str(node.get("namespace", namespace)))
    child_ns = full.rpartition(".")[0]
    # The definition as written decides identity (the schemas are self-contained).
    identity = json.dumps(node, sort_keys=True)
    if full in defined:
        if defined[full] == identity:
            return full
        renamed = f"{full}_{fp}"
        renames[full] = renamed
        full = renamed
    defined[full] = identity
    node["name"] = full
    node.pop("namespace", None)
    if kind in ("record", "error"):
        for fld in node.get("fields", []):
            fld["type"] = _rewrite(fld["type"], child_ns, defined, renames, fp)
    return node


def file_schema(branches: Sequence[Any]) -> dict[str, Any]:
    """The schema of a replay file whose value union holds ``branches`` (see the module doc)."""
    return {
        "type": "record",
        "name": "Message",
        "namespace": "cutover.replay",
        "doc": "One Kafka message recorded by `cutover replay record` (docs/OPERATIONS.md).",
        "fields": [
            {"name": "topic", "type": "string"},
            {"name": "partition", "type": "int"},
            {"name": "offset", "type": "long"},
            {"name": "timestamp_ms", "type": "long", "doc": "Kafka message timestamp"},
            {"name": "key", "type": ["null", "bytes"]},
            {"name": "headers", "type": {"type": "array", "items": _HEADER_SCHEMA}},
            {
                "name": "value_schema",
                "type": ["null", "string"],
                "doc": "CRC-64-AVRO fingerprint (hex) of the value's writer schema",
            },
            {
                "name": "value",
                "type": ["null", "bytes", *branches],
                "doc": "the decoded value; bytes: a value that could not be decoded, as consumed",
            },
        ],
    }
