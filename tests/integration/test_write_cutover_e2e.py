"""The write cutover end to end with the REAL reverse path (issue 11), on the real stack.

One lifecycle of all three domains while the workload writes THROUGH THE ROUTER
(:func:`devtools.workload_router.run_routed_workload`): the forward producer and two appliers,
the reverse producer and applier (``produce --reverse``, ``apply --reverse``), all real
``python -m cli.entry`` processes; every transition a real ``cutover`` command.

switch-writes payment, data, merchant → rollback-writes payment → re-switch → complete all three.
Along the way ``switch-writes`` is killed with SIGKILL at each of its steps (the hidden
``--crash-at`` option: the process kills itself right after the step is recorded), and
``rollback-writes`` at its drain step. After every kill: never both sides writable (a write is
tried on each side: the fenced one refuses with the fence's retryable error), ``status`` names
the step where it stopped, and the next command resumes it (or ``rollback-writes`` undoes it).
The reverse applier is killed with SIGKILL mid-stream and restarted.

At the end, independently of the product's code: commerce equals legacy mapped
(:mod:`tests.integration.shop_compare`); legacy's mapped columns equal an oracle (the same plan
prefix run plainly on identical starting rows: no acknowledged write lost, none applied twice),
and so does commerce; the social columns (handle, bio, follower_count) are exactly what the
legacy social app wrote.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cutover import fence
from cutover.mapping import load_mapping
from cutover.routing import ReadRouter, RouterConfig
from devtools.harness import Scenario
from devtools.scratch import scratch_database
from devtools.workload import WorkloadReport, prefill, run_workload
from devtools.workload_router import run_routed_workload
from tests.integration.conftest import EXAMPLES
from tests.integration.faults_support import Pipeline, running_pipeline, wait_equal
from tests.integration.shop_compare import _TABLES, compare

# Over a minute (a fault-matrix test); under the load of a shared 2-core machine the set-up alone
# (prefill, snapshot, three switch-reads) can take minutes.
pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(1800)]

ORDERS = 300  # prefill (running_pipeline's seed 11; the oracle gets the same rows)
SEED = 23  # the workload's plan
RATE = 40.0  # tx/s through the router: enough traffic to meet every fence, light under load
GATES = {"min_reads_soak_minutes": 0, "min_writes_soak_minutes": 0}

# A write of each domain on each side: (legacy statement, commerce statement). Tried inside a
# transaction that is rolled back: it proves whether the side takes the domain's writes, and
# leaves nothing behind either way.
PROBES = {
    "payment": (
        "UPDATE shop.payments SET amount_idr = amount_idr"
        " WHERE id = (SELECT min(id) FROM shop.payments)",
        "UPDATE commerce.payments SET amount_minor = amount_minor"
        " WHERE payment_id = (SELECT min(payment_id) FROM commerce.payments)",
    ),
    "data": (
        "UPDATE shop.users SET display_name = display_name"
        " WHERE id = (SELECT min(id) FROM shop.users)",
        "UPDATE commerce.customers SET display_name = display_name"
        " WHERE customer_id = (SELECT min(customer_id) FROM commerce.customers)",
    ),
    "merchant": (
        "UPDATE shop.merchants SET shop_name = shop_name"
        " WHERE id = (SELECT min(id) FROM shop.merchants)",
        "UPDATE commerce.sellers SET name = name"
        " WHERE seller_id = (SELECT min(seller_id) FROM commerce.sellers)",
    ),
}
SOCIAL_USERS = 12  # users the legacy social app writes, per round


class RoutedTraffic:
    """The routed workload in a background thread until :meth:`finish`."""

    def __init__(self, router: ReadRouter, legacy: str, commerce: str) -> None:
        self._stop = threading.Event()
        self.report: WorkloadReport | None = None
        self.error: BaseException | None = None
        args = (router, legacy, commerce, load_mapping(EXAMPLES / "mapping.toml"))
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def _run(self, *args: Any) -> None:
        try:
            self.report = run_routed_workload(
                *args,
                rate=RATE,
                seed=SEED,
                duration=1500.0,
                stop=self._stop.is_set,
                # The test holds a domain mid-transition on purpose (kill, checks, resume), for
                # minutes under load: the writer keeps waiting rather than giving up.
                give_up_s=900.0,
            )
        except BaseException as exc:  # judged by the test
            self.error = exc

    def check(self) -> None:
        assert self.error is None, f"the routed workload failed: {self.error}"
        assert self._thread.is_alive(), "the routed workload ended early"

    def finish(self) -> WorkloadReport:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the routed workload did not stop"
        assert self.error is None, f"the routed workload failed: {self.error}"
        assert self.report is not None
        return self.report


class Lifecycle:
    """The scenario's processes and commands, and the checks made after each kill."""

    def __init__(self, pipe: Pipeline, legacy: str, commerce: str) -> None:
        self.pipe = pipe
        self.sc: Scenario = pipe.scenario
        self.legacy = legacy
        self.commerce = commerce
        self.reverse: dict[str, subprocess.Popen[bytes]] = {}

    def start_reverse(self, name: str) -> None:
        what = ["produce", "--reverse"] if name == "produce-reverse" else ["apply", "--reverse"]
        with (self.sc.workdir / f"{name}.log").open("ab") as log:
            self.reverse[name] = subprocess.Popen(
                [sys.executable, "-m", "cli.entry", "--config", str(self.sc.config),
                 "--log-json", *what],
                env=self.sc.env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def command(self, *args: str, crash_at: str | None = None) -> dict[str, Any]:
        """Run a transition command; killed by --crash-at: SIGKILL asserted, {} returned."""
        crash = ("--crash-at", crash_at) if crash_at else ()
        done = self.sc.cli(*args, "--yes", "--json", *crash, timeout=400)
        if crash_at:
            assert done.returncode == -9, (args, crash_at, done.returncode, done.stderr[-2000:])
            return {}
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    def status(self, domain: str) -> dict[str, Any]:
        done = self.sc.cli("status", "--json", "--no-gates")
        assert done.returncode == 0, done.stderr
        entries = json.loads(done.stdout)["domains"]
        entry: dict[str, Any] = next(d for d in entries if d["domain"] == domain)
        return entry

    def writable(self, domain: str) -> tuple[bool, bool]:
        """(legacy takes a write of ``domain``, commerce does); a refusal must be the fence's."""
        takes = []
        for dsn, query in zip((self.legacy, self.commerce), PROBES[domain], strict=True):
            with psycopg.connect(dsn) as conn:
                try:
                    conn.execute(query.encode())
                    takes.append(True)
                except psycopg.Error as exc:
                    assert fence.is_fence_refusal(exc), f"not the fence's refusal: {exc}"
                    assert f"domain {domain} is fenced" in str(exc), str(exc)
                    assert "routing" in (exc.diag.message_hint or ""), exc.diag.message_hint
                    takes.append(False)
                finally:
                    conn.rollback()
        return takes[0], takes[1]

    def after_kill(self, domain: str, step: str) -> None:
        """A killed command: never both sides writable, and status names where it stopped."""
        legacy, commerce = self.writable(domain)
        assert not (legacy and commerce), f"{domain}: both sides writable after a kill at {step}"
        assert not legacy, f"{domain}: legacy writable in flight (killed after {step})"
        entry = self.status(domain)
        pending = entry["pending"]
        assert pending is not None and pending["step"] == step, (domain, step, entry)

    def settled(self, domain: str, state: str, commerce_fenced: bool = True) -> None:
        """``domain`` is in ``state`` with the right side writable. Commerce's fence of a domain
        goes up only when its writes come back (rollback-writes): before the first switch-writes
        no application writes there and init leaves it lowered (docs/CUTOVER.md)."""
        assert self.status(domain)["state"] == state
        if state == "writes_switched":
            assert self.writable(domain) == (False, True), (domain, state)
        else:
            expected = (True, not commerce_fenced)
            assert self.writable(domain) == expected, (domain, state)


def _social_round(legacy: str, round_no: int, expected: dict[int, tuple[Any, ...]]) -> None:
    """The legacy social app writes its own columns of some users (fence narrowed: allowed)."""
    with psycopg.connect(legacy, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM shop.users ORDER BY id LIMIT %s",
                                          [SOCIAL_USERS * 2]).fetchall()]  # fmt: skip
        for uid in ids[round_no % 2 :: 2]:
            values = (f"soc{round_no}u{uid}", f"social bio {round_no}/{uid}", 1000 * round_no + uid)
            conn.execute(
                "UPDATE shop.users SET handle = %s, bio = %s, follower_count = %s WHERE id = %s",
                [*values, uid],
            )
            expected[uid] = values


