"""Pure parts of the producer outside the event stream: encoding, settings, preflight, SQL."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from cutover import codec
from cutover.codec import ColumnSpec
from cutover.config import KafkaSettings
from cutover.errors import ConfigError, UsageError
from cutover.kafka import producer_config
from cutover.mapping import MappingSpec, load_mapping
from cutover.topics import topic_specs
from producers.fast_avro import encoder_for
from producers.init import _publication_diff
from producers.init_checks import (
    InitReport,
    TableInfo,
    identity_columns,
    preflight_tables,
    published_columns,
    ri_index_name,
)
from producers.predicate import compile_filter
from producers.run_options import CRASH_POINTS, ProducerOptions, options_from_environ
from producers.slot_safety import lock_keys
from producers.snapshot import chunk_query, decode_row

REPO = Path(__file__).resolve().parents[2]
MONEY = (14 << 16 | 2) + 4


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping(REPO / "examples" / "shop" / "mapping.toml")


# --- fast encoder -----------------------------------------------------------------------------


def _random_record(rng: random.Random, cols: list[ColumnSpec]) -> dict[str, Any]:
    def value(col: ColumnSpec) -> Any:
        if rng.random() < 0.2:
            return None
        if col.type_oid == 20:
            return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), rng.randrange(-(10**12), 10**12)])
        if col.type_oid == 23:
            return rng.randrange(-(2**31), 2**31)
        if col.type_oid == 1700 and col.type_modifier == MONEY:
            return Decimal(rng.randrange(-(10**13), 10**13)).scaleb(-rng.choice([0, 1, 2]))
        if col.type_oid == 1700:
            return Decimal(rng.randrange(-(10**37), 10**37)).scaleb(-9)
        if col.type_oid == 1184:
            return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(10**15))
        if col.type_oid == 1082:
            return date(2020, 1, 1) + timedelta(days=rng.randrange(5000))
        if col.type_oid == 16:
            return rng.random() < 0.5
        if col.type_oid == 1114:
            return datetime(1990, 1, 1) + timedelta(microseconds=rng.randrange(10**16))
        if col.type_oid == 701:
            return rng.choice([0.0, -1.5, 1e300, rng.random()])
        if col.type_oid == 17:
            return rng.randbytes(rng.randrange(0, 30))
        if col.type_oid == 2950:
            return str(uuid.UUID(int=rng.getrandbits(128)))
        return "".join(rng.choice("aé€😀 x\n") for _ in range(rng.randrange(0, 40)))

    def row() -> dict[str, Any]:
        return {c.name: value(c) for c in cols}

    op = rng.choice("cudr")
    return {
        "before": row() if op in "ud" and rng.random() < 0.5 else None,
        "after": row() if op != "d" else None,
        "source": {
            "version": "1",
            "connector": "postgresql",
            "name": "shop",
            "ts_ms": rng.randrange(2**41),
            "snapshot": "false",
            "db": "legacy",
            "schema": "shop",
            "table": "t",
            "txId": rng.randrange(2**32),
            "lsn": rng.randrange(2**40),
            "seq": rng.randrange(10**6),
        },
        "op": op,
        "ts_ms": rng.randrange(2**41),
        "transaction": None
        if op == "r"
        else {
            "id": "1:2",
            "total_order": rng.randrange(1, 10**6),
            "data_collection_order": rng.randrange(1, 10**6),
            "last_in_partition": rng.random() < 0.5,
        },
        "unchanged_toast": rng.sample([c.name for c in cols], k=rng.randrange(0, 2)),
    }


def test_fast_encoder_is_byte_identical_to_the_codec() -> None:
    cols = [
        ColumnSpec(name, oid, typmod)
        for name, oid, typmod in (
            ("id", 20, -1), ("n", 23, -1), ("price", 1700, MONEY), ("at", 1184, -1),
            ("day", 1082, -1), ("ok", 16, -1), ("text", 25, -1), ("local", 1114, -1),
            ("f", 701, -1), ("raw", 17, -1), ("u", 2950, -1), ("big", 1700, (38 << 16 | 9) + 4),
        )
    ]  # fmt: skip
    ws = codec.writer_schema(codec.envelope_schema("shop", "t", cols))
    encode = encoder_for(ws)
    rng = random.Random(7)
    for _ in range(2000):
        record = _random_record(rng, cols)
        assert encode(record) == codec.encode(ws, record)
    assert encode.__code__.co_filename.startswith("<avro encoder")  # not the fallback
    store = codec.SchemaStore()
    store.add(ws)
    record = _random_record(rng, cols)
    assert store.decode(encode(record))[1]["op"] == record["op"]


# --- Kafka settings ---------------------------------------------------------------------------


def test_producer_config_forces_idempotence_and_acks_all() -> None:
    conf = producer_config(KafkaSettings(producer={"linger.ms": 5}), "cdc", client_id="c")
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["linger.ms"] == 5
    assert conf["delivery.report.only.error"] is True
    assert producer_config(KafkaSettings(producer={"acks": -1}), "cdc")["acks"] == "all"


def test_the_cdc_producer_lingers_for_bigger_batches_by_default() -> None:
    # Bigger batches cost the broker less per event; checkpoints flush, which sends at once.
    assert producer_config(KafkaSettings(), "cdc")["linger.ms"] == 100


@pytest.mark.parametrize(
    ("key", "value"), [("acks", 1), ("acks", "0"), ("enable.idempotence", False)]
)
def test_producer_config_refuses_weaker_delivery(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        producer_config(KafkaSettings(producer={key: value}), "cdc")


def test_topic_specs_follow_the_architecture() -> None:
    specs = {s.name: s for s in topic_specs(KafkaSettings(topic_prefix="p", partitions=4), ["a"])}
    assert specs["p.a"].partitions == 4 and specs["p.a"].config["cleanup.policy"] == "delete"
    assert specs["p.dlq"].partitions == 1
    assert specs["p.control"].config["cleanup.policy"] == "compact"
    assert specs["p.schemas"].config["cleanup.policy"] == "compact"
    prod = topic_specs(KafkaSettings(replication_factor=3), ["a"])
    assert all(s.config["min.insync.replicas"] == "2" for s in prod)
    # From [kafka] min_insync_replicas when set; the broker's default with one replica.
    strict = topic_specs(KafkaSettings(replication_factor=3, min_insync_replicas=3), ["a"])
    assert all(s.config["min.insync.replicas"] == "3" for s in strict)
    single = topic_specs(KafkaSettings(), ["a"])
    assert all("min.insync.replicas" not in s.config for s in single)


# --- options ----------------------------------------------------------------------------------


def test_crash_points_are_validated_at_the_entry_point() -> None:
    assert options_from_environ({"CUTOVER_CRASH_AT": CRASH_POINTS[0]}).crash_at == CRASH_POINTS[0]
    assert options_from_environ({}).crash_at is None
    with pytest.raises(ConfigError, match="not a crash point"):
        ProducerOptions(crash_at="somewhere")


def test_lock_keys_fit_int4_and_match_pg_locks_unsigned_objid() -> None:
    for slot in ("a", "cutover_slot", "x" * 60):
        cls, signed, unsigned = lock_keys(slot)
        assert -(2**31) <= signed < 2**31 and 0 <= cls < 2**31
        assert signed % 2**32 == unsigned


# --- init (pure parts) ------------------------------------------------------------------------


def _info(**kw: Any) -> TableInfo:
    base: dict[str, Any] = {
        "name": "users", "oid": 1, "replica_identity": "d",
        "columns": ("id", "handle", "display_name", "email", "phone", "follower_count", "bio",
                    "created_at", "updated_at"),
        "generated": frozenset(), "not_null": frozenset({"id"}), "primary_key": ("id",),
        "identity_index": None, "identity_columns": (), "identity_index_valid": False,
    }  # fmt: skip
    base.update(kw)
    return TableInfo(**base)


def test_published_columns_leave_out_exactly_the_excluded(mapping: MappingSpec) -> None:
    cols = published_columns(_info(), mapping.tables["users"])
    assert cols == ("id", "display_name", "email", "phone", "created_at", "updated_at")


def _only_users(mapping: MappingSpec) -> MappingSpec:
    return MappingSpec(
        mapping.source_schema, mapping.target_schema, mapping.domains,
        {"users": mapping.tables["users"]},
    )  # fmt: skip


def test_preflight_accepts_the_reference_users_table(mapping: MappingSpec) -> None:
    report = InitReport()
    lists = preflight_tables(_only_users(mapping), {"users": _info()}, report)
    assert not report.problems
    assert "bio" not in lists["users"]


@pytest.mark.parametrize(
    ("info", "needle"),
    [
        ({"primary_key": ()}, "has no primary key"),
        ({"replica_identity": "n"}, "REPLICA IDENTITY NOTHING"),
        ({"replica_identity": "f"}, "REPLICA IDENTITY FULL but excludes"),
        (
            {"replica_identity": "i", "identity_columns": ("id", "handle")},
            "uses excluded column(s) handle",
        ),
        ({"columns": (*_info().columns, "avatar")}, "avatar are neither read by the mapping"),
        ({"columns": _info().columns[:-1]}, "users.updated_at is named in the mapping"),
        ({"primary_key": ("handle",)}, "the primary key is (handle)"),
    ],
)
def test_preflight_names_the_table_and_the_fix(
    mapping: MappingSpec, info: dict[str, Any], needle: str
) -> None:
    report = InitReport()
    lists = preflight_tables(_only_users(mapping), {"users": _info(**info)}, report)
    assert any(needle in p for p in report.problems), report.problems
    assert "users" not in lists


def test_preflight_reports_a_missing_table(mapping: MappingSpec) -> None:
    report = InitReport()
    preflight_tables(_only_users(mapping), {}, report)
    assert report.problems == [
        "table shop.users (in the mapping) does not exist in the source database: create it "
        "or remove it from the mapping"
    ]


def test_identity_columns_per_replica_identity() -> None:
    assert identity_columns(_info()) == ("id",)
    assert identity_columns(_info(replica_identity="i", identity_columns=("id", "x"))) == (
        "id",
        "x",
    )
    assert identity_columns(_info(replica_identity="f")) == _info().columns
    assert identity_columns(_info(replica_identity="n")) == ()
    assert ri_index_name("t" * 80) == ("cutover_ri_" + "t" * 80)[:63]


def test_publication_diff_says_what_changes() -> None:
    existing = {"shop.users": ["id", "bio"], "shop.gone": ["id"]}
    wanted = {"shop.users": ["id", "email"], "shop.orders": ["id"]}
    assert _publication_diff(existing, wanted) == [
        "add shop.orders",
        "shop.users columns +email -bio",
        "drop shop.gone",
    ]
    assert _publication_diff(wanted, wanted) == []


# --- snapshot SQL -----------------------------------------------------------------------------


def test_chunk_query_reads_published_columns_after_the_last_key() -> None:
    where = compile_filter("qty > 1", ["order_id", "line_no", "qty"], table="shop.order_items")
    query = chunk_query(
        "shop", "order_items", ["order_id", "qty"], ["order_id", "line_no"],
        after=True, where=where.sql,
    )  # fmt: skip
    assert query.as_string(None) == (
        'SELECT "t"."order_id"::text, "t"."qty"::text, "t"."order_id"::text, "t"."line_no"::text '
        'FROM "shop"."order_items" AS t WHERE ("t"."order_id", "t"."line_no") > (%s, %s) '
        'AND (("t"."qty" > %s)) ORDER BY "t"."order_id", "t"."line_no" LIMIT %s'
    )
    assert where.params == (1,)
    # A filter that tries to close the parenthesis is refused, so the pk bound always holds.
    with pytest.raises(UsageError, match="unbalanced"):
        compile_filter("qty > 1) OR (true", ["qty"], table="shop.order_items")
    first = chunk_query("shop", "users", ["id"], ["id"], after=False)
    # Qualified: a bare "id" in ORDER BY would sort by the text output column.
    assert first.as_string(None) == (
        'SELECT "t"."id"::text, "t"."id"::text FROM "shop"."users" AS t ORDER BY "t"."id" LIMIT %s'
    )
    keys = chunk_query("shop", "users", ["id"], ["id"], after=False, keys=2)
    assert 'WHERE ("t"."id") IN ((%s), (%s))' in keys.as_string(None)
    assert isinstance(first, sql.Composed)


def test_snapshot_rows_decode_like_pgoutput_tuples() -> None:
    cols = [ColumnSpec("id", 20, -1), ColumnSpec("price", 1700, MONEY), ColumnSpec("at", 1184, -1)]
    row = decode_row(cols, ["5", "10.50", "2026-01-01 00:00:00+00"])
    assert row == {
        "id": 5,
        "price": Decimal("10.50"),
        "at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    assert decode_row(cols, [None, None, None]) == {"id": None, "price": None, "at": None}


def test_snapshot_progress_bar_tracks_rows_and_finishes() -> None:
    from cli.commands.produce import _SnapshotBars

    bars = _SnapshotBars()
    event = {"request": 1, "table": "users", "estimate": 300, "rows": 100, "done": False}
    bars(event)
    bars({**event, "rows": 250, "done": True})
    (task,) = bars.progress.tasks
    assert task.completed == 250 and task.total == 250
    assert task.fields["table"] == "users"
