"""``cutover status``: per domain the cutover state, each gate with pass/fail and why, the apply
lag, the last verify, and the migration progress weighted by the mapping's domain weights."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from control.state import status_report
from cutover.mapping import load_mapping

if TYPE_CHECKING:
    from cli.main import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "status",
        help="per domain: cutover state, gates, lag, last verify; weighted progress",
        description=(__doc__ or "").replace("``", ""),
    )
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.add_argument(
        "--no-gates", action="store_true", help="states only (no database/Kafka probes)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    settings = context.settings
    mapping = load_mapping(settings.mapping_path)
    report = status_report(settings, mapping.domains, with_gates=not args.no_gates)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print_status(Console(), report)
    return 0


def print_status(console: Console, report: dict[str, Any]) -> None:
    title = (
        f"cutover progress {report['progress_percent']} % · writes on commerce "
        f"{report.get('writes_on_commerce', 0)} · completed {report.get('completed', 0)}"
    )
    table = Table(title=title)
    for col in ("domain", "weight", "state", "version", "lag", "last verify", "gates"):
        table.add_column(col)
    for d in report["domains"]:
        state = d["effective_state"]
        if d["state"] != state or d.get("pending"):
            state = f"{d['state']} [yellow](readers: {d['effective_state']})[/]"
        lag = d.get("lag") or {}
        lag_text = "-" if not lag else (str(lag["total"]) if lag.get("total") is not None else "?")
        lv = d.get("last_verify") or {}
        if lv.get("run_id") is None:
            verify_text = "never"
        else:
            verify_text = (
                f"run {lv['run_id']} {'passed' if lv['passed'] else 'FAILED'} "
                f"{(lv['age_s'] or 0) / 60:.1f} min ago"
            )
        gates = d.get("gates") or []
        failing = [g["gate"] for g in gates if not g["passed"]]
        if not gates:
            gates_text = "-"
        elif failing:
            gates_text = "[red]FAIL[/]: " + ", ".join(failing)
        else:
            gates_text = "[green]all pass[/]"
        table.add_row(
            d["domain"],
            f"{d['weight']} %",
            state,
            str(d["version"]),
            lag_text,
            verify_text,
            gates_text,
        )
    console.print(table)
    for d in report["domains"]:
        console.print(f"[bold]{d['domain']}[/]: {escape(d['explanation'])}")
        for g in d.get("gates") or []:
            if not g["passed"]:
                crit = " (critical)" if g["critical"] else ""
                console.print(f"  - {g['gate']} FAIL{crit}: {escape(g['why'])}")
