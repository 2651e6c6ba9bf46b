"""Seconds per test module, from a JUnit XML report, for ordering ``make test``'s parallel run.

``make test`` writes ``.stack/junit.xml``; ``python -m devtools.test_durations`` (``make
test-durations``) turns it into ``tests/durations.json``, which is committed. The suite's
``conftest.py`` orders the xdist groups by those seconds, longest first: a long group started
last keeps one worker busy after the other ran out of work (2 workers, ~50 minutes of work).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DURATIONS = REPO / "tests" / "durations.json"


def module_seconds(report: Path) -> dict[str, float]:
    """``tests/x/test_y.py`` -> seconds of all its test cases (set-up and tear-down included)."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        # classname is the dotted module, plus the class for a test method.
        while module and not module[-1].startswith("test_"):
            module.pop()
        if module:
            seconds["/".join(module) + ".py"] += float(case.get("time", "0"))
    return {m: round(s, 1) for m, s in sorted(seconds.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, nargs="?", default=REPO / ".stack" / "junit.xml")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        print(f"no report at {args.report}: run make test first", file=sys.stderr)
        return 2
    seconds = module_seconds(args.report)
    DURATIONS.write_text(json.dumps(seconds, indent=1) + "\n")
    print(f"{DURATIONS}: {len(seconds)} modules, {sum(seconds.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
