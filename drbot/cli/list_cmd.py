"""drbot list: the complete backups of one or every policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from drbot.catalog import CatalogScan, scan_catalog
from drbot.cli import build
from drbot.cli.common import (
    find_policy,
    human_bytes,
    json_option,
    load_policies,
    load_settings,
    policies_option,
    print_json,
    stderr,
)
from drbot.errors import KeyProblem, StorageUnavailable
from drbot.pipeline.keys import KeyProvider
from drbot.storage.base import Storage


def _windows(
    policy: Any, scan: CatalogScan, storages: list[Storage], keys: KeyProvider
) -> dict[str, dict[str, Any]]:
    """Per physical (or MongoDB) backup: the span of time and WAL positions (or cluster
    times) it can be restored to."""
    if policy.source.kind == "mongodb":
        return _mongo_windows(policy, scan, storages)
    physical = [b for b in scan.backups if b.manifest.mode == "physical"]
    if not physical:
        return {}
    from drbot.engines.postgres.wal import format_lsn
    from drbot.ops.pitr import read_archive, restorable_window
    from drbot.ops.walstore import KeyCache

    storages = build.build_storages(policy)
    wal, histories = read_archive(policy.name, storages, scan, KeyCache(build.build_keys(policy)))
    out: dict[str, dict[str, Any]] = {}
    for b in physical:
        w = restorable_window(b, wal, histories)
        out[b.backup_id] = {
            "timeline": w.timeline,
            "from_time": b.manifest.completed_at.isoformat(),
            "from_lsn": b.manifest.positions.get("stop_lsn"),
            "to_time": w.end_time.isoformat() if w.end_time else None,
            "to_lsn": format_lsn(w.end_lsn),
            "to_partial_segment": w.partial,
            # The newest moment a streamer heartbeat proves the archive held all the server's
            # WAL: a restore to a later moment with no commit after it needs this to reach it.
            "confirmed_time": w.confirmed_time.isoformat() if w.confirmed_time else None,
            "wal_files": len(w.wal),
            "gap": w.gap,
        }
    return out


def _mongo_windows(
    policy: Any, scan: CatalogScan, storages: list[Storage]
) -> dict[str, dict[str, Any]]:
    from bson.timestamp import Timestamp

    from drbot.engines.mongodb.position import ts_at, ts_datetime, ts_key, ts_parse, ts_text
    from drbot.ops.changestore import read_heartbeat, slices_in
    from drbot.ops.mongo_restore import best_chain
    from drbot.ops.walstore import KeyCache

    slices = {s.name: refs for s, refs in slices_in(policy.name, storages)}
    beat = read_heartbeat(policy.name, storages, KeyCache(build.build_keys(policy)))
    out: dict[str, dict[str, Any]] = {}
    for b in scan.backups:
        text = b.manifest.positions.get("consistent_time")
        if not text:
            continue
        start = ts_key(ts_parse(str(text)))
        source, run, gap = best_chain(slices, None, start)
        end = max([start] + [r.end for r in run])
        if beat is not None and beat.end == end and gap is None:
            # Confirmed current at the heartbeat: nothing changed between end and then.
            end = max(end, ts_key(ts_at(beat.time)))
        reach = Timestamp(end >> 32, end & 0xFFFFFFFF)
        out[b.backup_id] = {
            "from_time": b.manifest.positions.get("consistent_at"),
            "from_cluster_time": text,
            "to_time": ts_datetime(reach).isoformat(),
            "to_cluster_time": ts_text(reach),
            "slices": len(run),
            "slice_source": source,
            "gap": None
            if gap is None or not run
            else ts_datetime(Timestamp(gap.after >> 32, gap.after & 0xFFFFFFFF)).isoformat(),
        }
    return out


def _rows(
    policy: Any, scan: CatalogScan, storages: list[Storage], keys: KeyProvider
) -> list[dict[str, Any]]:
    rows = []
    windows = _windows(policy, scan, storages, keys)
    for b in scan.backups:
        m = b.manifest
        rows.append(
            {
                "id": b.backup_id,
                "policy": policy.name,
                "type": m.type,
                "mode": m.mode,
                "engine": m.engine,
                "started_at": m.started_at.isoformat(),
                "completed_at": m.completed_at.isoformat(),
                "size_bytes": sum(a.plaintext_bytes for a in m.artifacts),
                "stored_bytes": m.size_bytes,
                "destinations": b.destinations,
                "databases": list(m.databases),
                "source_version": m.source_version,
                "key_id": m.key_id,
                "positions": m.positions or None,
                "restorable": windows.get(b.backup_id),
            }
        )
    return rows


@click.command("list")
@click.option("--policy", "policy_name", default=None, help="Only this policy [default: all].")
@policies_option
@json_option
def command(policy_name: str | None, policies_dir: Path | None, as_json: bool) -> None:
    """List complete backups: those whose manifest is stored and authenticates.

    Interrupted or still-running backups are not listed (they have no manifest yet). For a
    physical backup, RESTORABLE TO is how far the archived WAL after it reaches (any moment
    from the backup's end to there can be restored with --at); a gap ends it early.

    \b
    Examples:
      drbot list
      drbot list --policy shop --json
    """
    settings = load_settings(policies_dir)
    policies = [find_policy(settings, policy_name)] if policy_name else load_policies(settings)
    rows: list[dict[str, Any]] = []
    down: list[str] = []  # policies none of whose destinations answered
    for policy in policies:
        storages, keys = build.build_storages(policy), build.build_keys(policy)
        scan = scan_catalog(policy.name, storages, keys)
        for dest, exc in scan.unreachable.items():
            stderr.print(f"Warning: {policy.name}/{dest} unreachable: {exc}")
        for p in scan.problems:
            stderr.print(f"Warning: {p.destination}: backup {p.backup_id} not listed: {p.error}")
        if not scan.backups and any(isinstance(p.error, KeyProblem) for p in scan.problems):
            raise next(p.error for p in scan.problems if isinstance(p.error, KeyProblem))
        if len(scan.unreachable) == len(policy.destinations):
            down.append(policy.name)
        rows += _rows(policy, scan, storages, keys)
    _print_rows(rows, as_json=as_json)
    if down:
        raise StorageUnavailable(
            f"no destination of policy {', '.join(down)} could be listed; the list is incomplete"
        )


def _print_rows(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("No complete backups.")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("POLICY", "ID", "MODE", "COMPLETED (UTC)", "SIZE", "DESTINATIONS", "RESTORABLE TO"):
        table.add_column(col)
    for r in rows:
        window = r["restorable"]
        reach = "its end"
        if window is not None and window["to_time"]:
            reach = "~" + window["to_time"][:19].replace("T", " ")
            if window["gap"]:
                reach += f" (gap at {window['gap']})"
        table.add_row(
            r["policy"],
            r["id"],
            r["mode"],
            r["completed_at"][:19].replace("T", " "),
            human_bytes(r["size_bytes"]),
            ", ".join(r["destinations"]),
            reach,
        )
    Console(width=200).print(table)
