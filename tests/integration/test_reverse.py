"""Reverse replication on the real stack: both pipelines running, the workload writing legacy,
the test writing commerce; rows arrive mapped back, nothing echoes, a killed reverse applier
resumes without a duplicate effect, and both databases end up equal (independent comparison)."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from devtools.harness import Scenario, changes, init, open_scenario, stop
from devtools.workload import prefill, run_workload
from tests.integration.faults_support import cli_processes, log_events, start_cli, wait_for
from tests.integration.shop_compare import assert_commerce_matches_legacy, compare

# Commerce-side rows of the test: ids no workload reaches (it takes its ids after the max ids
# it reads when it starts, before any of these exist).
BASE = 900_000_000
SELLERS = 3
LISTINGS = 30

# Counts every write to a legacy row of the test's id range: "no duplicate effect" means one
# legacy write per commerce change, whatever was killed and redelivered.
AUDIT_SQL = """
CREATE TABLE public.reverse_audit (tbl text, id bigint, op text, status text);
CREATE FUNCTION public.reverse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF OLD.id >= 900000000 THEN
      INSERT INTO public.reverse_audit VALUES (TG_TABLE_NAME, OLD.id, TG_OP, NULL);
    END IF;
    RETURN OLD;
  END IF;
  IF NEW.id >= 900000000 THEN
    INSERT INTO public.reverse_audit VALUES (TG_TABLE_NAME, NEW.id, TG_OP, NEW.status);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER reverse_audit AFTER INSERT OR UPDATE OR DELETE ON shop.products
  FOR EACH ROW EXECUTE FUNCTION public.reverse_audit();
CREATE TRIGGER reverse_audit AFTER INSERT OR UPDATE OR DELETE ON shop.merchants
  FOR EACH ROW EXECUTE FUNCTION public.reverse_audit();
