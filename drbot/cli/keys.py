"""drbot keys: create key files."""

from __future__ import annotations

from pathlib import Path

import click

from drbot.cli.common import audit_trail, load_settings, policies_option
from drbot.pipeline.filekey import generate_key_file


@click.group("keys")
def command() -> None:
    """Manage encryption keys (key files; KMS keys are managed in AWS)."""


@command.command("generate")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the key (must not exist).",
)
@policies_option
def generate(out: Path, policies_dir: Path | None) -> None:
    """Write a new random 256-bit key (base64) to FILE with mode 0600.

    Keep a copy somewhere other than the backups: without it they cannot be decrypted.

    \b
    Example:
      drbot keys generate --out /etc/drbot/keys/shop.key
    """
    settings = load_settings(policies_dir)  # keys do not depend on policies
    key_id = generate_key_file(out)
    audit_trail(settings).record(
        "key.generated", subject={"key_id": key_id}, details={"path": str(out.absolute())}
    )
    click.echo(f"Wrote key {key_id} to {out} (mode 0600).")
    click.echo("Store a copy of this key away from the backups: without it they cannot be read.")
