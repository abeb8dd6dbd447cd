"""Carrying out a retention plan (`drbot.ops.retention`): gather the facts, then delete.

A backup is deleted manifest first, in every destination, then its artifacts: once the
manifests are gone it no longer exists for `list`, `restore` or retention, so a prune cut short
never leaves a backup that looks complete, and the next backup's cleanup (ops/cleanup.py)
removes what is left of it. WAL segments below the plan's cutoff go last. Objects still under
object lock are never sent a delete: they are reported with the date they become deletable.
Callers hold the policy's lock, so no backup of the policy is being written meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from drbot.catalog import CatalogScan, group_by_backup
from drbot.engines.postgres.wal import DEFAULT_SEGMENT_SIZE, parse_lsn, parse_segment_name
from drbot.errors import DrbotError
from drbot.ops.retention import BackupFacts, RetentionPlan, lock_end
from drbot.storage import layout
from drbot.storage.base import ObjectInfo, Storage

log = structlog.get_logger(__name__)


def gather_facts(
    policy: str,
    scan: CatalogScan,
    storages: Sequence[Storage],
    lock_days: Mapping[str, int | None],
) -> list[BackupFacts]:
    """Retention facts of every complete backup: time, mode, WAL start, object-lock end.

    The lock end is taken from each object's last write (a key rotation rewrites manifests,
    which restarts their lock), plus the destination's lock days. Raises `StorageUnavailable`.
    """
    last_write: dict[tuple[str, str], datetime] = {}
    for storage in storages:
        if lock_days.get(storage.name) is None:
            continue
        listing = storage.list(layout.backups_prefix(policy))
        for backup_id, objs in group_by_backup(policy, listing).items():
            last_write[(storage.name, backup_id)] = max(o.modified_at for o in objs)
    facts = []
    for entry in scan.backups:
        m = entry.manifest
        start: int | None = None
        size: int | None = None
        if m.mode == "physical" and m.positions.get("start_lsn"):
            size = int(m.positions.get("segment_size", DEFAULT_SEGMENT_SIZE))
            start = parse_lsn(str(m.positions["start_lsn"])) // size
        ends = [
            lock_end(when, lock_days.get(dest))
            for (dest, backup_id), when in last_write.items()
            if backup_id == entry.backup_id
        ]
        locked = max((e for e in ends if e is not None), default=None)
        facts.append(BackupFacts(entry.backup_id, m.started_at, m.mode, start, size, locked))
    return facts


@dataclass
class PruneResult:
    deleted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wal_deleted: int = 0
    wal_locked: int = 0


def execute_prune(
    policy: str,
    plan: RetentionPlan,
    storages: Sequence[Storage],
    lock_days: Mapping[str, int | None],
    now: datetime,
    *,
    on_deleted: Callable[[str], None] | None = None,
) -> PruneResult:
    """Delete what `plan` says; see the module docstring. Never raises for one object: a
    failure is recorded and that backup's remaining objects are left for a later prune. When
    any backup could not be deleted, no WAL is: that backup still exists and needs its WAL."""
    result = PruneResult()
    listings = {s.name: _by_backup(policy, s) for s in storages}
    for backup_id in plan.delete:
        try:
            # Every destination's manifest first: from here on the backup does not exist.
            for storage in storages:
                if layout.manifest_key(policy, backup_id) in listings[storage.name].get(
                    backup_id, []
                ):
                    storage.delete(layout.manifest_key(policy, backup_id))
            for storage in storages:
                for key in listings[storage.name].get(backup_id, []):
                    if key != layout.manifest_key(policy, backup_id):
                        storage.delete(key)
        except DrbotError as exc:
            result.failed[backup_id] = exc.message
            log.error("prune.delete_failed", policy=policy, backup_id=backup_id, error=exc.message)
            continue
        result.deleted.append(backup_id)
        log.info("prune.deleted", policy=policy, backup_id=backup_id)
        if on_deleted:
            on_deleted(backup_id)
    if plan.wal_before_segment is not None and plan.wal_segment_size and not result.failed:
        for storage in storages:
            _prune_wal(policy, storage, plan.wal_before_segment, plan.wal_segment_size,
                       lock_days.get(storage.name), now, result)  # fmt: skip
    return result


def _by_backup(policy: str, storage: Storage) -> dict[str, list[str]]:
    listing = storage.list(layout.backups_prefix(policy))
    return {b: [o.key for o in objs] for b, objs in group_by_backup(policy, listing).items()}


def _prune_wal(
    policy: str,
    storage: Storage,
    before: int,
    segment_size: int,
    days: int | None,
    now: datetime,
    result: PruneResult,
) -> None:
    """Delete segments and partials numbered below `before` (history files and the heartbeat
    stay: they are tiny and describe timelines still in use)."""
    doomed: list[ObjectInfo] = []
    for obj in storage.list(layout.wal_prefix(policy)):
        parsed = layout.parse_wal_key(policy, obj.key)
        if parsed is None or parsed.kind not in ("segment", "partial"):
            continue
        seg = parse_segment_name(parsed.name, segment_size)
        if seg is not None and seg.number < before:
            doomed.append(obj)
    for obj in doomed:
        end = lock_end(obj.modified_at, days)
        if end is not None and end > now:
            result.wal_locked += 1
            continue
        try:
            storage.delete(obj.key)
            result.wal_deleted += 1
        except DrbotError as exc:
            result.failed[f"{storage.name}:{obj.key}"] = exc.message
