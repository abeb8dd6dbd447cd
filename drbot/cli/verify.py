"""drbot verify: download and check every stored object of a policy's backups."""

from __future__ import annotations

from pathlib import Path

import click

from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    find_policy,
    human_bytes,
    json_option,
    load_settings,
    policies_option,
    print_json,
    progress_bar,
    recording_failure,
)
from drbot.errors import IntegrityFailure, StorageUnavailable
from drbot.ops.audit_events import record_verify
from drbot.ops.verify import run_verify


@click.command("verify")
@click.option("--policy", "policy_name", required=True, help="Policy whose backups to check.")
@click.option("--backup", "backup_id", default=None, help="Only this backup id [default: all].")
@click.option(
    "--destination", default=None, help="Only this destination [default: every destination]."
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=None,
    help="Check only the newest backup and N-1 others at random (WAL not read).",
)
@policies_option
@json_option
def command(
    policy_name: str,
    backup_id: str | None,
    destination: str | None,
    sample: int | None,
    policies_dir: Path | None,
    as_json: bool,
) -> None:
    """Download every artifact, authenticate every encrypted frame and check every SHA-256.

    Nothing is written anywhere. Exit 13 names each object and destination that does not match
    its manifest; exit 15 if a destination cannot be reached.

    \b
    Examples:
      drbot verify --policy shop
      drbot verify --policy shop --backup 20261123T020000Z-1a2b3c --destination replica
      drbot verify --policy shop --sample 2       the daemon's daily spot check
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.only_destination(policy, build.build_storages(policy), destination)
    trail = audit_trail(settings)
    with (
        recording_failure(
            trail,
            "verify.failed",
            policy=policy.name,
            subject={"backup_id": backup_id} if backup_id else {},
        ),
        progress_bar() as progress,
    ):
        report = run_verify(
            policy.name,
            storages,
            build.build_keys(policy),
            backup_id=backup_id,
            sample=sample,
            progress=lambda d, name, n: progress(f"{d}:{name}", n),
        )
    record_verify(trail, policy.name, report)
    if as_json:
        print_json(
            {
                "policy": policy.name,
                "ok": report.ok,
                "backups": report.backups,
                "checked_objects": report.checked_objects,
                "checked_bytes": report.checked_bytes,
                "problems": [
                    {
                        "destination": f.destination,
                        "backup_id": f.backup_id,
                        "object": f.key,
                        "problem": f.problem,
                    }
                    for f in report.findings
                ],
                "unreachable": report.unreachable,
            }
        )
    else:
        click.echo(
            f"Checked {len(report.backups)} backup(s) of {policy.name}: "
            f"{report.checked_objects} object(s), {human_bytes(report.checked_bytes)} of plaintext "
            f"authenticated."
        )
        for f in report.findings:
            click.echo(f"  BAD {f.destination}: {f.key}: {f.problem}", err=True)
    if report.findings:
        raise IntegrityFailure(
            f"{len(report.findings)} problem(s) in policy {policy.name}: "
            + "; ".join(f"{f.destination}:{f.key}" for f in report.findings[:5]),
            hint="restore from a destination whose copy verifies: drbot restore --from NAME",
        )
    if report.unreachable:
        raise StorageUnavailable(
            "unreachable: " + "; ".join(f"{d}: {e}" for d, e in report.unreachable.items())
        )
