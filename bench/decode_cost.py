"""CPU per change event of the appliers' Avro decoding (``SchemaStore.decode``), no services.

The appliers' decoding is the largest single cost end to end (README, "Where the time goes").
This measures it alone: realistic shop change events (``devtools.apply_support.ShopModel``: the
seven reference tables' envelopes, decimals, timestamps, unchanged TOAST lists) are encoded
once, then decoded ``--rounds`` times; the figure is CPU time (``time.process_time``) per event,
so a busy machine slows it less than wall time. For comparison, the same events decoded by
fastavro's ``schemaless_reader`` with the parsed schema (what ``SchemaStore.decode`` did before the
compiled readers of :mod:`cutover.avro_decode`), and with a schema fastavro must parse again on
every call (the release before that: ``parse_schema(..., _write_hint=False)``).

    .venv/bin/python -m bench.decode_cost [--transactions 4000] [--rounds 3]

Prints JSON and a Markdown table; writes ``bench/results/decode_cost.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cutover import codec  # noqa: E402
from devtools.apply_support import EventFactory, ShopModel  # noqa: E402

RESULTS = REPO / "bench" / "results" / "decode_cost.json"


def cpu_us_per_event(values: list[bytes], decode: Any, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for value in values:
            decode(value)
        best = min(best, time.process_time() - t0)
    return best / len(values) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3, help="best of N (default 3)")
    args = parser.parse_args(argv)
    model = ShopModel(EventFactory("bench", 6), seed=3)
    messages = [m for _ in range(args.transactions) for m in model.step()]
    values = [m.value for m in messages if dict(m.headers).get("cutover.kind") == b"change"]
    store = codec.SchemaStore()
    for text in model.factory.schema_json.values():
        store.add_json(text)
    unmarked = {
        ws.fingerprint: parse_schema(json.loads(ws.json), _write_hint=False)
        for ws in (store.decode(v)[0] for v in values[:1000])
    }

    parsed = {fp: ws.parsed for fp in unmarked if (ws := store.get(fp)) is not None}

    def reparsing(value: bytes) -> Any:
        schema = unmarked[int.from_bytes(value[2 : codec.HEADER_SIZE], "little")]
        return schemaless_reader(io.BytesIO(value[codec.HEADER_SIZE :]), schema, None)

    def fastavro_parsed(value: bytes) -> Any:
        schema = parsed[int.from_bytes(value[2 : codec.HEADER_SIZE], "little")]
        return schemaless_reader(io.BytesIO(value[codec.HEADER_SIZE :]), schema, None)

    current = cpu_us_per_event(values, store.decode, args.rounds)
    fastavro = cpu_us_per_event(values, fastavro_parsed, args.rounds)
    before = cpu_us_per_event(values, reparsing, args.rounds)
    result = {
        "benchmark": "decode_cost",
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 1)},
        "events": len(values),
        "cpu_us_per_event": round(current, 1),
        "cpu_us_per_event_fastavro_parsed_schema": round(fastavro, 1),
        "cpu_us_per_event_schema_parsed_per_call": round(before, 1),
        "method": "SchemaStore.decode of encoded shop change events, CPU time, best of rounds",
    }
    print(json.dumps(result, indent=2))
    print(
        "\n| decoding | CPU µs per event |\n|---|---:|\n"
        f"| `SchemaStore.decode` (compiled reader per schema) | {current:.1f} |\n"
        f"| fastavro `schemaless_reader`, parsed schema (before) | {fastavro:.1f} |\n"
        f"| schema parsed again per call (before) | {before:.1f} |"
    )
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
