"""drbot backup: take a full backup of one policy's source now."""

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
from drbot.clock import SystemClock
from drbot.errors import PartialFailure
from drbot.ops.audit_events import record_backup
from drbot.ops.backup import run_backup
from drbot.ops.lock import policy_lock
from drbot.storage import layout


@click.command("backup")
@click.option("--policy", "policy_name", required=True, help="Name of the policy to back up.")
@click.option(
    "--type",
    "backup_type",
    type=click.Choice(["full"]),
    default="full",
    show_default=True,
    help="Kind of backup (incrementals come with WAL / change-stream streaming).",
)
@policies_option
@json_option
def command(policy_name: str, backup_type: str, policies_dir: Path | None, as_json: bool) -> None:
    """Take a full backup now: dump, compress, encrypt, store in every destination, verify.

    The database is read once; every destination receives the same encrypted stream. The
    backup exists (for list, verify and restore) only once its manifest is written, after
    every stored object has been read back and checked.

    \b
    Example:
      drbot backup --policy shop
    Exit 3 if some destinations failed but at least one holds a complete copy.
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.build_storages(policy)
    keys = build.build_keys(policy)
    engine = build.build_engine(policy)
    clock = SystemClock()
    trail = audit_trail(settings)
    backup_id = layout.new_backup_id(clock.now())
    subject = {"backup_id": backup_id}
    destinations = {
        d.name: {
            "url": d.url,
            "region": d.region,
            "object_lock": None
            if d.object_lock is None
            else {"mode": d.object_lock.mode, "days": d.object_lock.days},
        }
        for d in policy.destinations
    }
    started = False
    with (
        recording_failure(
            trail,
            "backup.failed",
            policy=policy.name,
            subject=subject,
            extra=lambda: {"started": started},
        ),
        policy_lock(settings.state_dir, policy.name),
        progress_bar() as progress,
    ):
        # In here: a key that cannot be read or a held lock is a failed backup too.
        key_ids = {s.name: keys.key_id(s.region) for s in storages}
        trail.record(
            "backup.started",
            policy=policy.name,
            subject=subject,
            details={
                "type": backup_type,
                "mode": policy.source.mode,
                "destinations": destinations,
                "key": keys.describe(),
                "key_ids": key_ids,
            },
        )
        started = True
        result = run_backup(
            build.backup_settings(policy),
            engine,
            storages,
            keys,
            clock,
            backup_id=backup_id,
            progress=progress,
        )
    record_backup(trail, policy.name, result, backup_type)
    duration = (result.completed_at - result.started_at).total_seconds()
    if as_json:
        print_json(
            {
                "id": result.backup_id,
                "policy": policy.name,
                "type": backup_type,
                "started_at": result.started_at.isoformat(),
                "completed_at": result.completed_at.isoformat(),
                "size_bytes": result.plaintext_bytes,
                "stored_bytes": result.stored_bytes,
                "destinations": list(result.destinations_ok),
                "failed_destinations": result.destinations_failed,
                "databases": list(result.databases),
                "positions": result.positions or None,
            }
        )
    else:
        stored = max(result.stored_bytes.values(), default=0)
        pos = result.positions
        if "timeline" in pos:
            what = (
                f"cluster on timeline {pos['timeline']}, WAL {pos['start_lsn']}..{pos['stop_lsn']}"
            )
        elif "consistent_at" in pos:
            what = (
                f"{len(result.databases)} database(s), consistent at {pos['consistent_at']} "
                f"({pos['events']} change(s) during the dump)"
            )
        else:
            what = f"{len(result.databases)} database(s)"
        click.echo(
            f"Backup {result.backup_id} of {policy.name}: {what}, "
            f"{human_bytes(result.plaintext_bytes)} read, {human_bytes(stored)} stored "
            f"encrypted in {', '.join(result.destinations_ok)} ({duration:.1f}s)"
        )
    if result.partial:
        failed = "; ".join(f"{d}: {why}" for d, why in result.destinations_failed.items())
        raise PartialFailure(
            f"backup {result.backup_id} is complete in {', '.join(result.destinations_ok)} "
            f"but failed in: {failed}",
            hint="fix the failed destination; the next backup will write to it again",
        )
