"""The process entry point of ``cutover`` (the console script and ``python -m cli.entry``).

It remembers a SIGTERM from the first instant (:mod:`cutover.shutdown`) and only then imports
the command line, whose imports take a second or more: a stop asked during that time ends
``produce`` and ``apply`` cleanly (exit 0) instead of killing them half-started.
"""

from __future__ import annotations

import sys

from cutover import shutdown


def main() -> int:
    shutdown.remember()
    from cli.main import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
