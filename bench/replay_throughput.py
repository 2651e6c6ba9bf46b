"""Replay throughput: `cutover replay record` and `cutover replay play` events/s on the stack.

A backlog of reference-scenario change events (devtools/apply_support.py's
ShopModel, encoded as the producer does) is produced to fresh topics; then, per domain topic,
the core functions the commands call are timed:

* record: the topic → an Avro object container file (validation of every value included);
* play --to-topic: the file → a fresh topic (until Kafka acknowledged every message);
* play --to-target: the payment file → an empty sandbox commerce database through the apply path
  (bounded by the apply path itself, see bench/results/apply.json; reported, no target).

Target (issue 6): record and play at least 50,000 events/s each. Prints a Markdown table, writes
JSON to bench/results/replay.json. Needs the local stack (make up)::

    .venv/bin/python -m bench.replay_throughput [--events 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumers.replay import Filters, Rate, play_to_target, play_to_topic, record
from cutover.config import KafkaSettings
from devtools.apply_support import (
    DOMAINS,
    EXAMPLES,
    EventFactory,
    Message,
    ShopModel,
    delete_topics,
    init_control,
    make_topics,
    produce,
    publish_schemas,
    settings_for,
)
from devtools.scratch import scratch_database
from devtools.stack import read_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "replay.json"
TARGET_EVENTS_PER_S = 50_000


def _backlog(events: int, partitions: int, unique: int) -> tuple[EventFactory, list[Message]]:
    """``events`` messages: ``unique`` distinct ones from the shop model (its cost grows with
    its state), repeated. Record and play do not look at what a value says, so repeats measure
    the same thing; the sandbox part plays only the first, distinct ones."""
    factory = EventFactory("bench", partitions)
    model = ShopModel(factory, seed=7, description_size=1000)
    messages: list[Message] = []
    while len(messages) < min(events, unique):
        messages.extend(model.step())
    base = list(messages)
    while len(messages) < events:
        messages.extend(base[: events - len(messages)])
    return factory, messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--unique", type=int, default=80_000, help="distinct events generated")
    parser.add_argument(
        "--target-events",
        type=int,
        default=60_000,
        help="events of the payment file played into a sandbox database",
    )
    args = parser.parse_args(argv)
    env = read_env(REPO / ".stack", os.environ)
    bootstrap = env.get("CUTOVER_KAFKA_BOOTSTRAP")
    admin_dsn = env.get("CUTOVER_TARGET_DSN")
    if not bootstrap or not admin_dsn:
        print("the local stack is not up: run `make up`", file=sys.stderr)
        return 3
    source = make_topics(bootstrap, partitions=args.partitions)
    copies = make_topics(bootstrap, partitions=args.partitions)
    results: dict[str, Any] = {
        "benchmark": "replay",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "target_events_per_s": TARGET_EVENTS_PER_S,
    }
    try:
        t = time.monotonic()
        factory, messages = _backlog(args.events, args.partitions, args.unique)
        factory.prefix = source.prefix
        # Re-encode topic names for the real prefix (the factory was built before the topics).
        messages = [
            Message(f"{source.prefix}.{m.topic.split('.', 1)[1]}", m.partition, m.key, m.value)
            for m in messages
        ]
        publish_schemas(source, factory)
        produce(bootstrap, messages)
        results["backlog"] = {
            "events": len(messages),
            "partitions_per_topic": args.partitions,
            "distinct_events": min(args.events, args.unique),
            "mean_value_bytes": round(sum(len(m.value) for m in messages) / len(messages)),
            "prepare_s": round(time.monotonic() - t, 1),
        }
        kafka = KafkaSettings(bootstrap=bootstrap, topic_prefix=source.prefix)
        rows = []
        with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
            files: dict[str, Path] = {}
            rec_events = rec_s = play_events = play_s = 0.0
            for domain in DOMAINS:
                out = Path(tmp) / f"{domain}.avro"
                files[domain] = out
                r = record(kafka, source.topic(domain), out, Filters())
                p = play_to_topic(kafka, out, copies.topic(domain), Filters(), Rate())
                rows.append((domain, r.events, r.seconds, p.played, p.seconds, r.bytes))
                rec_events += r.events
                rec_s += r.seconds
                play_events += p.played
                play_s += p.seconds
            results["record"] = {
                "events": int(rec_events),
                "seconds": round(rec_s, 2),
                "events_per_s": round(rec_events / rec_s),
                "per_topic": {
                    d: {"events": e, "seconds": round(s, 2), "mb": round(b / 1e6, 1)}
                    for d, e, s, _pe, _ps, b in rows
                },
            }
            results["play_to_topic"] = {
                "events": int(play_events),
                "seconds": round(play_s, 2),
                "events_per_s": round(play_events / play_s),
            }
            for dsn in scratch_database(admin_dsn, EXAMPLES / "commerce.sql", "replaybench"):
                init_control(dsn)
                settings = settings_for(dsn, source)
                limit = Filters(to_offset=args.target_events // args.partitions)
                s = play_to_target(settings, files["payment"], dsn, limit, Rate())
                results["play_to_target"] = {
                    "events": s.played,
                    "seconds": round(s.seconds, 2),
                    "events_per_s": round(s.events_per_s),
                    "upserted": s.upserted,
                    "note": "bounded by the apply path (consumers.sink), not by the file",
                }
    finally:
        delete_topics(source)
        delete_topics(copies)
    results["meets_target"] = (
        results["record"]["events_per_s"] >= TARGET_EVENTS_PER_S
        and results["play_to_topic"]["events_per_s"] >= TARGET_EVENTS_PER_S
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print()
    print("| step | events | seconds | events/s |")
    print("|---|---:|---:|---:|")
    for step in ("record", "play_to_topic", "play_to_target"):
        r = results[step]
        print(f"| {step} | {r['events']:,} | {r['seconds']} | {r['events_per_s']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