def _social(legacy: str) -> dict[int, tuple[Any, ...]]:
    with psycopg.connect(legacy) as conn:
        rows = conn.execute("SELECT id, handle, bio, follower_count FROM shop.users").fetchall()
    return {int(r[0]): tuple(r[1:]) for r in rows}


def _mapped(dsn: str, query: str, nkey: int) -> dict[Any, tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        rows = conn.execute(query.encode()).fetchall()
    return {r[:nkey] if nkey > 1 else r[0]: tuple(r) for r in rows}


@contextlib.contextmanager
def _oracle(source_dsn: str) -> Iterator[str]:
    with contextlib.contextmanager(scratch_database)(
        source_dsn, EXAMPLES / "legacy.sql", "lc_oracle"
    ) as dsn:
        yield dsn


def test_write_cutover_lifecycle_with_the_real_reverse_path(
    fresh_legacy: str,
    fresh_commerce: str,
    kafka_bootstrap: str,
    source_dsn: str,
    tmp_path: Path,
) -> None:
    legacy, commerce = fresh_legacy, fresh_commerce
    with (
        _oracle(source_dsn) as oracle,
        running_pipeline(
            legacy, commerce, kafka_bootstrap, tmp_path, orders=ORDERS, gate_settings=GATES
        ) as pipe,
    ):
        prefill(oracle, orders=ORDERS, seed=11)  # the same starting rows as legacy
        # The commands' gates measure the lag of the [apply] group: the appliers' group.
        pipe.scenario.apply_settings = {"group_id": pipe.group}
        lc = Lifecycle(pipe, legacy, commerce)
        report = json.loads(lc.sc.cli("init", "--json", "--reverse").stdout)
        assert any(a["object"].startswith("reverse: slot") for a in report["actions"])
        lc.start_reverse("produce-reverse")
        lc.start_reverse("apply-reverse")
        wait_equal(legacy, commerce, timeout=300)
        assert lc.sc.cli("verify").returncode == 0
        for d in PROBES:
            assert lc.command("switch-reads", d)["to_state"] == "reads_switched"
            lc.settled(d, "reads_switched", commerce_fenced=False)

        config = RouterConfig(legacy_dsn=legacy, commerce_dsn=commerce)
        router = ReadRouter(config, list(PROBES), mode="table", poll_interval_s=0.2).start()
        traffic = RoutedTraffic(router, legacy, commerce)
        expected_social: dict[int, tuple[Any, ...]] = {}
        try:
            # payment: killed right after legacy's fence went up; the next run resumes.
            lc.command("switch-writes", "payment", crash_at="after_fence")
            lc.after_kill("payment", "fence_legacy")
            assert lc.command("switch-writes", "payment")["outcome"] == "resumed"
            lc.settled("payment", "writes_switched")

            # data: killed after the drain; rollback-writes undoes the unpublished switch.
            lc.command("switch-writes", "data", crash_at="after_drain")
            lc.after_kill("data", "drain_forward")
            lc.command("rollback-writes", "data")
            lc.settled("data", "reads_switched", commerce_fenced=False)  # it never opened
            # Again: killed after the final verify, then after the publication, then resumed.
            lc.command("switch-writes", "data", crash_at="after_verify")
            lc.after_kill("data", "verify")
            lc.command("switch-writes", "data", crash_at="after_publish")
            lc.after_kill("data", "open_commerce")
            lc.command("switch-writes", "data")
            lc.settled("data", "writes_switched")
            # From here on nothing but the legacy social app writes legacy's social columns.
            expected_social = _social(legacy)
            _social_round(legacy, 1, expected_social)

            # merchant: killed after the reverse path check; resumed.
            lc.command("switch-writes", "merchant", crash_at="after_reverse")
            lc.after_kill("merchant", "reverse_ready")
            lc.command("switch-writes", "merchant")
            lc.settled("merchant", "writes_switched")
            traffic.check()

            # kill -9 of the reverse applier mid-stream: every domain's writes are on commerce.
            lc.reverse["apply-reverse"].kill()
            assert lc.reverse["apply-reverse"].wait(timeout=30) == -9
            _social_round(legacy, 2, expected_social)
            lc.start_reverse("apply-reverse")

            # rollback-writes payment, killed at its drain of the reverse stream; resumed.
            lc.command("rollback-writes", "payment", crash_at="after_drain")
            lc.after_kill("payment", "drain_reverse")
            assert lc.command("rollback-writes", "payment")["outcome"] == "resumed"
            lc.settled("payment", "reads_switched")
            # re-switch, killed once commerce was opened (before the publication); resumed.
            lc.command("switch-writes", "payment", crash_at="after_open")
            lc.after_kill("payment", "open_commerce")
            lc.command("switch-writes", "payment")
            lc.settled("payment", "writes_switched")
            _social_round(legacy, 3, expected_social)
        finally:
            workload_report = traffic.finish()
            router.close()
        routed = workload_report.router
        assert routed["retries"] > 0, routed  # the fences met the workload
        assert all(routed["written"][d]["commerce"] > 0 for d in PROBES), routed["written"]

        # Both directions drained; forward stopped (completing the last domain drops its slot).
        wait_equal(legacy, commerce, timeout=300)
        pipe.stop_all()
        for d in PROBES:
            done = lc.command("complete", d)
            assert done["to_state"] == "completed", done
        assert lc.writable("payment") == (False, True)
        for name, proc in lc.reverse.items():
            assert proc.poll() is None, f"{name} died: see {lc.sc.workdir}/{name}.log"
            proc.terminate()
            assert proc.wait(timeout=60) == 0, name

        # Forward: commerce is legacy mapped (independent SQL).
        assert all(d.ok for d in compare(legacy, commerce)), compare(legacy, commerce)
        # The oracle: the same plan prefix, plainly, on the same starting rows.
        run_workload(oracle, rate=10_000, seed=SEED, max_transactions=workload_report.transactions)
        assert all(d.ok for d in compare(oracle, commerce)), [
            d for d in compare(oracle, commerce) if not d.ok
        ]
        # Reverse: legacy's mapped columns are the oracle's (nothing lost, nothing twice).
        for table, nkey, legacy_sql, _commerce_sql in _TABLES:
            got, want = _mapped(legacy, legacy_sql, nkey), _mapped(oracle, legacy_sql, nkey)
            diff = [k for k in want.keys() | got.keys() if got.get(k) != want.get(k)]
            assert not diff, (table, sorted(diff)[:10])
        # Social columns: exactly what legacy had at data's switch plus the social app's writes.
        social = _social(legacy)
        assert {u: social[u] for u in expected_social} == expected_social
