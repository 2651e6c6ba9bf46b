"""The local stack's Prometheus (``make up PROMETHEUS=1``, ``python -m devtools.stack up
--prometheus``): Debian's ``prometheus`` package (2.42), run by us as a plain process on a free
loopback port (the package's own service is never used), its data in ``<stack>/prometheus/``.

* It loads ``ops/prometheus-alerts.yml`` and scrapes two jobs, ``cutover-produce`` and
  ``cutover-apply`` (the names the rules expect), every 2 s.
* Targets come from files (file-based service discovery), so that processes started later on
  any port are scraped: each process is one file ``<stack>/prometheus/targets/<job>-<name>.json``
  holding ``[{"targets": ["127.0.0.1:PORT"], "labels": {...}}]``. :func:`add_target` writes one,
  :func:`remove_target` deletes it; Prometheus notices within seconds (inotify, and a re-read
  every 5 s). ``python -m devtools.prometheus_stack target cutover-apply NAME PORT`` does the
  same from a shell (the demo). A removed file drops the target, so a process that stops on
  purpose is not reported down; a process that dies with its file in place is (``up == 0``).
* :func:`start` waits for ``/-/ready`` and returns the URL that :mod:`devtools.stack` writes to
  ``<stack>/env`` as ``CUTOVER_PROMETHEUS_URL`` (with ``CUTOVER_PROMETHEUS_TARGETS``, the
  targets folder); :func:`stop` stops it (``make down``).

Its state (port, pid) lives in ``<stack>/prometheus.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from cutover.errors import CutoverError, StackError
from devtools import sidecar
from devtools.ports import free_port
from devtools.procs import pid_alive
from devtools.stack import _say, ensure_prerequisites

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "ops" / "prometheus-alerts.yml"
JOBS = ("cutover-produce", "cutover-apply")
ENV_URL = "CUTOVER_PROMETHEUS_URL"
ENV_TARGETS = "CUTOVER_PROMETHEUS_TARGETS"
SCRAPE_INTERVAL = "2s"
READY_TIMEOUT_S = 120.0


def _state_path(root: Path) -> Path:
    return root / "prometheus.json"


def load(root: Path) -> sidecar.State | None:
    """Prometheus' port and pid, or None if this stack never ran one."""
    return sidecar.load(_state_path(root))


def targets_dir(root: Path) -> Path:
    return root / "prometheus" / "targets"


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def config(root: Path) -> str:
    """prometheus.yml (JSON is YAML): the rules of ops/ and one file-discovered job per kind."""
    jobs = [
        {
            "job_name": job,
            "file_sd_configs": [
                {"files": [str(targets_dir(root) / f"{job}-*.json")], "refresh_interval": "5s"}
            ],
        }
        for job in JOBS
    ]
    doc = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(RULES)],
        "scrape_configs": jobs,
    }
    return json.dumps(doc, indent=2) + "\n"


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"{url(port)}/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start(root: Path) -> str:
    """Start (or reuse) the Prometheus of the stack in ``root``; its URL once ready."""
    ensure_prerequisites(("prometheus",))
    state = load(root) or {"port": free_port(), "pid": None}
    port = state["port"]
    assert port is not None
    if pid_alive(state["pid"]) and ready(port):
        _say(f"prometheus already running on {url(port)} (pid {state['pid']})")
        return url(port)
    home = root / "prometheus"
    targets_dir(root).mkdir(parents=True, exist_ok=True)
    (home / "prometheus.yml").write_text(config(root))
    # The config file's path names the stack folder: `down`'s "no process left" check finds it.
    pid = sidecar.start(
        _state_path(root), state,
        ["prometheus", f"--config.file={home / 'prometheus.yml'}",
         f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--storage.tsdb.retention.time=2d"],
        log=home / "stdout.log", ready=lambda: ready(port), timeout=READY_TIMEOUT_S,
        what="prometheus",
    )  # fmt: skip
    _say(f"prometheus ready on {url(port)} (pid {pid}), targets in {targets_dir(root)}")
    return url(port)


def stop(root: Path) -> str | None:
    """Stop the Prometheus of the stack in ``root``; what was stopped (None: nothing ran)."""
    return sidecar.stop(_state_path(root), "prometheus")


def env(root: Path) -> dict[str, str]:
    """``CUTOVER_PROMETHEUS_URL`` and ``_TARGETS`` if this stack's Prometheus runs, else nothing."""
    port = sidecar.running_port(_state_path(root))
    return {ENV_URL: url(port), ENV_TARGETS: str(targets_dir(root))} if port else {}


def _target_file(folder: Path, job: str, name: str) -> Path:
    if job not in JOBS:
        raise StackError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
    return folder / f"{job}-{name}.json"


def add_target(
    folder: Path, job: str, name: str, port: int, labels: Mapping[str, str] | None = None
) -> Path:
    """Have Prometheus scrape ``127.0.0.1:port`` under ``job`` (``folder``: the targets folder,
    ``CUTOVER_PROMETHEUS_TARGETS``). Written whole, then renamed: never read half-written."""
    path = _target_file(folder, job, name)
    group = {"targets": [f"127.0.0.1:{port}"], "labels": {"process": name, **(labels or {})}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([group]))
    tmp.replace(path)
    return path


def remove_target(folder: Path, job: str, name: str) -> None:
    _target_file(folder, job, name).unlink(missing_ok=True)


def query(base_url: str, promql: str) -> list[dict[str, object]]:
    """The result vector of an instant query (``/api/v1/query``)."""
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{base_url}/api/v1/query?{q}", timeout=10) as resp:
        doc = json.loads(resp.read())
    if doc.get("status") != "success":
        raise StackError(f"prometheus refused {promql!r}: {doc.get('error')}")
    result: list[dict[str, object]] = doc["data"]["result"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.prometheus_stack",
        description="Add or remove a scrape target of the stack's Prometheus.",
    )
    parser.add_argument("action", choices=["target", "untarget"])
    parser.add_argument("job", choices=JOBS)
    parser.add_argument("name", help="names the process (one target file per name)")
    parser.add_argument("port", type=int, nargs="?", help="its metrics port (target)")
    parser.add_argument("--dir", type=Path, default=REPO / ".stack", help="stack folder")
    args = parser.parse_args(argv)
    folder = targets_dir(args.dir.resolve())
    try:
        if args.action == "untarget":
            remove_target(folder, args.job, args.name)
        elif args.port is None:
            parser.error("target needs the PORT")
        else:
            _say(f"scraping {add_target(folder, args.job, args.name, args.port)}")
    except CutoverError as exc:
        print(f"prometheus target: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
