"""The CLI shell (help, exit codes, error mapping) and logging as an interface."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from cli.main import COMMANDS, build_parser, command_named, main
from cutover import logging as cutover_logging

SECRET = "hunter2-do-not-print"


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action.help for action in sub._choices_actions}


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser([])
    text = parser.format_help()
    for command in COMMANDS:
        name = command.name
        assert name in text
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        assert "usage: cutover" in capsys.readouterr().out


def test_the_help_table_is_what_each_command_registers() -> None:
    """`cutover --help` lists the table's lines; each module registers the same line."""
    table = _help_lines(build_parser([]))
    assert table == _help_lines(build_parser(every=True))
    assert [c.name for c in COMMANDS] == list(table)[: len(COMMANDS)]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["status", "--json"], "status"),
        (["--config", "x.toml", "--log-level", "debug", "switch-reads", "payment"],
         "switch-reads"),
        (["--conf=x.toml", "--no-log-json", "apply"], "apply"),  # argparse's abbreviation
        (["--conf", "apply", "verify"], "verify"),  # "apply" is the config file's name here
        (["--log-level", "loud", "status"], None),  # the real parse reports this one
        (["--help"], None),
    ],
)  # fmt: skip
def test_the_command_is_read_with_the_global_options_rules(
    argv: list[str], named: str | None
) -> None:
    assert command_named(argv) == named


def test_a_command_imports_its_own_module_only() -> None:
    """What makes ``cutover status`` start in about half the time of loading every command."""
    code = (
        "import sys; from cli.main import build_parser; "
        "args = build_parser(['status']).parse_args(['status', '--json']); "
        "print(args.handler.__module__, sorted(m for m in sys.modules "
        "if m.startswith('cli.commands.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1) == ["cli.commands.status", "['cli.commands.status']\n"]


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "see 'cutover --help'" in capsys.readouterr().err


def test_config_error_exits_2_without_secrets(tmp_path: Path) -> None:
    config = tmp_path / "cutover.toml"
    config.write_text(f"[source]\ndsn = 'host=x password={SECRET}'\nbogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "cli.entry", "--config", str(config),
         "workload", "--max-transactions", "1"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "unknown setting [source] bogus" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_log_events_have_stable_names_and_no_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    cutover_logging.configure(level="info", json=True)
    log = cutover_logging.get_logger("test")
    log.info("slot.advanced", lsn="0/16B3748", dsn=f"host=a password={SECRET}")
    log.info("x.y", detail=f"connect postgresql://u:{SECRET}@h/db failed", password=SECRET)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["event"] == "slot.advanced"
    assert lines[0]["lsn"] == "0/16B3748"
    assert SECRET not in json.dumps(lines)
    structlog.reset_defaults()


def test_module_level_logger_follows_later_configure(capsys: pytest.CaptureFixture[str]) -> None:
    log = cutover_logging.get_logger("made.before.configure")
    cutover_logging.configure(level="info", json=True)
    log.info("x.happened", n=1)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "x.happened"
    assert line["component"] == "made.before.configure"
    structlog.reset_defaults()


def test_capture_logs_sees_events() -> None:
    with capture_logs() as logs:
        cutover_logging.get_logger("t").warning("apply.batch_committed", events=3)
    assert logs == [{"event": "apply.batch_committed", "events": 3, "log_level": "warning",
                     "component": "t"}]  # fmt: skip


def test_config_sections_in_messages_survive_rich_markup() -> None:
    """Gate reasons and messages name config sections ("[gates] ..."): rich would take them for
    markup tags and drop them without escaping."""
    import io

    from rich.console import Console

    from cli.commands.switch_reads import print_outcome
    from control.gates import GateResult
    from control.state import CommandOutcome

    out = io.StringIO()
    outcome = CommandOutcome(
        command="switch-writes",
        domain="payment",
        outcome="dry_run",
        message="would switch; [roles] names the SRE role",
        from_state="reads_switched",
        gates=(GateResult("reads_soak", False, "[gates] min_reads_soak_minutes = 30 not reached"),),
    )
    print_outcome(Console(file=out, width=200), outcome)
    text = out.getvalue()
    assert "[gates] min_reads_soak_minutes" in text
    assert "[roles] names the SRE role" in text
