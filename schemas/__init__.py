"""The Avro schemas (``.avsc``) of kafka-cutover's messages, as a tiny data package.

``load(name)`` returns the parsed JSON of ``<name>.avsc``. Per-table value schemas are generated
by :mod:`cutover.codec` from the source table's columns and the envelope template here.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

NAMES = ("source", "transaction", "envelope", "heartbeat", "truncate")


@cache
def _text(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.avsc").read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """A fresh copy of the schema ``name`` (callers may modify it)."""
    if name not in NAMES:
        raise KeyError(f"no schema {name!r}; known: {', '.join(NAMES)}")
    schema: dict[str, Any] = json.loads(_text(name))
    return schema
