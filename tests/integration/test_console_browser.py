"""The web console in a real browser (headless Debian Chromium driven by Playwright) on the real
stack: log in, the overview's live values, a switch refused by its gates and done after
`cutover verify`, a viewer refused, an action without its CSRF token refused. The overview's
screenshot is saved under tmp/artifacts/.

One console process (``python -m cli.entry console``) on a staged pipeline for the whole file.
Chromium comes from Debian (``apt-get install chromium``), never from ``playwright install``;
under CI=true a missing Chromium fails the tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from console.auth import hash_password
from devtools.harness import Scenario
from devtools.ports import free_port
from tests.integration.conftest import REPO, skip_or_fail
from tests.integration.test_verify_support import (
    beat,
    commerce,
    staged_scenario,
)

pytestmark = pytest.mark.integration


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "tmp" / "artifacts"
PASSWORD = "correct horse battery"
SECRET = "console-test-secret-" + "x" * 24
#: Generous under load (8 helpers on 2 cores, load average 25 seen); the console itself refreshes
#: every second, and an action evaluates its gates (both databases and Kafka) before it answers.
TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def staged(
    source_dsn: str, target_dsn: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    """A healthy-looking pipeline (slot, heartbeat, offsets, data on both sides), NOT verified."""
    workdir = tmp_path_factory.mktemp("console")
    with staged_scenario(source_dsn, target_dsn, kafka_bootstrap, workdir, orders=100) as (scn, _):
        yield scn


@pytest.fixture(scope="module")
def console_url(staged: Scenario) -> Iterator[str]:
    """``cutover console`` serving the staged pipeline; users ann (operator), vic (viewer)."""
    digest = hash_password(PASSWORD)  # the CLI helper: tests/unit/test_console.py
    staged.write_config()
    config = staged.workdir / "console.toml"
    users = "".join(
        f'[console.users.{name}]\nrole = "{role}"\npassword_hash = "{digest}"\n'
        for name, role in (("ann", "operator"), ("vic", "viewer"))
    )
    config.write_text(staged.config.read_text() + "[console]\n" + users)
    port = free_port()
    log = (staged.workdir / "console.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.entry",
            "--config",
            str(config),
            "console",
            "--port",
            str(port),
        ],
        env=staged.env({"CUTOVER_CONSOLE_SECRET": SECRET}),
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/login", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (staged.workdir / "console.log").read_text()
            assert time.monotonic() < deadline, "the console did not answer within 90 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert SECRET not in (staged.workdir / "console.log").read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        skip_or_fail("no /usr/bin/chromium: apt-get install -y chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _audit_count(staged: Scenario) -> int:
    return int(commerce(staged.settings(), "SELECT count(*) FROM cutover.audit")[0][0])


def _login(browser: Browser, url: str, user: str, password: str = PASSWORD) -> Page:
    context = browser.new_context(base_url=url)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto("/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("#login button")
    return page


def test_login_and_live_overview(browser: Browser, console_url: str, staged: Scenario) -> None:
    wrong = _login(browser, console_url, "ann", "not the password")
    expect(wrong.locator("#login-error")).to_contain_text("wrong user name or password")
    wrong.context.close()

    page = _login(browser, console_url, "ann")
    expect(page.locator("#whoami")).to_have_text("ann (operator)")
    for domain in ("payment", "data", "merchant"):
        expect(page.locator(f"#domain-{domain} .state")).to_contain_text("replicating")
    expect(page.locator("#slot")).to_contain_text(staged.slot)
    # The gates arrive from their own reader; the verify gate fails (nothing verified yet).
    expect(page.locator("li.gate.fail[data-gate=verify][data-domain=payment]")).to_be_visible()
    # Live: a heartbeat written now shows up on the page without a reload.
    beat(staged.settings(), age_s=777)
    started = time.monotonic()
    expect(page.locator("#heartbeat")).to_have_text(re.compile(r"^7[78]\d\.\d s ago"))
    seen_after_s = time.monotonic() - started
    page.wait_for_function("Number(document.body.dataset.updates || 0) >= 2")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "console-overview.png"), full_page=True)
    print(f"console: a new heartbeat was on the page {seen_after_s:.1f} s after it was written")
    letters = page.goto("/dead-letters")
    assert letters is not None and letters.status < 500
    expect(page.locator("h1")).to_have_text("Dead letters")
    page.context.close()


def test_switch_refused_by_gate_then_done_after_verify(
    browser: Browser, console_url: str, staged: Scenario
) -> None:
    beat(staged.settings())
    page = _login(browser, console_url, "ann")
    page.click("#dry-switch-reads-payment")
    expect(page.locator("#outcome")).to_contain_text("would be refused")
    expect(page.locator("li.gate.fail[data-gate=verify]")).to_be_visible()
    page.fill("#confirm", "payment")
    page.click("#run")
    expect(page.locator("#refused")).to_contain_text("refused")
    expect(page.locator("#refused")).to_contain_text("verify")

    verify = staged.cli("verify", "--domain", "payment")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    beat(staged.settings())
    page.goto("/")
    page.click("#dry-switch-reads-payment")
    expect(page.locator("#outcome")).to_contain_text("would go ahead")
    page.fill("#confirm", "payment")
    page.click("#run")
    expect(page.locator("#outcome")).to_have_attribute("data-outcome", "done")
    page.goto("/")
    expect(page.locator("#domain-payment .state")).to_contain_text("reads_switched")
    expect(page.locator("#progress")).to_have_text("60")
    page.goto("/audit?domain=payment&command=switch-reads&outcome=done")
    expect(page.locator("#audit tbody tr").first).to_have_attribute("data-actor", "ann")
    page.context.close()


def test_viewer_sees_no_button_and_is_refused(browser: Browser, console_url: str) -> None:
    page = _login(browser, console_url, "vic")
    expect(page.locator("#whoami")).to_have_text("vic (viewer)")
    expect(page.locator("#domain-payment")).to_be_visible()
    assert page.locator("#actions").count() == 0
    assert page.locator("button", has_text="dry run").count() == 0
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    forged = page.request.post(
        "/actions/switch-reads/data/dry-run", form={"csrf_token": token or ""}
    )
    assert forged.status == 403
    forged = page.request.post(
        "/actions/switch-reads/data", form={"csrf_token": token or "", "confirm": "data"}
    )
    assert forged.status == 403
    page.context.close()


def test_action_without_csrf_token_refused(
    browser: Browser, console_url: str, staged: Scenario
) -> None:
    page = _login(browser, console_url, "ann")
    expect(page.locator("#whoami")).to_have_text("ann (operator)")
    before = _audit_count(staged)
    missing = page.request.post("/actions/switch-reads/data/dry-run", form={})
    assert missing.status == 403
    wrong = page.request.post(
        "/actions/rollback/payment", form={"csrf_token": "forged", "confirm": "payment"}
    )
    assert wrong.status == 403
    assert _audit_count(staged) == before  # refused before anything ran: not even audited
    page.context.close()
