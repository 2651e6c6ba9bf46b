"""The local stack's schema registry (``make up REGISTRY=1``, ``python -m devtools.stack up
--registry``): Apicurio Registry 2.4.2.Final, which serves the Confluent Schema Registry API at
``/apis/ccompat/v7``.

* Built once with Maven from ``stack/registry/pom.xml`` (jars from Maven Central only, with
  ``stack/registry/settings.xml`` mirroring every repository to Central) into the cache folder
  shared by the stacks of this checkout (``.stack-cache/registry/``), like the Kafka jars.
* Runs as a plain Java process on a free loopback port, its storage an H2 file database inside the
  stack folder (schema ids survive a restart, as with a real registry), with a small heap.
* :func:`up` waits for ``/health/ready`` and returns the ``CUTOVER_SCHEMA_REGISTRY_URL`` (the
  ccompat URL) that :mod:`devtools.stack` writes to ``<dir>/env``; :func:`down` stops it.
  Tests stop and start it with :func:`stop` / :func:`start` (registry down while producing).

Its state (port, pid) lives in ``<dir>/registry.json``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from cutover.errors import StackError
from devtools import sidecar
from devtools.ports import free_port
from devtools.procs import pid_alive
from devtools.stack import _say, ensure_prerequisites

REPO = Path(__file__).resolve().parents[1]
POM_DIR = REPO / "stack" / "registry"
HEAP = os.environ.get("CUTOVER_REGISTRY_HEAP", "-Xmx256m")
# A JVM start on a busy 2-core machine has been seen to take 90 s (2.4 s when idle).
READY_TIMEOUT_S = 240.0
CCOMPAT = "/apis/ccompat/v7"
ENV_VAR = "CUTOVER_SCHEMA_REGISTRY_URL"


def _runner_in(folder: Path) -> Path | None:
    """The jar to run in a Quarkus build output (fast-jar or legacy-jar layout)."""
    fast = folder / "quarkus-app" / "quarkus-run.jar"
    if fast.exists():
        return fast
    return next(iter(sorted(folder.glob("*-runner.jar"))), None)


def runner(cache: Path) -> Path:
    """The registry's runner jar, built with Maven on first use (~18 s, ~210 MB downloaded)."""
    app = cache / "registry"
    marker = app / ".complete"
    jar = _runner_in(app / "target")
    if marker.exists() and jar is not None:
        return jar
    ensure_prerequisites(("java", "mvn"))
    _say(f"building Apicurio Registry with Maven into {app} (first run only)")
    # Built in a scratch copy: Maven's target/ must not land in the source tree.
    work = cache / "registry.build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(POM_DIR / "pom.xml", work / "pom.xml")
    done = subprocess.run(
        ["mvn", "-q", "-B", "-s", str(POM_DIR / "settings.xml"), "-f", str(work / "pom.xml"),
         "package", "-DskipTests"],
        check=False,
    )  # fmt: skip
    if done.returncode != 0 or _runner_in(work / "target") is None:
        raise StackError("mvn could not build Apicurio Registry (see its output above)")
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    (work / "target").rename(app / "target")
    shutil.rmtree(work, ignore_errors=True)
    marker.touch()
    jar = _runner_in(app / "target")
    assert jar is not None
    return jar


def _state_path(root: Path) -> Path:
    return root / "registry.json"


def load(root: Path) -> sidecar.State | None:
    """The registry's port and pid, or None if this stack never ran one."""
    return sidecar.load(_state_path(root))


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}{CCOMPAT}"


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start(root: Path, cache: Path) -> str:
    """Start (or reuse) the registry of the stack in ``root``; its ccompat URL once ready."""
    state = load(root) or {"port": free_port(), "pid": None}
    port = state["port"]
    assert port is not None
    if pid_alive(state["pid"]) and ready(port):
        _say(f"schema registry already running on {url(port)} (pid {state['pid']})")
        return url(port)
    jar = runner(cache)
    rdir = root / "registry"
    rdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HTTP_PORT": str(port),
        "QUARKUS_HTTP_HOST": "127.0.0.1",
        "_PROD_QUARKUS_DATASOURCE_JDBC_MIN_SIZE": "2",
        "_PROD_QUARKUS_DATASOURCE_JDBC_INITIAL_SIZE": "2",
        # A file database: ids and versions survive a restart of the registry.
        "REGISTRY_DATASOURCE_URL": f"jdbc:h2:file:{rdir / 'data' / 'registry'}",
    }
    # -Dcutover.stack names the stack folder: `down`'s "no process left" check finds it.
    # C1 only (TieredStopAtLevel=1): a faster start, a smaller footprint, for a test server.
    pid = sidecar.start(
        _state_path(root), state,
        ["java", *HEAP.split(), "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
         f"-Dcutover.stack={root}", "-jar", str(jar)],
        log=rdir / "stdout.log", ready=lambda: ready(port), timeout=READY_TIMEOUT_S,
        what="the schema registry", env=env,
    )  # fmt: skip
    _say(f"schema registry ready on {url(port)} (pid {pid})")
    return url(port)


def stop(root: Path) -> str | None:
    """Stop the registry of the stack in ``root``; what was stopped (None: nothing ran)."""
    return sidecar.stop(_state_path(root), "schema registry")


def env(root: Path) -> dict[str, str]:
    """``CUTOVER_SCHEMA_REGISTRY_URL`` if this stack's registry runs, else nothing."""
    port = sidecar.running_port(_state_path(root))
    return {ENV_VAR: url(port)} if port else {}
