"""`cutover dlq` (being written)."""

from __future__ import annotations

import argparse
from typing import Any

from cutover.errors import UsageError


def register(sub: Any) -> None:
    parser = sub.add_parser("dlq", help="(not implemented yet)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Any) -> int:
    raise UsageError("cutover dlq is not implemented yet")
