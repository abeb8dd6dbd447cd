"""Restore a MongoDB backup, to its own moment or to any later one its slices reach.

`plan_mongo_restore` is pure: it picks the newest full backup consistent at or before the
target, the unbroken chain of slices that continues from it, and the destinations to read
from, and refuses a non-empty target without `drop`. `execute_mongo_restore` then loads the
dumps (collections with their options, documents, indexes after the data), checks what was
loaded against the backup's fingerprints, replays the backup's own events to reach its
consistent moment, and then the slices' events up to the target, a transaction whole or not at
all. If anything fails, the namespaces it created are dropped: the target is left empty, as
it was found.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from bson.timestamp import Timestamp
from pymongo import MongoClient

from drbot.catalog import BackupEntry, CatalogScan
from drbot.engines.base import Fingerprint, Mismatch, compare_fingerprints
from drbot.engines.mongodb import archive, target
from drbot.engines.mongodb.client import SYSTEM_DATABASES, RawClient, where
from drbot.engines.mongodb.dump import CHANGES_KIND, DUMP_KIND
from drbot.engines.mongodb.load import DumpLoader
from drbot.engines.mongodb.position import ts_at, ts_datetime, ts_key, ts_parse, ts_text
from drbot.engines.mongodb.replay import Replayer, group, select
from drbot.errors import (
    DrbotError,
    IntegrityFailure,
    KeyProblem,
    NoRestorePoint,
    ObjectNotFound,
    StorageUnavailable,
    UsageError,
)
from drbot.manifest import ArtifactRecord
from drbot.ops.artifacts import read_artifact
from drbot.ops.changestore import (
    Gap,
    Heartbeat,
    SliceBody,
    SliceRef,
    chain_from,
    iter_changes,
    read_slice,
)
from drbot.ops.walstore import KeyCache
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

WALL_CLOCK_SLACK = timedelta(seconds=2)
"""How far an event's cluster time may run ahead of its wall time (both the primary's clock)."""


@dataclass(frozen=True)
class Selection:
    """Which namespaces a restore covers: whole databases and single collections, or (`every`)
    every database but admin, local and config, including those created after the backup."""

    databases: frozenset[str]
    collections: frozenset[tuple[str, str]] = frozenset()
    every: bool = False

    @classmethod
    def parse(
        cls, backup_dbs: Sequence[str], ns: Sequence[str], *, every_database: bool = False
    ) -> Selection:
        """`--ns DB` / `--ns DB.COLL` values (none: every database of the backup, or with
        `every_database`, which a policy without a `databases:` list means, every one)."""
        if not ns:
            return cls(frozenset(backup_dbs), every=every_database)
        dbs: set[str] = set()
        colls: set[tuple[str, str]] = set()
        for item in ns:
            db, dot, coll = item.partition(".")
            if db not in backup_dbs:
                raise UsageError(
                    f"--ns {item}: the backup has no database {db!r} "
                    f"(it has: {', '.join(backup_dbs) or 'none'})"
                )
            if dot and coll:
                colls.add((db, coll))
            else:
                dbs.add(db)
        return cls(frozenset(dbs), frozenset(colls))

    def covers(self, db: str, coll: str | None) -> bool:
        if db in self.databases or (self.every and db not in SYSTEM_DATABASES):
            return True
        if coll is None:
            return any(d == db for d, _ in self.collections)
        return (db, coll) in self.collections

    def whole(self, db: str) -> bool:
        """Whether all of database `db` is covered (not just some of its collections)."""
        return db in self.databases or (self.every and db not in SYSTEM_DATABASES)

    def describe(self) -> list[str]:
        if self.every:
            return ["every database but admin, local and config"]
        return sorted(self.databases) + sorted(f"{d}.{c}" for d, c in self.collections)


@dataclass(frozen=True)
class MongoRestorePlan:
    """Everything a MongoDB restore will do, decided before anything is written."""

    policy: str
    backup_id: str
    consistent_time: Timestamp
    target_time: Timestamp | None
    """None: as far as the stored changes go (--latest)."""
    target_at: datetime | None
    target: str
    occupied: tuple[str, ...]
    drop: bool
    sources: tuple[str, ...]
    dumps: tuple[ArtifactRecord, ...]
    changes: ArtifactRecord | None
    slice_source: str | None
    slices: tuple[SliceRef, ...]
    reach: Timestamp
    """The newest moment the plan can restore to (the target, or the end of the stored changes)."""
    selection: Selection
    expected: Fingerprint
    gap: Gap | None = None
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "backup_id": self.backup_id,
            "consistent_time": ts_text(self.consistent_time),
            "consistent_at": ts_datetime(self.consistent_time).isoformat(),
            "target_time": ts_text(self.target_time) if self.target_time else None,
            "target_at": self.target_at.isoformat() if self.target_at else None,
            "reach": ts_text(self.reach),
            "reach_at": ts_datetime(self.reach).isoformat(),
            "target": self.target,
            "namespaces": self.selection.describe(),
            "occupied": list(self.occupied),
            "drop": self.drop,
            "sources": list(self.sources),
            "dumps": [a.name for a in self.dumps],
            "slices": len(self.slices),
            "slice_source": self.slice_source,
            "warnings": list(self.warnings),
        }


def _consistent(entry: BackupEntry) -> Timestamp | None:
    text = entry.manifest.positions.get("consistent_time")
    return ts_parse(str(text)) if text else None


def _data_since(entry: BackupEntry) -> datetime:
    """From when a backup's data is what it restores to (positions' `data_since`, to the
    millisecond; without it, the end of the second before its consistent time: cluster
    times count whole seconds)."""
    text = entry.manifest.positions.get("data_since")
    if text:
        return datetime.fromisoformat(str(text))
    consistent = _consistent(entry)
    assert consistent is not None
    return ts_datetime(consistent) + timedelta(seconds=1) - timedelta(microseconds=1)


def plan_mongo_restore(
    scan: CatalogScan,
    slices: Mapping[str, Sequence[SliceRef]],
    *,
    policy: str,
    target: str,
    occupied: Sequence[str],
    at: datetime | None = None,
    from_destination: str | None = None,
    ns: Sequence[str] = (),
    drop: bool = False,
    every_database: bool = False,
    heartbeat: Heartbeat | None = None,
) -> MongoRestorePlan:
    """Decide the restore. Pure: reads only its arguments.

    `slices` holds each reachable destination's slices; `heartbeat`, the newest streamer
    heartbeat, extends what the chain proves to its time when it was written at the chain's
    end. Raises `NoRestorePoint` when no backup
    is consistent at or before `at`, or a gap in the stored changes lies before `at`;
    `KeyProblem` when the manifests cannot be opened; `UsageError` for a non-empty target
    without `drop` or an `--ns` outside the backup.
    """
    limit = None if at is None else ts_at(at)
    entries = [
        b
        for b in scan.backups
        if (from_destination is None or from_destination in b.destinations)
        and _consistent(b) is not None
    ]
    if not entries:
        keyed = [p.error for p in scan.problems if isinstance(p.error, KeyProblem)]
        if keyed:
            raise keyed[0]
        raise NoRestorePoint(
            f"no complete MongoDB backup of policy {policy!r}"
            + (f" in destination {from_destination!r}" if from_destination else ""),
            hint=f"`drbot list --policy {policy}` shows what exists",
        )
    usable = [b for b in entries if at is None or _data_since(b) <= at]
    if not usable:
        earliest = min(_data_since(b) for b in entries)
        raise NoRestorePoint(
            f"no backup of policy {policy!r} is consistent at or before {at}",
            hint=f"the earliest restorable moment is {earliest.isoformat()}",
        )
    backup = usable[-1]
    consistent = _consistent(backup)
    assert consistent is not None
    manifest = backup.manifest
    selection = Selection.parse(manifest.databases, ns, every_database=every_database)
    if occupied and not drop:
        raise UsageError(
            f"the target already holds data in {', '.join(occupied[:5])}"
            + (f" and {len(occupied) - 5} more" if len(occupied) > 5 else ""),
            hint="restore into an empty deployment, or add --drop to replace those collections",
        )
    order = list(backup.destinations)
    if from_destination is not None:
        order = [from_destination]
    dumps = tuple(
        a
        for a in manifest.artifacts
        if a.kind == DUMP_KIND and a.database is not None and selection.covers(a.database, None)
    )
    changes = next((a for a in manifest.artifacts if a.kind == CHANGES_KIND), None)
    expected = Fingerprint(
        tables={
            name: fp
            for fps in manifest.fingerprints.values()
            for name, fp in fps.tables.items()
            if selection.covers(*name.split(".", 1))
        }
    )

    slice_source, run, gap = best_chain(slices, from_destination, ts_key(consistent))
    if at is not None:
        # Events are selected by their wall time, whose second may trail the cluster time's:
        # read the slices of a little past the target too.
        run = _until(run, ts_key(ts_at(at + WALL_CLOCK_SLACK)))
    end = max([ts_key(consistent)] + [s.end for s in run])
    confirmed = end
    if heartbeat is not None and heartbeat.end == end and gap is None:
        # Current at the heartbeat's time with nothing after `end`: the data then was as at end.
        confirmed = max(end, ts_key(ts_at(heartbeat.time)))
    reach = _timestamp(confirmed)
    warnings: list[str] = []
    if limit is not None and ts_key(limit) > confirmed:
        where_end = ts_datetime(_timestamp(end)).isoformat()
        if gap is not None and gap.after < ts_key(limit):
            raise NoRestorePoint(
                f"the stored changes of policy {policy!r} have a gap after {where_end}: "
                f"nothing can be restored past it from backup {backup.backup_id}",
                hint="restore to a moment before the gap, or pick a later backup with --at",
            )
        warnings.append(
            f"the newest stored change is at {where_end}"
            + (
                f" (and the streamer confirmed nothing changed until "
                f"{ts_datetime(reach).isoformat()})"
                if confirmed > end
                else ""
            )
            + "; changes after that, if any, were not shipped (streamer behind or stopped) "
            f"and cannot be restored: the data will be as of {ts_datetime(reach).isoformat()}, "
            f"not {ts_datetime(limit).isoformat()}"
        )
    elif limit is not None:
        reach = limit
    return MongoRestorePlan(
        policy=policy,
        backup_id=backup.backup_id,
        consistent_time=consistent,
        target_time=limit,
        target_at=at,
        target=target,
        occupied=tuple(occupied),
        drop=drop,
        sources=tuple(order),
        dumps=dumps,
        changes=changes,
        slice_source=slice_source,
        slices=tuple(run),
        reach=reach,
        selection=selection,
        expected=expected,
        gap=gap,
        warnings=tuple(warnings),
    )


def _timestamp(key: int) -> Timestamp:
    return Timestamp(key >> 32, key & 0xFFFFFFFF)


def best_chain(
    slices: Mapping[str, Sequence[SliceRef]], only: str | None, start: int
) -> tuple[str | None, list[SliceRef], Gap | None]:
    """The destination whose chain from `start` reaches furthest, that chain, and the gap
    ending it (None: it ends at the newest slice). Without any chain, the earliest gap any
    destination shows (stored changes exist, but none continue from `start`)."""
    best: tuple[str | None, list[SliceRef], Gap | None] = (None, [], None)
    gaps: list[Gap] = []
    for dest, refs in slices.items():
        if only is not None and dest != only:
            continue
        run, gap = chain_from(refs, start)
        if run and (not best[1] or run[-1].end > best[1][-1].end):
            best = (dest, run, gap)
        elif not run and gap is not None:
            gaps.append(gap)
    if best[0] is None and gaps:
        return None, [], min(gaps, key=lambda g: g.before)
    return best


def _until(run: list[SliceRef], limit: int) -> list[SliceRef]:
    """The slices of `run` that can hold events at or before `limit`."""
    out = []
    for s in run:
        if s.start >= limit:
            break
        out.append(s)
    return out


@dataclass
class MongoRestoreResult:
    backup_id: str
    source: str
    collections: list[str]
    documents: int
    events_applied: int
    reached: Timestamp
    reached_at: datetime
    """The moment the data is as of: the target itself (to the millisecond) when reached."""
    duration_s: float
    mismatches: list[Mismatch] = field(default_factory=list)
    events_by_type: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def execute_mongo_restore(
    plan: MongoRestorePlan,
    scan: CatalogScan,
    storages: Mapping[str, Storage],
    keys: KeyCache,
    client: RawClient,
    exact: MongoClient[dict[str, Any]],
    uri: str,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> MongoRestoreResult:
    """Carry out `plan` into the target `client` (raw) / `exact` (decoding exactly).

    Raises what reading raises (`IntegrityFailure`, `ObjectNotFound`, `StorageUnavailable`,
    `KeyProblem`), `SourceUnavailable`/`DatabaseError` from the target, and `IntegrityFailure`
    when the loaded data does not match the backup's fingerprint; in every case after dropping
    what it created.
    """
    t0 = time.monotonic()
    entry = scan.find(plan.backup_id)
    assert entry is not None
    copy = next(c for c in (entry.copy_in(d) for d in plan.sources) if c is not None)
    storage = storages[copy.destination]
    covers = plan.selection.covers
    if plan.drop and plan.occupied:
        target.drop(client, uri, plan.occupied)
    before = set(target.existing(client, uri, covers))
    try:
        loader = DumpLoader(client, covers)
        for rec in plan.dumps:
            # Closed on every way out, so the reading thread stops even when the load failed.
            with contextlib.closing(read_artifact(storage, rec, copy.data_key)) as chunks:
                loader.load(_counted(chunks, rec, progress), f"{copy.destination}:{rec.key}")
        actual = target.fingerprint(client, uri, plan.expected.tables)
        mismatches = compare_fingerprints(plan.expected, actual)
        if mismatches:
            raise IntegrityFailure(
                "the loaded data does not match the backup's fingerprint: "
                + "; ".join(
                    f"{m.table}: {m.problem} {m.expected} != {m.actual}" for m in mismatches
                )
            )
        replayer = Replayer(exact, covers, plan.selection.whole)
        if plan.changes is not None:
            with contextlib.closing(read_artifact(storage, plan.changes, copy.data_key)) as raw:
                own = iter_changes(raw, f"{copy.destination}:{plan.changes.key}")
                replayer.fuzzy, replayer.schema = True, loader
                for g in group(archive.decode(e) for e in own):
                    replayer.apply_group(g)
                replayer.fuzzy, replayer.schema = False, None
        loader.finish()
        reached = plan.consistent_time
        if plan.slices:
            assert plan.slice_source is not None
            order = [plan.slice_source] + [d for d in storages if d != plan.slice_source]
            events = _slice_events(
                [storages[d] for d in order], plan.slices, keys, plan.consistent_time
            )
            for g in select(group(events), plan.target_time, plan.target_at):
                replayer.apply_group(g)
                reached = max(reached, g[-1]["clusterTime"], key=ts_key)
        if plan.target_time is not None:
            reached = plan.reach
        elif plan.slices:
            reached = max(reached, plan.reach, key=ts_key)
    except BaseException:
        log.error("restore.mongo_failed", policy=plan.policy, backup_id=plan.backup_id)
        try:
            # Everything in the covered databases now that was not there before is ours.
            target.drop(client, uri, set(target.existing(client, uri, covers)) - before)
        except Exception as exc:
            log.error("restore.mongo_cleanup_failed", error=str(exc), target=where(uri))
        raise
    return MongoRestoreResult(
        backup_id=plan.backup_id,
        source=copy.destination,
        collections=list(loader.stats.collections),
        documents=loader.stats.documents,
        events_applied=replayer.stats.events,
        reached=reached,
        reached_at=(
            plan.target_at
            if plan.target_at is not None and ts_key(reached) >= ts_key(plan.target_time or reached)
            else ts_datetime(reached)
        ),
        duration_s=round(time.monotonic() - t0, 3),
        mismatches=[],
        events_by_type=dict(replayer.stats.by_type),
        warnings=list(plan.warnings) + _summarized(replayer.stats.warnings),
    )


def _summarized(warnings: list[str], limit: int = 10) -> list[str]:
    """At most `limit` warnings, then how many more there were."""
    if len(warnings) <= limit:
        return list(warnings)
    return [*warnings[:limit], f"... and {len(warnings) - limit} more like these"]


def _counted(
    chunks: Iterator[bytes], rec: ArtifactRecord, progress: Callable[[str, int], None] | None
) -> Iterator[bytes]:
    done = 0
    for chunk in chunks:
        done += len(chunk)
        if progress is not None:
            progress(rec.name, done)
        yield chunk


def _slice_events(
    storages: Sequence[Storage], refs: Sequence[SliceRef], keys: KeyCache, after: Timestamp
) -> Iterator[dict[str, Any]]:
    """Events of a chain of slices (`chain_from`) that come after the backup's moment `after`.

    The first slice, which covers `after`, contributes its events newer than `after` (the
    backup holds every event up to it). A slice starting exactly where the previous one ended
    must start with the token that one ended at, and contributes all its events; one that
    overlaps the previous (a restart from another destination's copy) only those newer than the
    previous end. Each slice is read from the first of `storages` whose copy is intact (a
    damaged or missing copy is logged and the next one tried)."""
    previous: str | None = None
    pos = ts_key(after)
    for ref in refs:
        body = _read_any(storages, ref, keys)
        continues = previous is not None and ref.start == pos
        if continues and archive.token_text(body.start_token) != previous:
            raise IntegrityFailure(
                f"{ref.key}: starts at another resume token than the previous slice ended "
                "at (the chain is broken)"
            )
        for raw in body.events:
            event = archive.decode(raw)
            if continues or ts_key(event["clusterTime"]) > pos:
                yield event
        previous = archive.token_text(body.end_token)
        pos = ref.end


def _read_any(storages: Sequence[Storage], ref: SliceRef, keys: KeyCache) -> SliceBody:
    errors: list[DrbotError] = []
    for storage in storages:
        try:
            return read_slice(storage, ref, keys)
        except (IntegrityFailure, ObjectNotFound, StorageUnavailable) as exc:
            log.warning(
                "restore.slice_unreadable", destination=storage.name, key=ref.key, error=str(exc)
            )
            errors.append(exc)
    if any(isinstance(e, IntegrityFailure) for e in errors):
        raise next(e for e in errors if isinstance(e, IntegrityFailure))
    raise errors[0]
