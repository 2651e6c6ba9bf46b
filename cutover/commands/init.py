"""`cutover init` (being written)."""

from __future__ import annotations

import argparse
from typing import Any

from cutover.errors import UsageError


def register(sub: Any) -> None:
    parser = sub.add_parser("init", help="(not implemented yet)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Any) -> int:
    raise UsageError("cutover init is not implemented yet")
