"""drbot policy: validate policy files, print their JSON Schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from drbot.cli.common import load_settings, policies_option


@click.group("policy")
def command() -> None:
    """Check policy files and print their schema."""


@command.command("validate")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@policies_option
def validate(directory: Path | None, policies_dir: Path | None) -> None:
    """Validate every policy in DIRECTORY (default: --policies, $DRBOT_POLICIES or ./policies).

    Every problem in every file is reported at once as FILE: FIELD: PROBLEM; exit 16 if any.

    \b
    Example:
      drbot policy validate policies/
    """
    from drbot.policy.load import load_policies

    settings = load_settings(directory or policies_dir)
    policies = load_policies(settings.policies, os.environ)
    for p in policies:
        dests = ", ".join(d.name for d in p.destinations)
        click.echo(f"ok  {p.name}  ({p.source.kind}, destinations: {dests})")
    click.echo(f"{len(policies)} policy file(s) valid in {settings.policies}.")


@command.command("schema")
@policies_option
def schema(policies_dir: Path | None) -> None:
    """Print the JSON Schema of policy files (for editors and CI linters).

    \b
    Example:
      drbot policy schema > drbot-policy.schema.json
    """
    from drbot.policy.schema import policy_json_schema

    click.echo(json.dumps(policy_json_schema(), indent=2))
