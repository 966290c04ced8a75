"""Every command has help with an Example and is documented in docs/cli.md."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from knowledger.cli.main import cli

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def commands(group=cli, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))


ALL = list(commands())


def test_the_ledger_commands_are_registered():
    names = {" ".join(path) for path, _ in ALL}
    assert {"init", "submit", "log", "show", "status", "db", "db upgrade", "db current"} <= names


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=" ".join)
def test_every_command_has_help_with_an_example(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=" ".join)
def test_every_command_and_subcommand_is_in_docs_cli_md(path):
    assert f"knowledger {' '.join(path)}" in DOCS.read_text()


def test_an_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2 and "No such command 'frobnicate'" in result.output
