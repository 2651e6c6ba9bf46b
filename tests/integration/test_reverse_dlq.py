"""Dead letters of the reverse applier (commerce → legacy), on the real stack.

Commerce's team adds a seller state the mapping's explicit enum does not know ('BANNED'): the
reverse mapping refuses the change, the reverse applier records a dead letter in legacy's
``[reverse] control_schema`` and goes on. ``cutover dlq list --reverse`` shows it (and the forward
list does not); ``dlq retry --reverse`` fails again until the mapping and legacy learn the
state, then applies it through the legacy sink and marks the letter retried.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.harness import Scenario, init, open_scenario, stop
from tests.integration.conftest import EXAMPLES

pytestmark = pytest.mark.integration

BASE = 900_000_000
SELLER = (
    "INSERT INTO commerce.sellers (seller_id, owner_customer_id, name, state, rating, created_at,"
    " updated_at, _src_lsn, _src_seq) VALUES (%s, 1, %s, %s, 4.5, now(), now(), 0, 0)"
)


def _letters(sc: Scenario, *args: str) -> list[dict[str, Any]]:
    done = sc.cli("dlq", "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    out: list[dict[str, Any]] = json.loads(done.stdout)
    return out


def _legacy_status(legacy: str, merchant_id: int) -> str | None:
    with psycopg.connect(legacy) as conn:
        row = conn.execute("SELECT status FROM shop.merchants WHERE id = %s", [merchant_id])
        found = row.fetchone()
    return None if found is None else str(found[0])


def _start(sc: Scenario, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.entry", "--config", str(sc.config), "--log-json", *args],
            env=sc.env(), stdout=log, stderr=log,
        )  # fmt: skip


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_poison_reverse_event_is_a_reverse_dead_letter(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    mapping = tmp_path / "mapping.toml"
    mapping.write_text((EXAMPLES / "mapping.toml").read_text())
    with open_scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=1, mapping=mapping
    ) as sc:
        init(sc, "--reverse")
        with psycopg.connect(fresh_commerce, autocommit=True) as conn:
            conn.execute("ALTER TABLE commerce.sellers DROP CONSTRAINT sellers_state_check")
            conn.execute(SELLER, [BASE, "good", "ACTIVE"])
            conn.execute(SELLER, [BASE + 1, "poison", "BANNED"])
            conn.execute(SELLER, [BASE + 2, "after", "SUSPENDED"])
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for what in (["produce", "--reverse"], ["apply", "--reverse"]):
                procs.append(_start(sc, tmp_path / f"{what[0]}-reverse.log", *what))
            # The applier goes on past the poison: the change after it is applied.
            _wait(lambda: _legacy_status(fresh_legacy, BASE + 2) == "suspended", 120, "apply")
            assert _legacy_status(fresh_legacy, BASE) == "active"
            assert _legacy_status(fresh_legacy, BASE + 1) is None
            _wait(lambda: _letters(sc, "--reverse"), 30, "the reverse dead letter")
        finally:
            codes = [stop(p) for p in procs]
        assert codes == [0, 0]

        [letter] = _letters(sc, "--reverse")
        assert letter["status"] == "open" and letter["domain"] == "merchant"
        assert letter["topic"] == f"{sc.prefix}.reverse.merchant"
        assert "BANNED" in letter["error"], letter
        assert _letters(sc) == []  # the forward appliers' letters (commerce): none
        text = sc.cli("dlq", "list", "--reverse", extra_env={"COLUMNS": "250"})
        assert "BANNED" in text.stdout and "reverse.merchant" in text.stdout, text.stdout

        # Retried as it is: refused again, stays open (exit 1).
        again = sc.cli("dlq", "retry", "--reverse", "--all", "--json")
        assert again.returncode == 1, again.stderr
        assert [f["id"] for f in json.loads(again.stdout)["failed"]] == [letter["id"]]
        assert _legacy_status(fresh_legacy, BASE + 1) is None

        # The state is adopted on purpose: the mapping's enum and legacy's CHECK learn it.
        mapping.write_text(
            mapping.read_text().replace(
                'closed = "CLOSED" }', 'closed = "CLOSED", banned = "BANNED" }'
            )
        )
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            conn.execute(
                "ALTER TABLE shop.merchants DROP CONSTRAINT merchants_status_check, ADD"
                " CONSTRAINT merchants_status_check"
                " CHECK (status IN ('active', 'suspended', 'closed', 'banned'))"
            )
        fixed = sc.cli("dlq", "retry", "--reverse", "--id", str(letter["id"]), "--json")
        assert fixed.returncode == 0, (fixed.stdout, fixed.stderr)
        assert json.loads(fixed.stdout)["retried"] == [letter["id"]]
        assert _legacy_status(fresh_legacy, BASE + 1) == "banned"
        assert _letters(sc, "--reverse", "--status", "open") == []
