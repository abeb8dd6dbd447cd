"""drbot prune: apply the policy's retention rules (plan first; --dry-run shows only the plan)."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from drbot.catalog import scan_catalog
from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    confirm,
    find_policy,
    json_option,
    load_settings,
    policies_option,
    print_json,
    recording_failure,
)
from drbot.errors import KeyProblem, PartialFailure, StorageUnavailable
from drbot.ops.lock import policy_lock
from drbot.ops.prune import execute_prune, gather_facts
from drbot.ops.retention import RetentionPlan, plan_retention


@click.command("prune")
@click.option("--policy", "policy_name", required=True, help="Policy whose backups to prune.")
@click.option("--dry-run", is_flag=True, help="Print the plan (every keep with its reason).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@policies_option
@json_option
def command(
    policy_name: str, dry_run: bool, yes: bool, policies_dir: Path | None, as_json: bool
) -> None:
    """Delete the backups the policy's retention rules no longer keep, and the WAL they alone
    needed.

    Every kept backup is listed with the rules that keep it (last N, daily, weekly, monthly,
    yearly, or object lock until a date); the newest backup is always kept. WAL older than the
    start of the oldest kept base backup goes too. A backup is deleted manifest first in every
    destination, so a prune cut short never leaves one that looks complete. Objects still
    under object lock are never sent a delete. Exit 3 if some deletions failed (listed);
    11 if another drbot process holds the policy; 15 if a destination is unreachable.

    \b
    Examples:
      drbot prune --policy shop --dry-run
      drbot prune --policy shop --yes
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.build_storages(policy)
    lock_days = {d.name: d.object_lock.days if d.object_lock else None for d in policy.destinations}
    trail = audit_trail(settings)
    now = datetime.now(UTC)
    details: dict[str, Any] = {}
    # A dry run writes nothing, so it does not wait for a backup holding the policy's lock.
    lock = nullcontext() if dry_run else policy_lock(settings.state_dir, policy.name)
    with (
        recording_failure(
            trail, "prune.failed", policy=policy.name, subject={}, extra=lambda: details
        ),
        lock,
    ):
        scan = scan_catalog(policy.name, storages, build.build_keys(policy))
        if scan.unreachable:
            name, exc = next(iter(scan.unreachable.items()))
            raise StorageUnavailable(
                f"destination {name} is unreachable ({exc.message}); pruning needs every "
                "destination, to know what each holds"
            )
        key_problems = [p for p in scan.problems if isinstance(p.error, KeyProblem)]
        if key_problems:
            raise key_problems[0].error
        plan = plan_retention(
            gather_facts(policy.name, scan, storages, lock_days), policy.retention, now
        )
        summary = _summary(plan)
        summary["skipped"] = {
            f"{p.destination}:{p.backup_id}": p.error.message for p in scan.problems
        }
        trail.record(
            "prune.planned",
            policy=policy.name,
            subject={},
            outcome="info",
            details={**summary, "dry_run": dry_run},
        )
        if dry_run:
            _show(plan, summary, as_json, dry_run=True)
            return
        if not plan.delete and plan.wal_before_segment is None:
            _show(plan, summary, as_json, dry_run=False)
            return
        if not as_json:
            _show(plan, summary, as_json=False, dry_run=False)
        wal = (
            " and the WAL older than the oldest kept base backup"
            if plan.wal_before_segment is not None
            else ""
        )
        confirm(f"Delete {len(plan.delete)} backup(s) of policy {policy.name}{wal}?", yes=yes)

        def deleted(backup_id: str) -> None:
            trail.record("prune.deleted", policy=policy.name, subject={"backup_id": backup_id})

        result = execute_prune(policy.name, plan, storages, lock_days, now, on_deleted=deleted)
        details.update(
            deleted=result.deleted,
            failed=result.failed,
            wal_deleted=result.wal_deleted,
            wal_locked=result.wal_locked,
        )
        if result.failed:
            raise PartialFailure(
                f"{len(result.failed)} deletion(s) failed: "
                + "; ".join(f"{k}: {v}" for k, v in list(result.failed.items())[:5]),
                hint="run drbot prune again later; nothing half-deleted looks complete",
            )
        trail.record("prune.completed", policy=policy.name, subject={}, details=details)
    if as_json:
        print_json({**summary, **details})
    else:
        click.echo(
            f"Deleted {len(result.deleted)} backup(s) and {result.wal_deleted} WAL object(s)"
            + (f"; {result.wal_locked} WAL object(s) are still locked" if result.wal_locked else "")
            + "."
        )


def _summary(plan: RetentionPlan) -> dict[str, Any]:
    return {
        "keep": plan.keep,
        "delete": plan.delete,
        "locked": {k: v.isoformat() for k, v in plan.locked.items()},
        "wal_before_segment": plan.wal_before_segment,
    }


def _show(plan: RetentionPlan, summary: dict[str, Any], as_json: bool, *, dry_run: bool) -> None:
    if as_json:
        print_json({**summary, "dry_run": dry_run})
        return
    for backup_id, why in sorted(plan.keep.items(), reverse=True):
        click.echo(f"keep    {backup_id}  {'; '.join(why)}")
    for backup_id in plan.delete:
        click.echo(f"delete  {backup_id}")
    for where, why in summary.get("skipped", {}).items():
        click.echo(f"skip    {where}  cannot be read, left alone: {why}")
    if plan.wal_before_segment is not None:
        click.echo(f"WAL     segments before number {plan.wal_before_segment:#x} go")
    if dry_run:
        click.echo("Dry run: nothing was deleted.")
    elif not plan.delete and plan.wal_before_segment is None:
        click.echo("Nothing to delete.")
