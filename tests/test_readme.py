"""The README's two commands are what CI runs and what users copy."""

from __future__ import annotations

import re

from conftest import ROOT


def _commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- (main|test) command -->\s*```(?:bash|sh)\n(.+?)\n```", text, re.S))
    return blocks


def test_readme_has_two_one_line_commands() -> None:
    cmds = _commands()
    assert set(cmds) == {"main", "test"}
    for cmd in cmds.values():
        assert "\n" not in cmd.strip()


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()["test"].strip() in [line.strip() for line in ci]
