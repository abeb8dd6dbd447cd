"""drbot restore for MongoDB policies: plan, confirm, load, check, replay to the target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from drbot.catalog import scan_catalog
from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    confirm,
    print_json,
    progress_bar,
    recording_failure,
    stderr,
)
from drbot.cli.restore_dir import parse_at
from drbot.engines.mongodb.position import ts_text
from drbot.errors import UsageError
from drbot.log import redact_text
from drbot.ops.changestore import read_heartbeat, slices_in
from drbot.ops.mongo_restore import (
    MongoRestorePlan,
    MongoRestoreResult,
    execute_mongo_restore,
    plan_mongo_restore,
)
from drbot.ops.walstore import KeyCache
from drbot.settings import Settings


def restore_mongo(
    settings: Settings,
    policy: Any,
    target_uri: str | None,
    *,
    at: str | None,
    latest: bool,
    from_destination: str | None,
    ns: Sequence[str],
    drop: bool,
    dry_run: bool,
    yes: bool,
    as_json: bool,
    postgres_only: dict[str, object],
) -> None:
    """Restore a MongoDB policy's backup into `target_uri` (see `drbot restore --help`)."""
    from pymongo import MongoClient

    from drbot.engines.mongodb import target
    from drbot.engines.mongodb.archive import EXACT
    from drbot.engines.mongodb.client import connect

    given = [name for name, value in postgres_only.items() if value]
    if given:
        raise UsageError(
            f"{', '.join(given)}: for PostgreSQL policies; a MongoDB restore takes --to URI "
            "[--at TIME | --latest] [--ns DB[.COLL] ...] [--drop]"
        )
    if target_uri is None:
        raise UsageError("MongoDB backups restore into a deployment: give --to mongodb://...")
    if at is not None and latest:
        raise UsageError("give at most one of --at and --latest")
    when = parse_at(at) if at is not None else None
    storages = build.build_storages(policy)
    build.only_destination(policy, storages, from_destination)
    keys = build.build_keys(policy)
    trail = audit_trail(settings)
    shown_target = redact_text(target_uri)
    client = connect(target_uri)
    with recording_failure(
        trail,
        "restore.refused",
        policy=policy.name,
        subject={"target": shown_target, "at": at},
    ):
        scan = scan_catalog(policy.name, storages, keys)
        for dest, exc in scan.unreachable.items():
            stderr.print(f"Warning: destination {dest} unreachable: {exc}")
        slices = {s.name: refs for s, refs in slices_in(policy.name, storages)}
        beat = read_heartbeat(policy.name, storages, KeyCache(keys))

        def planned(occupied: list[str]) -> MongoRestorePlan:
            return plan_mongo_restore(
                scan,
                slices,
                policy=policy.name,
                target=shown_target,
                occupied=occupied,
                at=when,
                from_destination=from_destination,
                ns=ns,
                drop=drop,
                every_database=policy.source.databases is None,
                heartbeat=beat,
            )

        # What counts as occupied depends on what the chosen backup restores.
        covers = planned([]).selection.covers
        plan = planned(target.occupied(client, target_uri, covers))
    subject = {"backup_id": plan.backup_id, "target": shown_target}
    trail.record(
        "restore.planned",
        policy=policy.name,
        subject=subject,
        outcome="info",
        details={**plan.to_json(), "dry_run": dry_run},
    )
    if dry_run:
        if as_json:
            print_json({"plan": plan.to_json(), "dry_run": True})
        else:
            _print_plan(plan)
            click.echo("Dry run: nothing was written.")
        return
    if not as_json:
        _print_plan(plan)
    what = (
        f"drop {len(plan.occupied)} collection(s) in {shown_target}, then " if plan.occupied else ""
    )
    confirm(f"{what}Restore backup {plan.backup_id} into {shown_target}?", yes=yes)
    trail.record("restore.started", policy=policy.name, subject=subject, outcome="info")
    exact: MongoClient[dict[str, Any]] = MongoClient(
        target_uri,
        document_class=dict,
        tz_aware=True,
        datetime_conversion=EXACT.datetime_conversion,
    )
    with (
        recording_failure(trail, "restore.failed", policy=policy.name, subject=subject),
        progress_bar() as progress,
    ):
        result = execute_mongo_restore(
            plan,
            scan,
            {s.name: s for s in storages},
            KeyCache(keys),
            client,
            exact,
            target_uri,
            progress=progress,
        )
    trail.record(
        "restore.completed",
        policy=policy.name,
        subject=subject,
        outcome="ok",
        details=_result_json(result),
    )
    if as_json:
        print_json({"plan": plan.to_json(), "result": _result_json(result)})
    else:
        click.echo(
            f"Restored backup {result.backup_id} from {result.source}: "
            f"{len(result.collections)} collection(s), {result.documents} document(s) loaded "
            "and matching the backup's fingerprint; "
            f"{result.events_applied} change(s) replayed; the data is as of "
            f"{result.reached_at.isoformat()} (cluster time {ts_text(result.reached)}) "
            f"({result.duration_s:.1f}s)"
        )
    for warning in result.warnings:
        stderr.print(f"Warning: {warning}")


def _result_json(result: MongoRestoreResult) -> dict[str, Any]:
    return {
        "backup_id": result.backup_id,
        "source": result.source,
        "collections": result.collections,
        "documents": result.documents,
        "events_applied": result.events_applied,
        "events_by_type": result.events_by_type,
        "reached": ts_text(result.reached),
        "reached_at": result.reached_at.isoformat(),
        "fingerprint_checked": True,
        "duration_s": result.duration_s,
        "warnings": result.warnings,
    }


def _print_plan(plan: MongoRestorePlan) -> None:
    j = plan.to_json()
    click.echo(f"Restore plan for policy {plan.policy}")
    click.echo(f"  backup      {plan.backup_id} (consistent at {j['consistent_at']})")
    click.echo(f"  namespaces  {', '.join(j['namespaces']) or 'none'}")
    click.echo(f"  read from   {', '.join(plan.sources)}")
    target_text = (
        plan.target_at.isoformat() if plan.target_at is not None else "latest stored change"
    )
    click.echo(f"  target time {target_text}")
    click.echo(
        f"  changes     {len(plan.slices)} slice(s)"
        + (f" from {plan.slice_source}" if plan.slice_source else "")
        + f", reaching {j['reach_at']}"
    )
    click.echo(f"  into        {plan.target}")
    if plan.occupied:
        click.echo(f"  drops first {', '.join(plan.occupied)}")
    click.echo(
        "  steps       create collections, load documents, build indexes, compare fingerprints, "
        "replay changes"
    )
