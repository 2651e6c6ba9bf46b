"""A bad value stops one row, not the stream (issue 12 item 2), on the real stack.

With the producer and an applier running and the workload writing, three rows the envelope
cannot carry (``total_idr = 'NaN'``, ``updated_at = 'infinity'``, a 5 MB description over
``[kafka] max_message_bytes``) each become a producer dead letter naming table, key and LSN
(DLQ topic with ``origin=producer`` headers, and legacy ``cutover.producer_dead_letters``),
without any value; the producer keeps running and later rows (the rest of the NaN's own
transaction included) reach commerce; each domain's ``dead_letters`` gate is red and ``cutover
dlq list`` shows the letters. After the documented resume (fix the rows in legacy) commerce
equals the mapped legacy, the letters are resolved and the gates green. With ``dlq_policy =
'halt'`` the producer stops instead (exit 3) naming table, key and LSN and how to resume.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from control.gate_evidence import collect
from control.gates import evaluate
from devtools import harness
from devtools.harness import Scenario, open_scenario, stop
from devtools.readback import read_all
from devtools.workload import prefill, run_workload
from tests.integration.shop_compare import compare
from tests.integration.test_pipeline_e2e import _start_apply, _wait_equal

pytestmark = pytest.mark.integration

BASE = 7_000_000_001  # ids far above the workload's new ones
USER, MERCHANT, PRODUCT, ORDER = BASE, BASE + 1, BASE + 2, BASE + 3
BIG = 5 * 1024 * 1024


@pytest.fixture
def scenario(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Scenario]:
    with open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=3) as s:
        yield s


def _seed(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO shop.users (id, handle, display_name, email)"
            " VALUES (%s, %s, 'Bad', 'b@x')",
            (USER, f"bad-{USER}"),
        )
        conn.execute(
            "INSERT INTO shop.merchants (id, owner_user_id, shop_name, status)"
            " VALUES (%s, %s, 'bad shop', 'active')",
            (MERCHANT, USER),
        )
        conn.execute(
            "INSERT INTO shop.products (id, merchant_id, title, description, price_idr, stock,"
            " status) VALUES (%s, %s, 't', 'short', 10.50, 3, 'live')",
            (PRODUCT, MERCHANT),
        )
        conn.execute(
            "INSERT INTO shop.orders (id, buyer_id, merchant_id, status, total_idr)"
            " VALUES (%s, %s, %s, 'created', 99.00)",
            (ORDER, USER, MERCHANT),
        )
        conn.execute(
            "INSERT INTO shop.order_items (order_id, line_no, product_id, qty, unit_price_idr)"
            " VALUES (%s, 1, %s, 1, 99.00)",
            (ORDER, PRODUCT),
        )


def _break(dsn: str) -> None:
    """The three bad values; the NaN shares its transaction with a good change."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("UPDATE shop.orders SET total_idr = 'NaN' WHERE id = %s", (ORDER,))
            conn.execute(
                "UPDATE shop.users SET display_name = 'same tx as the NaN' WHERE id = %s", (USER,)
            )
        conn.execute("UPDATE shop.users SET updated_at = 'infinity' WHERE id = %s", (USER,))
        conn.execute(
            "UPDATE shop.products SET description = repeat('x', %s) WHERE id = %s",
            (BIG, PRODUCT),
        )


def _letters(dsn: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            "SELECT * FROM cutover.producer_dead_letters WHERE source_table <> '' ORDER BY id"
        ).fetchall()


