"""Subcommands load lazily; every name maps to the module defining exactly that command."""

from __future__ import annotations

import importlib
import subprocess
import sys

import click
import pytest

from drbot.cli.main import COMMANDS, cli

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_listed_command_is_defined_under_its_name(name: str) -> None:
    command = importlib.import_module(f"drbot.cli.{COMMANDS[name]}").command
    assert isinstance(command, click.Command)
    assert command.name == name
    ctx = click.Context(cli)
    assert cli.get_command(ctx, name) is command
    assert name in cli.list_commands(ctx)


def test_an_unknown_command_is_a_usage_error() -> None:
    ctx = click.Context(cli)
    assert cli.get_command(ctx, "bakup") is None


def test_starting_one_command_does_not_import_the_others() -> None:
    """`drbot wal fetch` runs per WAL segment: it must not pay for the daemon, drills or audit."""
    code = (
        "import sys\n"
        "from drbot.cli.main import cli\n"
        "cli.get_command(None, 'backup')\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('drbot.cli.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "drbot.cli.backup" in loaded
    assert not loaded & {"drbot.cli.daemon", "drbot.cli.drill", "drbot.cli.audit", "drbot.cli.demo"}