"""


def _echoes(scenario: Scenario, name: str) -> int:
    return sum(
        int(e.get("echo_dropped", 0))
        for e in log_events(scenario, name, "producer.batch_delivered")
    )


def _equal(legacy: str, commerce: str) -> bool:
    return all(d.ok for d in compare(legacy, commerce))


def _commerce_writes(commerce: str, round_no: int) -> int:
    """One round of commerce-side traffic on the merchant domain; returns the changes made."""
    made = 0
    with psycopg.connect(commerce, autocommit=True) as conn:
        for s in range(SELLERS):
            sid = BASE + s
            with conn.transaction():
                if round_no == 0:
                    conn.execute(
                        "INSERT INTO commerce.sellers (seller_id, owner_customer_id, name, state,"
                        " rating, created_at, updated_at, _src_lsn, _src_seq) VALUES (%s, 1, %s,"
                        " 'ACTIVE', 4.50, now(), now(), 0, 0)",
                        (sid, f"shop {sid}"),
                    )
                    made += 1
                for n in range(LISTINGS // SELLERS):
                    lid = BASE + s * 100 + n
                    if round_no == 0:
                        conn.execute(
                            "INSERT INTO commerce.listings (listing_id, seller_id, title,"
                            " description, price_minor, stock, visible, _src_lsn, _src_seq)"
                            " VALUES (%s, %s, %s, %s, %s, %s, true, 0, 0)",
                            (lid, sid, f"item {lid}", "x" * 3000, 150050 + n, 5),
                        )
                    elif n % 5 == 0 and round_no == 3:
                        conn.execute("DELETE FROM commerce.listings WHERE listing_id = %s", (lid,))
                    else:
                        conn.execute(
                            "UPDATE commerce.listings SET stock = stock + 1, price_minor ="
                            " price_minor + 1, visible = NOT visible WHERE listing_id = %s",
                            (lid,),
                        )
                    made += 1
    return made


@pytest.mark.integration
def test_reverse_replication_no_echo_and_kill9_of_the_reverse_applier(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefill(fresh_legacy, orders=300, seed=11)
    with psycopg.connect(fresh_legacy, autocommit=True) as conn:
        conn.execute(AUDIT_SQL.encode())
    with (
        open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=3) as sc,
        cli_processes() as procs,
    ):
        report = init(sc, "--reverse")
        assert any(a["object"] == f"reverse: slot {sc.reverse_slot}" for a in report["actions"])
        again = init(sc, "--reverse")  # idempotent
        assert {a["status"] for a in again["actions"] if a["object"].startswith("reverse: ")} <= {
            "exists"
        }
        procs["produce"] = start_cli(sc, "produce", "produce")
        procs["apply"] = start_cli(sc, "apply", "apply")
        wait_for(lambda: _equal(fresh_legacy, fresh_commerce), 180, "the forward snapshot")
        procs["apply-reverse"] = start_cli(
            sc, "apply-reverse", "apply", "--reverse", crash_at="apply_after_commit"
        )
        load = threading.Thread(
            target=run_workload, args=(fresh_legacy,), kwargs={"rate": 100, "duration": 20}
        )
        load.start()
        made = 0
        try:
            made += _commerce_writes(fresh_commerce, 0)
            # The reverse producer dies (kill -9) after Kafka acknowledged these changes and
            # before it advanced its slot: its successor delivers them again, at new offsets.
            procs["produce-reverse"] = start_cli(
                sc, "produce-reverse", "produce", "--reverse", crash_at="after_ack_before_advance"
            )
            procs["produce-reverse"].wait(timeout=120)
            assert procs["produce-reverse"].returncode == -signal.SIGKILL
            procs["produce-reverse"] = start_cli(sc, "produce-reverse", "produce", "--reverse")
            # The reverse applier was started to die right after its first COMMIT (kill -9).
            procs["apply-reverse"].wait(timeout=60)
            assert procs["apply-reverse"].returncode == -signal.SIGKILL
            procs["apply-reverse"] = start_cli(sc, "apply-reverse", "apply", "--reverse")
            for round_no in (1, 2):
                made += _commerce_writes(fresh_commerce, round_no)
            # kill -9 of the reverse applier again, mid-stream, then a restart.
            procs["apply-reverse"].kill()
            procs["apply-reverse"].wait()
            made += _commerce_writes(fresh_commerce, 3)
            procs["apply-reverse"] = start_cli(sc, "apply-reverse", "apply", "--reverse")
        finally:
            load.join()
        # A legacy user (made after the workload read its ids) carried forward, then changed on
        # commerce: the legacy-only (social) columns stay as they are.
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO shop.users (id, handle, display_name, follower_count, bio)"
                " VALUES (%s, 'social-handle', 'Before', 77, 'social bio')",
                (BASE,),
            )
        wait_for(
            lambda: _one(
                fresh_commerce, "SELECT 1 FROM commerce.customers WHERE customer_id = %s", BASE
            ),
            60,
            "the forward copy of the user",
        )
        with psycopg.connect(fresh_commerce, autocommit=True) as conn:
            conn.execute(
                "UPDATE commerce.customers SET display_name = 'After' WHERE customer_id = %s",
                (BASE,),
            )
        made += 1
        # Both directions drained: legacy maps to commerce exactly (independent comparison).
        wait_for(lambda: _equal(fresh_legacy, fresh_commerce), 180, "both directions to drain")
        assert_commerce_matches_legacy(fresh_legacy, fresh_commerce)

        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            user = conn.execute(
                "SELECT display_name, handle, follower_count, bio FROM shop.users WHERE id = %s",
                (BASE,),
            ).fetchone()
            rows = conn.execute(
                "SELECT id, status FROM shop.products WHERE id >= %s", (BASE,)
            ).fetchall()
            statuses: dict[int, str] = {int(k): str(v) for k, v in rows}
            audit = Counter(
                (tbl, op)
                for tbl, _, op, _ in conn.execute("SELECT * FROM public.reverse_audit").fetchall()
            )
        assert user == ("After", "social-handle", 77, "social bio")
        deleted = {BASE + s * 100 + n for s in range(SELLERS) for n in range(0, 10, 5)}
        assert {k for k, v in statuses.items() if v == "deleted"} == deleted
        assert len(statuses) == LISTINGS
        # One legacy write per commerce change: the kills and restarts duplicated nothing.
        assert sum(audit.values()) == made - 1  # the user is not audited
        assert audit[("products", "INSERT")] == LISTINGS
        assert audit[("merchants", "INSERT")] == SELLERS

        # No echo under load: the reverse topics carry exactly the commerce writes of the test
        # (none of the thousands of rows the forward applier wrote into commerce), and the
        # forward topics none of what the reverse applier wrote into legacy.
        reverse_events = changes(sc.read(sc.reverse_topics()))
        positions = {(e.record["source"]["lsn"], e.record["source"]["seq"]) for e in reverse_events}
        assert len(positions) == made
        assert len(reverse_events) > made  # the redelivery happened: the guard had work to do
        forward_events = changes(sc.read())
        mine = [e for e in forward_events if _key(e) >= BASE]
        assert [(e.record["source"]["table"], e.record["op"]) for e in mine] == [("users", "c")]
        # `complete` takes a domain's tables out of the reverse publication: the reverse
        # producer goes on with the others (it does not watch its captured set).
        with psycopg.connect(fresh_commerce, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} DROP TABLE commerce.customers").format(
                    sql.Identifier(sc.reverse_publication)
                )
            )
            conn.execute(
                "UPDATE commerce.listings SET stock = 999 WHERE listing_id = %s", (BASE + 1,)
            )
        wait_for(
            lambda: _one(
                fresh_legacy, "SELECT 1 FROM shop.products WHERE id = %s AND stock = 999", BASE + 1
            ),
            60,
            "a change after the publication shrank",
        )
        assert procs["produce-reverse"].poll() is None
        for name in ("produce-reverse", "produce"):
            stop(procs.pop(name))
        assert _echoes(sc, "produce") > 0  # the reverse applier's transactions
        assert _echoes(sc, "produce-reverse") > 0  # the forward applier's transactions


def _key(event: object) -> int:
    record = event.record  # type: ignore[attr-defined]
    row = record["after"] or record["before"]
    return int(next(iter(row.values())))


def _one(dsn: str, query: str, *params: object) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query.encode(), params).fetchone() is not None
