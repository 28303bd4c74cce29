"""Every command's --help shows a runnable-looking example; `merge -h` is accepted like `--help`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mergekit_fisher.cli import COMMANDS
from mergekit_fisher.cli import main as cli


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_has_an_example_of_the_command(name, flag):
    result = CliRunner().invoke(cli, [name, flag])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Example" in text, text
    after = text[text.index("Example") :]
    # the examples invoke this very command, at least one with arguments
    lines = [
        line.strip() for line in after.splitlines() if line.strip().startswith("mergekit-fisher ")
    ]
    assert lines and all(line.startswith(f"mergekit-fisher {name}") for line in lines), lines
    assert any(len(line.split()) >= 3 for line in lines), lines


def test_merge_help_shows_mergekit_yaml_options():
    result = CliRunner().invoke(cli, ["merge", "-h"])
    assert result.exit_code == 0, result.output
    assert "CONFIG_FILE" in result.output and "--lora-merge-cache" in result.output
    assert "No such option" not in result.output
