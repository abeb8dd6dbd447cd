"""Restore a backup into a database: plan first (pure, printable), then execute.

`plan_restore` decides which backup, which database of it, which destinations to read from (in
order) and checks the target's state, without any I/O. `execute_restore` loads the plan's
artifact in one transaction (a failure leaves the target as it was; a database drbot created for
the restore is dropped again), falls back to the next destination if a copy turns out to be
corrupt, and compares the restored data with the fingerprint recorded at backup time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from drbot.catalog import CatalogScan, Copy
from drbot.clock import Clock
from drbot.engines.base import Engine, Fingerprint, Mismatch, compare_fingerprints
from drbot.errors import (
    IntegrityFailure,
    KeyProblem,
    NoRestorePoint,
    ObjectNotFound,
    StorageUnavailable,
    UsageError,
)
from drbot.manifest import ArtifactRecord
from drbot.ops.artifacts import read_artifact
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

TargetState = str  # "missing" | "empty" | "not-empty"


@dataclass(frozen=True)
class RestorePlan:
    """Everything a restore will do, decided before anything is written."""

    policy: str
    backup_id: str
    database: str
    target: str
    """The target for people (no password)."""
    target_state: TargetState
    sources: tuple[str, ...]
    """Destinations holding a verified copy, in the order they will be tried."""
    artifacts: tuple[ArtifactRecord, ...]
    replace: bool
    with_globals: bool
    no_owner: bool
    expected: Fingerprint | None = None

    @property
    def size_bytes(self) -> int:
        return sum(a.size_bytes for a in self.artifacts)


def plan_restore(
    scan: CatalogScan,
    *,
    policy: str,
    target: str,
    target_state: TargetState,
    backup_id: str | None = None,
    from_destination: str | None = None,
    database: str | None = None,
    replace: bool = False,
    with_globals: bool = False,
    no_owner: bool = False,
) -> RestorePlan:
    """Decide the restore. Pure: reads only its arguments.

    Raises `NoRestorePoint` when no complete backup matches (naming what exists), `KeyProblem`
    when the wanted backup's manifests cannot be opened with the policy key, and `UsageError`
    for an ambiguous database or a non-empty target without `replace`.
    """
    key_problems = [
        p.error
        for p in scan.problems
        if isinstance(p.error, KeyProblem) and (backup_id is None or p.backup_id == backup_id)
    ]
    candidates = scan.backups
    if from_destination is not None:
        candidates = [b for b in candidates if from_destination in b.destinations]
    if backup_id is not None:
        candidates = [b for b in candidates if b.backup_id == backup_id]
    if not candidates:
        if key_problems:
            raise key_problems[0]
        down = [d for d in scan.unreachable if from_destination in (None, d)]
        if down:
            raise StorageUnavailable(
                f"no backup of policy {policy!r} could be found: destination(s) "
                + ", ".join(f"{d} ({scan.unreachable[d]})" for d in down)
                + " unreachable"
            )
        where = f" in destination {from_destination!r}" if from_destination else ""
        what = f"backup {backup_id}" if backup_id else "complete backup"
        existing = ", ".join(b.backup_id for b in scan.backups[-5:]) or "none"
        raise NoRestorePoint(
            f"no {what} of policy {policy!r}{where}",
            hint=f"`drbot list --policy {policy}` shows what exists (latest: {existing})",
        )
    backup = candidates[-1]
    manifest = backup.manifest
    dbs = [a.database for a in manifest.artifacts if a.kind == "pg_dump" and a.database]
    if database is None:
        if len(dbs) != 1:
            raise UsageError(
                f"backup {backup.backup_id} holds {len(dbs)} databases ({', '.join(dbs)}); "
                "say which one to restore",
                hint="--database NAME",
            )
        database = dbs[0]
    elif database not in dbs:
        raise NoRestorePoint(
            f"backup {backup.backup_id} has no database {database!r} (it has: {', '.join(dbs)})"
        )
    if target_state == "not-empty" and not replace:
        raise UsageError(
            f"target {target} is not empty; drbot will not restore over existing data",
            hint="restore into a new database, or add --replace to drop the backup's objects "
            "in the target first (in the same transaction)",
        )
    sources = list(backup.destinations)
    if from_destination is not None:
        sources = [from_destination]
    artifacts = tuple(
        a
        for a in manifest.artifacts
        if (a.kind == "pg_dump" and a.database == database)
        or (with_globals and a.kind == "pg_globals")
    )
    return RestorePlan(
        policy=policy,
        backup_id=backup.backup_id,
        database=database,
        target=target,
        target_state=target_state,
        sources=tuple(sources),
        artifacts=artifacts,
        replace=replace,
        with_globals=with_globals,
        no_owner=no_owner,
        expected=manifest.fingerprints.get(database),
    )


@dataclass(frozen=True)
class RestoreResult:
    """What a restore did and how the restored data compares with the backup."""

    backup_id: str
    source: str
    duration_s: float
    mismatches: list[Mismatch] = field(default_factory=list)
    fingerprint_checked: bool = False
    tables: int = 0
    warnings: list[str] = field(default_factory=list)
    failed_sources: dict[str, str] = field(default_factory=dict)


_FALLBACK_ERRORS = (IntegrityFailure, ObjectNotFound, StorageUnavailable)


def execute_restore(
    plan: RestorePlan,
    scan: CatalogScan,
    storages: Mapping[str, Storage],
    engine: Engine,
    target_uri: str,
    clock: Clock,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> RestoreResult:
    """Carry out `plan` into `target_uri` (the real URI; the plan holds only a display form).

    A corrupt or unreachable copy makes drbot try the next destination of the plan (the load
    is one transaction, so the target is untouched); when none is left the last error is raised.
    Database errors (`DatabaseError`, `SourceUnavailable`) are raised at once.
    """
    t0 = clock.monotonic()
    backup = scan.find(plan.backup_id)
    if backup is None:  # the plan came from this scan; anything else is a programming error
        raise NoRestorePoint(f"backup {plan.backup_id} is not in the catalog")
    log.info(
        "restore.started",
        policy=plan.policy,
        backup_id=plan.backup_id,
        database=plan.database,
        target=plan.target,
        sources=list(plan.sources),
    )
    created = engine.prepare_target(target_uri)
    failed: dict[str, str] = {}
    warnings: list[str] = []
    used: str | None = None
    try:
        for source in plan.sources:
            copy = backup.copy_in(source)
            if copy is None:
                failed[source] = "no complete copy"
                continue
            storage = storages[source]
            try:
                warnings = _load(
                    plan, copy.manifest.artifacts, storage, copy, engine, target_uri, progress
                )
                used = source
                break
            except _FALLBACK_ERRORS as exc:
                failed[source] = exc.message
                log.warning(
                    "restore.source_failed",
                    policy=plan.policy,
                    backup_id=plan.backup_id,
                    destination=source,
                    error=exc.message,
                )
                if source == plan.sources[-1]:
                    raise
        if used is None:
            raise NoRestorePoint(f"no destination could provide backup {plan.backup_id}")
        # Inside the try: a target drbot created and could not check is dropped. A target
        # that loaded but differs is kept (the caller reports it) so people can inspect it.
        mismatches: list[Mismatch] = []
        checked = False
        if plan.expected is not None:
            actual = engine.fingerprint_target(target_uri, plan.expected)
            mismatches = compare_fingerprints(plan.expected, actual)
            checked = True
    except BaseException as exc:
        if created:
            engine.drop_target(target_uri)
        log.error(
            "restore.failed",
            policy=plan.policy,
            backup_id=plan.backup_id,
            error=str(exc) or exc.__class__.__name__,
        )
        raise
    result = RestoreResult(
        backup_id=plan.backup_id,
        source=used,
        duration_s=round(clock.monotonic() - t0, 3),
        mismatches=mismatches,
        fingerprint_checked=checked,
        tables=len(plan.expected.tables) if plan.expected else 0,
        warnings=warnings,
        failed_sources=failed,
    )
    log.info(
        "restore.completed",
        policy=plan.policy,
        backup_id=plan.backup_id,
        destination=used,
        duration_s=result.duration_s,
        mismatches=len(mismatches),
    )
    return result


def _load(
    plan: RestorePlan,
    records: Sequence[ArtifactRecord],
    storage: Storage,
    copy: Copy,
    engine: Engine,
    target_uri: str,
    progress: Callable[[str, int], None] | None,
) -> list[str]:
    warnings: list[str] = []
    wanted = {a.name for a in plan.artifacts}
    for rec in records:
        if rec.name not in wanted:
            continue
        # Closed on every way out, so the reading thread stops even when the load failed.
        with contextlib.closing(read_artifact(storage, rec, copy.data_key)) as read:
            chunks: Iterable[bytes] = read
            if progress is not None:
                chunks = _report(chunks, rec.name, progress)
            if rec.kind == "pg_globals":
                warnings += engine.apply_globals(chunks, target_uri)
            else:
                engine.load(
                    rec.kind, chunks, target_uri, replace=plan.replace, no_owner=plan.no_owner
                )
    return warnings


def _report(
    chunks: Iterable[bytes], name: str, progress: Callable[[str, int], None]
) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        progress(name, total)
        yield chunk
