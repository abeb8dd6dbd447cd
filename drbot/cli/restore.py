"""drbot restore: put a backup back into a database (plan, confirm, load, compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from drbot.catalog import scan_catalog
from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    confirm,
    find_policy,
    human_bytes,
    json_option,
    load_settings,
    policies_option,
    print_json,
    progress_bar,
    recording_failure,
    stderr,
)
from drbot.clock import SystemClock
from drbot.errors import IntegrityFailure, UsageError
from drbot.log import redact_text
from drbot.ops.audit_events import (
    record_restore_completed,
    record_restore_planned,
    restore_subject,
)
from drbot.ops.restore import RestorePlan, RestoreResult, execute_restore, plan_restore


def _plan_json(plan: RestorePlan) -> dict[str, Any]:
    return {
        "policy": plan.policy,
        "backup_id": plan.backup_id,
        "database": plan.database,
        "target": plan.target,
        "target_state": plan.target_state,
        "sources": list(plan.sources),
        "replace": plan.replace,
        "with_globals": plan.with_globals,
        "objects": [
            {"name": a.name, "key": a.key, "size_bytes": a.size_bytes, "sha256": a.sha256}
            for a in plan.artifacts
        ],
        "size_bytes": plan.size_bytes,
        "tables_to_check": len(plan.expected.tables) if plan.expected else 0,
    }


def _print_plan(plan: RestorePlan) -> None:
    click.echo(f"Restore plan for policy {plan.policy}:")
    click.echo(f"  backup      {plan.backup_id} (database {plan.database})")
    click.echo(f"  read from   {' then '.join(plan.sources)} (next one only if a copy is bad)")
    click.echo(f"  target      {plan.target} ({plan.target_state})")
    click.echo("  objects")
    for a in plan.artifacts:
        click.echo(f"    {a.key}  {human_bytes(a.size_bytes)}")
    mode = "drop the backup's objects first, then load" if plan.replace else "load"
    click.echo(f"  steps       {mode} in one transaction (all or nothing)")
    if plan.with_globals:
        click.echo("              apply roles and other globals first (best effort)")
    checks = len(plan.expected.tables) if plan.expected else 0
    click.echo(f"              compare {checks} table(s) with the backup's fingerprint")


def _result_json(result: RestoreResult) -> dict[str, Any]:
    return {
        "backup_id": result.backup_id,
        "source": result.source,
        "duration_s": result.duration_s,
        "fingerprint_checked": result.fingerprint_checked,
        "tables": result.tables,
        "mismatches": [m.__dict__ for m in result.mismatches],
        "warnings": result.warnings,
        "failed_sources": result.failed_sources,
    }


@click.command("restore")
@click.option("--policy", "policy_name", required=True, help="Policy whose backup to restore.")
@click.option(
    "--to",
    "target_uri",
    default=None,
    help="Logical backups: target database URI, e.g. postgresql://user@host:5432/shop_restored "
    "(put a password in PGPASSWORD or ~/.pgpass, not here).",
)
@click.option(
    "--to-dir",
    "target_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Physical backups: a new or empty directory to restore the cluster into.",
)
@click.option(
    "--at",
    "at",
    default=None,
    help="--to-dir, or --to with MongoDB: restore to this time (ISO 8601 with zone).",
)
@click.option(
    "--lsn", "lsn", default=None, help="--to-dir: restore to this WAL position (0/16B3748)."
)
@click.option(
    "--latest",
    is_flag=True,
    help="--to-dir / MongoDB: replay all archived WAL or stored changes [the default].",
)
@click.option("--start", is_flag=True, help="--to-dir: start the server, recover, promote.")
@click.option("--port", type=int, default=None, help="--start: port on 127.0.0.1 [default: free].")
@click.option(
    "--run-as",
    default=None,
    help="When drbot runs as root: the OS user the server runs as [default: owner of the "
    "directory].",
)
@click.option("--backup", "backup_id", default=None, help="Backup id [default: the latest].")
@click.option(
    "--from",
    "from_destination",
    default=None,
    help="Read only from this destination [default: first that holds it, then the others].",
)
@click.option("--database", default=None, help="Which database of the backup, if it holds several.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop; writes nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--replace", is_flag=True, help="Allow a non-empty target: drop the backup's objects first."
)
@click.option(
    "--with-globals", is_flag=True, help="Also create roles from the backup (best effort)."
)
@click.option("--no-owner", is_flag=True, help="Do not restore ownership and privileges.")
@click.option(
    "--ns",
    "namespaces",
    multiple=True,
    metavar="DB[.COLL]",
    help="MongoDB: restore only this database or collection (repeatable) [default: all].",
)
@click.option(
    "--drop",
    is_flag=True,
    help="MongoDB: allow a non-empty target: drop the collections the restore writes first.",
)
@policies_option
@json_option
def command(
    policy_name: str,
    target_uri: str | None,
    target_dir: Path | None,
    at: str | None,
    lsn: str | None,
    latest: bool,
    start: bool,
    port: int | None,
    run_as: str | None,
    backup_id: str | None,
    from_destination: str | None,
    database: str | None,
    dry_run: bool,
    yes: bool,
    replace: bool,
    with_globals: bool,
    no_owner: bool,
    namespaces: tuple[str, ...],
    drop: bool,
    policies_dir: Path | None,
    as_json: bool,
) -> None:
    """Restore a backup into a PostgreSQL database, all or nothing, then check the data.

    drbot picks the latest complete backup (or --backup ID), reads it from the first destination
    holding a verified copy, authenticates every byte before it reaches the database, loads it in
    a single transaction (a corrupt object or a wrong key leaves the target exactly as it was)
    and compares row counts and checksums of every table with the fingerprint taken at backup
    time. A missing target database is created (and dropped again if the restore fails); a
    non-empty one is refused unless --replace.

    \b
    Physical backups (source.mode: physical) restore the whole cluster into a directory, to
    any moment the WAL covers: --to-dir PATH [--at TIME | --lsn LSN | --latest] [--start].
    drbot picks the newest base backup before the target, unpacks and checks it (every file
    against PostgreSQL's backup_manifest), writes the recovery settings, and with --start runs
    recovery, promotes, and leaves the server running on 127.0.0.1:PORT.

    \b
    MongoDB backups restore into a deployment, to any moment the stored change-stream slices
    cover: --to mongodb://HOST [--at TIME | --latest] [--ns DB[.COLL] ...] [--drop].
    Collections are created with their options, documents loaded, indexes built, the data
    compared with the backup's fingerprint, then the changes replayed as ordinary writes up
    to the target (a transaction whole or not at all).

    \b
    Examples:
      drbot restore --policy shop --to postgresql://postgres@localhost/shop_check --dry-run
      drbot restore --policy shop --to postgresql://postgres@localhost/shop --from replica --yes
      drbot restore --policy shop --to-dir /srv/pg/restored --at 2026-11-23T14:05:00Z --start
      drbot restore --policy orders --to mongodb://localhost:27017 --at 2026-11-23T14:05:00Z
    """
    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    if policy.source.kind == "mongodb":
        from drbot.cli.restore_mongo import restore_mongo

        restore_mongo(
            settings,
            policy,
            target_uri,
            at=at,
            latest=latest,
            from_destination=from_destination,
            ns=namespaces,
            drop=drop,
            dry_run=dry_run,
            yes=yes,
            as_json=as_json,
            postgres_only={
                "--to-dir": target_dir,
                "--lsn": lsn,
                "--start": start,
                "--port": port,
                "--run-as": run_as,
                "--backup": backup_id,
                "--database": database,
                "--replace": replace,
                "--with-globals": with_globals,
            },
        )
        return
    _refuse_mongo_options(namespaces, drop)
    if (target_uri is None) == (target_dir is None):
        raise UsageError(
            "give exactly one of --to URI (logical backups) and --to-dir PATH (physical)"
        )
    if target_dir is not None:
        from drbot.cli.restore_dir import parse_target, restore_to_dir

        if backup_id is not None or database is not None or replace or with_globals:
            raise UsageError("--backup, --database, --replace and --with-globals go with --to")
        restore_to_dir(
            settings,
            policy,
            target_dir,
            parse_target(at, lsn, latest),
            from_destination=from_destination,
            dry_run=dry_run,
            yes=yes,
            start=start,
            port=port,
            run_as=run_as,
            as_json=as_json,
        )
        return
    if at or lsn or latest or start or port or run_as:
        raise UsageError("--at, --lsn, --latest, --start, --port and --run-as go with --to-dir")
    if policy.source.mode == "physical":
        raise UsageError(
            f"policy {policy.name} takes physical backups of the whole cluster; they restore "
            "into a data directory, not into a database",
            hint=f"drbot restore --policy {policy.name} --to-dir /path/to/new/datadir --start",
        )
    assert target_uri is not None
    storages = build.build_storages(policy)
    build.only_destination(policy, storages, from_destination)  # a typo is refused, not ignored
    trail = audit_trail(settings)
    # A restore refused before it starts (no restore point, wrong key, target in use) is
    # still something someone tried during an incident.
    with recording_failure(
        trail,
        "restore.refused",
        policy=policy.name,
        subject={"backup_id": backup_id, "target": redact_text(target_uri)},
    ):
        scan = scan_catalog(policy.name, storages, build.build_keys(policy))
        for dest, exc in scan.unreachable.items():
            stderr.print(f"Warning: destination {dest} unreachable: {exc}")
        engine = build.build_target_engine(policy, target_uri)
        state = "empty" if engine.target_is_empty(target_uri) else "not-empty"
        plan = plan_restore(
            scan,
            policy=policy.name,
            target=redact_text(target_uri),
            target_state=state,
            backup_id=backup_id,
            from_destination=from_destination,
            database=database,
            replace=replace,
            with_globals=with_globals,
            no_owner=no_owner,
        )
    record_restore_planned(trail, plan, dry_run=dry_run)
    if dry_run:
        if as_json:
            print_json({"plan": _plan_json(plan), "dry_run": True})
        else:
            _print_plan(plan)
            click.echo("Dry run: nothing was written.")
        return
    if not as_json:
        _print_plan(plan)
    confirm(f"Restore backup {plan.backup_id} into {plan.target}?", yes=yes)
    storages_by_name = {s.name: s for s in storages}
    subject = restore_subject(plan)
    trail.record("restore.started", policy=plan.policy, subject=subject, outcome="info")
    with (
        recording_failure(trail, "restore.failed", policy=plan.policy, subject=subject),
        progress_bar() as progress,
    ):
        result = execute_restore(
            plan, scan, storages_by_name, engine, target_uri, SystemClock(), progress=progress
        )
    record_restore_completed(trail, plan, result)
    _report(plan, result, as_json=as_json)
    if result.mismatches:
        lines = "; ".join(
            f"{m.table}: {m.problem} (expected {m.expected}, got {m.actual})"
            for m in result.mismatches[:10]
        )
        raise IntegrityFailure(
            f"restored data differs from the backup's fingerprint: {lines}",
            hint="inspect the target; restore from another destination with --from",
        )


def _report(plan: RestorePlan, result: RestoreResult, *, as_json: bool) -> None:
    if as_json:
        print_json({"plan": _plan_json(plan), "result": _result_json(result)})
    else:
        for dest, why in result.failed_sources.items():
            click.echo(f"Warning: copy in {dest} was not usable: {why}", err=True)
        for w in result.warnings:
            click.echo(f"Warning: {w}", err=True)
        click.echo(
            f"Restored {plan.backup_id} from {result.source} into {plan.target} "
            f"in {result.duration_s:.1f}s."
        )
        if result.fingerprint_checked and not result.mismatches:
            click.echo(f"Data check: all {result.tables} table(s) match the backup's fingerprint.")
        elif not result.fingerprint_checked:
            click.echo("Data check: the backup has no fingerprint to compare with.")


def _refuse_mongo_options(namespaces: tuple[str, ...], drop: bool) -> None:
    if namespaces or drop:
        raise UsageError("--ns and --drop are for MongoDB policies")