def _until(what: str, check: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _commerce(dsn: str, query: str, *params: object) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _gate(scenario: Scenario, domain: str) -> Any:
    results = evaluate(collect(scenario.settings(), domain), scenario.settings().gates)
    return next(g for g in results if g.name == "dead_letters")


EXPECTED = {
    # table: (key, reason, column, domain)
    "shop.orders": (f'{{"id": {ORDER}}}', "non_finite_decimal", "total_idr", "payment"),
    "shop.users": (f'{{"id": {USER}}}', "infinite_timestamp", "updated_at", "data"),
    "shop.products": (f'{{"id": {PRODUCT}}}', "message_too_large", None, "merchant"),
}


def test_bad_values_become_dead_letters_and_resume(scenario: Scenario) -> None:
    legacy, commerce = scenario.source_dsn, scenario.target_dsn
    prefill(legacy, orders=300, seed=11)
    report = harness.init(scenario)
    assert any("largest row event" in json.dumps(a) for a in report.get("actions", [])), (
        report
    )  # init says what the largest row can be
    producer = scenario.start_produce()
    applier = _start_apply(scenario, "a", 0)
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            run_workload(legacy, rate=150, duration=10, seed=12)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    writer = threading.Thread(target=traffic)
    try:
        writer.start()
        time.sleep(2)
        # Seeded once the workload has read its id ranges: it never picks these rows.
        _seed(legacy)
        _until("the seeded order in commerce", lambda: _commerce(
            commerce, "SELECT total_minor FROM commerce.orders WHERE order_id = %s", ORDER
        ) == 9900)  # fmt: skip
        _break(legacy)
        _until("three producer dead letters", lambda: len(_letters(legacy)) >= 3)
        letters = _letters(legacy)
        assert {letter["source_table"] for letter in letters} == set(EXPECTED)
        for letter in letters:
            key, reason, column, domain = EXPECTED[letter["source_table"]]
            assert (letter["row_key"], letter["reason"], letter["column_name"]) == (
                key, reason, column,
            )  # fmt: skip
            assert letter["domain"] == domain and letter["status"] == "open"
            assert letter["source_lsn"] > 0
        # The rest of the NaN's transaction, and rows written after the letters, flow.
        _until("the rest of the NaN's transaction", lambda: _commerce(
            commerce, "SELECT display_name FROM commerce.customers WHERE customer_id = %s", USER
        ) == "same tx as the NaN")  # fmt: skip
        with psycopg.connect(legacy, autocommit=True) as conn:
            conn.execute("UPDATE shop.merchants SET rating = 4.5 WHERE id = %s", (MERCHANT,))
        _until("a later change of another row", lambda: _commerce(
            commerce, "SELECT rating FROM commerce.sellers WHERE seller_id = %s", MERCHANT
        ) is not None)  # fmt: skip
        assert producer.poll() is None and applier.poll() is None  # both still running
        writer.join(timeout=120)
        assert not errors, errors
        # What went to the DLQ topic: where and why, never a value.
        dlq = read_all(scenario.bootstrap, [f"{scenario.prefix}.dlq"])
        assert len(dlq) >= 3
        for message in dlq:
            headers = dict(message.headers or [])
            assert headers["cutover.origin"] == b"producer"
            assert headers["cutover.table"].decode() in EXPECTED
            assert headers["cutover.lsn"] and headers["cutover.key"]
            blob = (message.value or b"") + b"".join(headers.values())
            assert b"NaN" not in blob and b"infinity" not in blob and b"xxxx" not in blob
        for domain in ("payment", "data", "merchant"):
            gate = _gate(scenario, domain)
            assert not gate.passed and "withheld by the producer" in gate.why, gate.why
        listed = scenario.cli("dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr[-2000:]
        produced = [x for x in json.loads(listed.stdout) if x["origin"] == "producer"]
        assert {x["source_table"] for x in produced} == set(EXPECTED)
        assert all("LSN" in x["error"] and "key" in x["error"] for x in produced)

        # The documented resume: fix the rows in legacy; their next change flows.
        with psycopg.connect(legacy, autocommit=True) as conn:
            conn.execute("UPDATE shop.orders SET total_idr = 99.00 WHERE id = %s", (ORDER,))
            conn.execute("UPDATE shop.users SET updated_at = now() WHERE id = %s", (USER,))
            conn.execute(
                "UPDATE shop.products SET description = 'short again' WHERE id = %s", (PRODUCT,)
            )
        _until("the letters resolved", lambda: all(
            x["status"] == "resolved" for x in _letters(legacy)
        ))  # fmt: skip
        _wait_equal(legacy, commerce, timeout=180)
        for domain in ("payment", "data", "merchant"):
            gate = _gate(scenario, domain)
            assert gate.passed, gate.why
        assert producer.poll() is None
    finally:
        if writer.is_alive():
            writer.join(timeout=120)
        applier_code = stop(applier)
        producer_code = stop(producer)
    assert (producer_code, applier_code) == (0, 0)
    assert all(d.ok for d in compare(legacy, commerce))
    verify = scenario.cli("verify", "--json")
    assert verify.returncode == 0, verify.stdout[-3000:] + verify.stderr[-3000:]


def test_halt_policy_stops_naming_table_key_and_lsn(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    with open_scenario(
        fresh_legacy,
        fresh_commerce,
        kafka_bootstrap,
        tmp_path,
        apply_settings={"dlq_policy": "halt"},
    ) as scenario:
        _seed(fresh_legacy)
        harness.init(scenario)
        first = scenario.cli("produce", "--exit-when-idle")
        assert first.returncode == 0, first.stderr[-3000:]
        before, _ = scenario.slot_state()
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            conn.execute("UPDATE shop.orders SET total_idr = 'NaN' WHERE id = %s", (ORDER,))
        for _ in range(2):  # the same stop after a restart: the slot did not move past it
            result = scenario.cli("produce", "--exit-when-idle", "--no-initial-snapshot")
            assert result.returncode == 3, result.stderr[-3000:]
            for part in ("shop.orders", f'{{"id": {ORDER}}}', "at LSN", "non_finite_decimal",
                         "cutover snapshot --table orders", "dlq_policy"):  # fmt: skip
                assert part in result.stderr, result.stderr[-3000:]
            assert "NaN" not in result.stderr
            assert scenario.slot_state()[0] == before
        assert _letters(fresh_legacy) == []
