"""drbot restore --to-dir: point-in-time restore of a physical chain into a data directory."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from drbot.catalog import scan_catalog
from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    confirm,
    human_bytes,
    print_json,
    recording_failure,
    stderr,
)
from drbot.engines.postgres.wal import parse_lsn
from drbot.errors import UsageError
from drbot.ops.pitr import (
    PitrPlan,
    Target,
    ensure_empty_target,
    plan_pitr,
    read_archive,
)
from drbot.ops.pitr_exec import PitrResult
from drbot.ops.walstore import KeyCache
from drbot.settings import Settings


def parse_at(at: str) -> datetime:
    """--at TIME as an aware UTC datetime; UsageError naming the problem otherwise."""
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        raise UsageError(
            f"--at {at!r} is not a time; write ISO 8601, e.g. 2026-11-23T14:05:00Z"
        ) from None
    if when.tzinfo is None:
        raise UsageError(f"--at {at!r} has no time zone; add one (e.g. Z for UTC, or +01:00)")
    return when.astimezone(UTC)


def parse_target(at: str | None, lsn: str | None, latest: bool) -> Target:
    given = [x for x in (at, lsn) if x is not None] + (["latest"] if latest else [])
    if len(given) > 1:
        raise UsageError("give at most one of --at, --lsn and --latest")
    if at is not None:
        return Target("time", time=parse_at(at))
    if lsn is not None:
        try:
            return Target("lsn", lsn=parse_lsn(lsn))
        except ValueError as exc:
            raise UsageError(f"--lsn: {exc}") from None
    return Target("latest")


def plan_json(plan: PitrPlan) -> dict[str, Any]:
    return {
        "policy": plan.policy,
        "backup_id": plan.backup_id,
        "target": plan.target.describe(),
        "timeline": plan.timeline,
        "sources": list(plan.sources),
        "base_bytes": plan.base_bytes,
        "wal_files": len(plan.wal),
        "wal_range": list(plan.wal_range) if plan.wal_range else None,
        "wal_bytes": plan.wal_bytes,
        "bytes_to_fetch": plan.base_bytes + plan.wal_bytes,
        "wal_reaches_about": plan.window_end.isoformat() if plan.window_end else None,
        "gap": plan.gap,
    }


def print_plan(plan: PitrPlan, target_dir: Path) -> None:
    click.echo(f"Point-in-time restore plan for policy {plan.policy}:")
    click.echo(f"  target      {plan.target.describe()} (timeline {plan.timeline})")
    click.echo(f"  base        {plan.backup_id}  {human_bytes(plan.base_bytes)}")
    if plan.wal_range:
        partial = " (last one partial)" if plan.wal and plan.wal[-1].partial else ""
        click.echo(
            f"  WAL         {plan.wal_range[0]} .. {plan.wal_range[1]}: {len(plan.wal)} file(s), "
            f"{human_bytes(plan.wal_bytes)}{partial}"
        )
    else:
        click.echo("  WAL         none in the archive after the base backup")
    if plan.window_end:
        click.echo(f"  WAL reaches about {plan.window_end.isoformat()}")
    if plan.gap:
        click.echo(f"  gap         segment {plan.gap} is missing; WAL after it is unusable")
    click.echo(f"  read from   {' then '.join(plan.sources)}")
    click.echo(f"  into        {target_dir} (unpacked next to it, renamed when complete)")
    click.echo(f"  fetch       {human_bytes(plan.base_bytes + plan.wal_bytes)} in all")


def restore_to_dir(
    settings: Settings,
    policy: Any,
    target_dir: Path,
    target: Target,
    *,
    from_destination: str | None,
    dry_run: bool,
    yes: bool,
    start: bool,
    port: int | None,
    run_as: str | None,
    as_json: bool,
) -> None:
    from drbot.engines.postgres.engine import uri_field
    from drbot.engines.postgres.localserver import find_bin_dir
    from drbot.ops.pitr_exec import StartOptions, execute_pitr, resolve_run_as

    if policy.source.mode != "physical":
        raise UsageError(
            f"policy {policy.name} takes logical backups; restore them with --to URI",
            hint=f"drbot restore --policy {policy.name} --to postgresql://.../db",
        )
    # --from means only from there: base backup and WAL alike, as a drill of that copy.
    storages = build.only_destination(policy, build.build_storages(policy), from_destination)
    provider = build.build_keys(policy)
    keys = KeyCache(provider)
    trail = audit_trail(settings)
    subject: dict[str, Any] = {"target_dir": str(target_dir), "target": target.describe()}
    with recording_failure(trail, "restore.refused", policy=policy.name, subject=subject):
        ensure_empty_target(target_dir)
        scan = scan_catalog(policy.name, storages, provider)
        for dest, exc in scan.unreachable.items():
            stderr.print(f"Warning: destination {dest} unreachable: {exc}")
        wal, histories = read_archive(policy.name, storages, scan, keys)
        plan = plan_pitr(
            scan,
            wal,
            histories,
            policy=policy.name,
            target=target,
            from_destination=from_destination,
        )
        try:
            user = resolve_run_as(target_dir.absolute(), run_as)
        except UsageError as exc:
            if not dry_run:
                raise
            user = None
            stderr.print(f"Warning: a real restore would stop here: {exc.message}")
    subject["backup_id"] = plan.backup_id
    trail.record(
        "restore.planned",
        policy=policy.name,
        subject=subject,
        outcome="info",
        details={**plan_json(plan), "dry_run": dry_run},
    )
    if dry_run:
        if as_json:
            print_json({"plan": plan_json(plan), "dry_run": True})
        else:
            print_plan(plan, target_dir)
            click.echo("Dry run: nothing was written.")
        return
    if not as_json:
        print_plan(plan, target_dir)
    confirm(f"Restore {plan.backup_id} to {target.describe()} into {target_dir}?", yes=yes)
    trail.record("restore.started", policy=policy.name, subject=subject, outcome="info")
    with recording_failure(trail, "restore.failed", policy=policy.name, subject=subject):
        result = execute_pitr(
            plan,
            scan,
            {s.name: s for s in storages},
            keys,
            target_dir,
            bin_dir=find_bin_dir(policy.source.bin_dir, "pg_ctl"),
            start=StartOptions(
                port=port, run_as=user, db_user=uri_field(policy.source.uri, "user", "postgres")
            )
            if start
            else None,
            run_as=user,
        )
    out = {
        "backup_id": plan.backup_id,
        "source": result.source,
        "data_dir": str(result.data_dir),
        "started": result.started,
        "port": result.port,
        "restore_point": result.restore_point.isoformat() if result.restore_point else None,
        "timeline": result.timeline,
        "elapsed_s": round(result.elapsed_s, 3),
        "run_as": result.run_as,
        "replayed_all": result.replayed_all,
    }
    trail.record("restore.completed", policy=policy.name, subject=subject, details=out)
    if as_json:
        print_json({"plan": plan_json(plan), **out})
    else:
        _print_result(plan, result, target)


def _print_result(plan: PitrPlan, result: PitrResult, target: Target) -> None:
    if result.started:
        point = result.restore_point.isoformat() if result.restore_point else None
        click.echo(
            f"Restored {plan.backup_id} into {result.data_dir} and promoted it in "
            f"{result.elapsed_s:.1f}s; last replayed commit: "
            f"{point or 'unknown (none after the base backup, or the server did not say)'}."
        )
        if result.replayed_all:
            click.echo(
                f"No commit after {target.describe()} was in the archive, so all of it was "
                "replayed: the state at that moment."
            )
        click.echo(
            f"The server is running on 127.0.0.1:{result.port} (timeline {result.timeline})."
        )
        click.echo(f"Stop it with: pg_ctl -D {result.data_dir} stop")
    else:
        click.echo(
            f"Restored {plan.backup_id} into {result.data_dir} in {result.elapsed_s:.1f}s, "
            f"with its WAL in {result.spool}."
        )
        click.echo(
            f"Start it to replay to {target.describe()}: pg_ctl -D {result.data_dir} start "
            f"(then remove {result.spool})"
        )
