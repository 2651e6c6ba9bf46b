"""The hidden ``--crash-at`` option of the write transition commands (fault tests only)."""

from __future__ import annotations

import pytest

from cli.main import build_parser


@pytest.mark.parametrize("command", ["switch-writes", "rollback-writes"])
def test_crash_at_is_accepted_and_hidden(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(every=True)
    args = parser.parse_args([command, "payment", "--crash-at", "after_drain"])
    assert args.crash_at == "after_drain"
    assert parser.parse_args([command, "payment"]).crash_at is None
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    assert "--crash-at" not in capsys.readouterr().out
    with pytest.raises(SystemExit):  # only the machine's crash points
        parser.parse_args([command, "payment", "--crash-at", "somewhere"])


def test_other_commands_have_no_crash_hook() -> None:
    with pytest.raises(SystemExit):
        build_parser(every=True).parse_args(
            ["switch-reads", "payment", "--crash-at", "after_drain"]
        )
