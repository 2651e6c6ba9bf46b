"""Issue 12's publication and schema-drift rows, end to end under the workload: legacy →
`cutover produce` → Kafka → `cutover apply` × 2 → commerce while the workload writes.

A mapped table leaves the publication, or a mapped column is renamed, in the middle of the
traffic. Before this was watched, the table's changes silently stopped flowing (or all became
dead letters) while every gate stayed green. Now: the producer stops (exit 3) naming the table,
the cause and the fix; the domain's ``capture`` gate is red; after the documented resume (restore
the publication or update the mapping, ``cutover init``, ``cutover produce``, ``cutover snapshot
--table T``) the independent comparison finds commerce equal to the mapped legacy and ``cutover
verify`` exits 0.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from control.gate_evidence import collect
from control.gates import evaluate
from devtools import harness
from tests.integration.faults_support import (
    Pipeline,
    Traffic,
    running_pipeline,
    wait_equal,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CASES = {
    # case: (statement, table, domain, cause, mapping fix (old, new), legacy column renames,
    #        whether the workload (an app of the old shape) runs across the change)
    "drop_from_publication": (
        "ALTER PUBLICATION {pub} DROP TABLE shop.merchants",
        "merchants",
        "merchant",
        "the table left the publication",
        [],
        {},
        True,
    ),
    "rename_column": (
        "ALTER TABLE shop.merchants RENAME COLUMN shop_name TO name",
        "merchants",
        "merchant",
        "mapped column(s) shop_name no longer published",
        [('name = "shop_name"', 'name = "name"')],
        {"shop_name": "name"},
        False,  # the workload writes shop_name: it stops before the rename, as the old app would
    ),
}
# Changes of the new shape right after the statement (the column is `name` after the rename).
AFTER = (
    "UPDATE shop.merchants SET status = 'suspended'"
    " WHERE id = (SELECT min(id) FROM shop.merchants)",
    "UPDATE shop.merchants SET {col} = {col} || ' (after)' WHERE id = (SELECT max(id) FROM"
    " shop.merchants)",
)


def _restart_appliers(pipe: Pipeline) -> None:
    """The appliers read the mapping once: after a mapping change they are restarted."""
    for name in list(pipe.appliers):
        pipe.kill_apply(name)
        pipe.start_apply(name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lost_capture_under_workload_stops_and_resumes_to_equal(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path, case: str
) -> None:
    statement, table, domain, cause, fixes, renames, across = CASES[case]
    legacy, commerce = fresh_legacy, fresh_commerce
    with running_pipeline(legacy, commerce, kafka_bootstrap, tmp_path, orders=300) as pipe:
        scenario = pipe.scenario
        traffic = Traffic(legacy, rate=150, duration=20, seed=71)
        time.sleep(5)
        if not across:
            traffic.join()
        with psycopg.connect(legacy, autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(pub=sql.Identifier(scenario.publication)))
            for after in AFTER:
                col = sql.Identifier(renames.get("shop_name", "shop_name"))
                conn.execute(sql.SQL(after).format(col=col))
        wait_for(lambda: pipe.producer_code() is not None, 90, "the producer to stop")
        assert pipe.producer_code() == 3, pipe.producer_log()[-3000:]
        log = pipe.producer_log()
        assert f"shop.{table}" in log and cause in log and "cutover init" in log, log[-3000:]
        pipe.reap_producer()
        settings = scenario.settings()
        gates = {g.name: g for g in evaluate(collect(settings, domain), settings.gates)}
        assert not gates["capture"].passed and f"shop.{table}" in gates["capture"].why
        traffic.join()
        assert not traffic.errors, traffic.errors

        # The documented resume.
        if fixes:
            text = harness.MAPPING.read_text()
            for old, new in fixes:
                assert old in text
                text = text.replace(old, new)
            scenario.mapping = tmp_path / "mapping.toml"
            scenario.mapping.write_text(text)
            _restart_appliers(pipe)
        harness.init(scenario)
        pipe.start_producer()
        snap = scenario.cli("snapshot", "--table", table)
        assert snap.returncode == 0, snap.stderr[-2000:]
        wait_equal(legacy, commerce, 240, legacy_renames=renames)
        assert pipe.producer_code() is None and not pipe.dead_appliers(), pipe.log_text()[-3000:]
        verify = scenario.cli("verify", "--domain", domain)
        assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
