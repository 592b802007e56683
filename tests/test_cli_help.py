"""``--help`` is plain text: no reStructuredText from the docstrings (double backticks,
``:mod:``-style roles) in the command's help or any subcommand's."""

from __future__ import annotations

import re

import pytest

from nvswitch_dp.cli import main, parser

_SUBCOMMANDS = ["demo", "doctor", "prepare-node", "run", "status"]
_MARKUP = re.compile(r"``|:[a-z]+:`|`")


def test_every_subcommand_is_covered() -> None:
    (choices,) = re.findall(r"\{([^}]*)\}", parser().format_usage())
    assert sorted(choices.split(",")) == _SUBCOMMANDS


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in _SUBCOMMANDS)], ids=str)
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nvswitch-dp")
    assert _MARKUP.findall(out) == [], out
    # A description, not only the usage and options.
    assert len([line for line in out.split("\n\n")[1].splitlines() if line.strip()]) >= 1
