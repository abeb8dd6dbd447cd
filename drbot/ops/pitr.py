"""Point-in-time restore of a physical chain: plan (pure), then execute.

`plan_pitr` picks the base backup and the WAL a target needs from what the destinations hold:
for a time, the newest base backup completed at or before it; for an LSN, the newest that
stopped at or before it; for `latest`, the newest. The WAL path follows timelines (the history
files say where each began) and stops at the first missing segment: a target past that point
is refused (`NoRestorePoint`), never silently cut short.

`execute_pitr` unpacks the base backup into a staging directory, checks every file against
PostgreSQL's own backup_manifest (pg_verifybackup) and that manifest against drbot's, writes
the recovery settings, and only then renames the staging directory to the target. WAL is
decrypted and checked by drbot into a spool that the server's restore_command reads from.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog

from drbot.catalog import BackupEntry, CatalogScan
from drbot.engines.postgres.backupmanifest import check_files
from drbot.engines.postgres.untar import TarExtractor
from drbot.engines.postgres.wal import (
    DEFAULT_SEGMENT_SIZE,
    Segment,
    Switch,
    format_lsn,
    history_file_name,
    parse_lsn,
    segment_on,
    timeline_of,
)
from drbot.errors import (
    DrbotError,
    IntegrityFailure,
    NoRestorePoint,
    StorageUnavailable,
    UsageError,
)
from drbot.ops.artifacts import read_artifact
from drbot.ops.backup import Counted
from drbot.ops.walfetch import SpoolProgress, fail_spool_file, fetch_wal_file, put_spool_file
from drbot.ops.walstore import KeyCache, WalScan, read_history, scan_wal, with_heartbeats
from drbot.pipeline.prefetch import prefetch
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

_SPOOL_AHEAD = 8


@dataclass(frozen=True)
class Target:
    """What to restore to: 'latest', a 'time' (aware datetime) or an 'lsn'."""

    kind: str
    time: datetime | None = None
    lsn: int | None = None

    def describe(self) -> str:
        if self.kind == "time" and self.time is not None:
            return self.time.isoformat()
        if self.kind == "lsn" and self.lsn is not None:
            return format_lsn(self.lsn)
        return "latest"


@dataclass(frozen=True)
class WalFile:
    name: str
    size_bytes: int
    partial: bool = False


@dataclass(frozen=True)
class PitrPlan:
    """Everything a point-in-time restore will do, decided before anything is written."""

    policy: str
    backup_id: str
    target: Target
    timeline: int
    sources: tuple[str, ...]
    base_bytes: int
    wal: tuple[WalFile, ...]
    histories: tuple[str, ...]
    window_end: datetime | None
    """Approximately the newest moment the WAL reaches (the time its last object was stored)."""
    confirmed_until: datetime | None
    gap: str | None
    """The first missing segment after which WAL exists again (None without a hole)."""
    system_identifier: int
    segment_size: int
    stop_lsn: int
    """Where the base backup ends: the earliest point this plan can restore to."""

    @property
    def wal_bytes(self) -> int:
        return sum(w.size_bytes for w in self.wal)

    @property
    def wal_range(self) -> tuple[str, str] | None:
        return (self.wal[0].name, self.wal[-1].name) if self.wal else None


@dataclass(frozen=True)
class Window:
    """From a base backup, how far the WAL reaches (see `restorable_window`)."""

    timeline: int
    wal: tuple[WalFile, ...]
    end_time: datetime | None
    end_lsn: int
    partial: bool
    gap: str | None
    limit_lsn: int = 0
    """No restore point lies at or beyond this (the end of the last segment, even partial)."""
    confirmed_time: datetime | None = None
    """The newest moment a heartbeat proves the archive held all the server's WAL on this path."""


def _union(wal: WalScan) -> tuple[dict[Segment, int], dict[Segment, int], dict[Segment, datetime]]:
    full: dict[Segment, int] = {}
    partial: dict[Segment, int] = {}
    full_times: dict[Segment, datetime] = {}
    partial_times: dict[Segment, datetime] = {}
    for inv in wal.inventories.values():
        for seg, obj in inv.segments.items():
            full.setdefault(seg, obj.size_bytes)
            full_times[seg] = max(full_times.get(seg, obj.modified_at), obj.modified_at)
        for seg, obj in inv.partials.items():
            partial[seg] = max(partial.get(seg, 0), obj.size_bytes)
            partial_times[seg] = max(partial_times.get(seg, obj.modified_at), obj.modified_at)
    # A partial superseded by its complete segment (in any destination) says nothing more.
    return full, partial, {**partial_times, **full_times}


def segment_size_of(scan: CatalogScan) -> int:
    """The WAL segment size of a policy's cluster, from its newest physical backup."""
    physical = [b for b in scan.backups if b.manifest.mode == "physical"]
    if not physical:
        return DEFAULT_SEGMENT_SIZE
    return int(physical[-1].manifest.positions.get("segment_size", DEFAULT_SEGMENT_SIZE))


def read_archive(
    policy: str, storages: Sequence[Storage], scan: CatalogScan, keys: KeyCache
) -> tuple[WalScan, dict[int, list[Switch]]]:
    """What the WAL archive holds (with heartbeats) and its timeline histories, for planning."""
    wal = with_heartbeats(scan_wal(policy, storages, segment_size_of(scan)), policy, storages, keys)
    return wal, _load_histories(policy, storages, wal, keys)


def _load_histories(
    policy: str, storages: Sequence[Storage], wal: WalScan, keys: KeyCache
) -> dict[int, list[Switch]]:
    """Every timeline history file in the archive (from the first destination that opens it)."""
    timelines = sorted({t for inv in wal.inventories.values() for t in inv.histories})
    out: dict[int, list[Switch]] = {}
    for tli in timelines:
        for storage in storages:
            inv = wal.inventories.get(storage.name)
            if inv is None or tli not in inv.histories:
                continue
            try:
                out[tli] = read_history(policy, storage, tli, keys)
                break
            except DrbotError as exc:
                log.warning(
                    "restore.history_unreadable",
                    timeline=tli,
                    destination=storage.name,
                    error=exc.message,
                )
    return out


def descendant_timeline(base_tli: int, stop_lsn: int, histories: dict[int, list[Switch]]) -> int:
    """The newest timeline that continues `base_tli` after `stop_lsn` (recovery's 'latest')."""
    best = base_tli
    for tli, switches in histories.items():
        if tli <= best:
            continue
        # A switch exactly at the backup's end still continues it (the LSN before is base's).
        if timeline_of(stop_lsn - 1, tli, switches) == base_tli:
            best = tli
    return best


def restorable_window(
    entry: BackupEntry,
    wal: WalScan,
    histories: dict[int, list[Switch]],
    timeline: int | None = None,
) -> Window:
    """How far the WAL in the destinations reaches from base backup `entry` (pure)."""
    pos = entry.manifest.positions
    size = int(pos["segment_size"])
    base_tli = int(pos["timeline"])
    start, stop = parse_lsn(str(pos["start_lsn"])), parse_lsn(str(pos["stop_lsn"]))
    tli = timeline or descendant_timeline(base_tli, stop, histories)
    switches = histories.get(tli, [])
    full, partial, times = _union(wal)
    files: list[WalFile] = []
    end_lsn, end_time, is_partial = stop, entry.manifest.completed_at, False
    number = start // size
    while True:
        seg = segment_on(number, tli, switches, size)
        if seg in full:
            files.append(WalFile(seg.name(size), full[seg]))
            end_lsn = max(end_lsn, seg.end_lsn(size))
            end_time = max(end_time, times[seg])
        elif seg in partial:
            files.append(WalFile(seg.name(size), partial[seg], partial=True))
            end_time = max(end_time, times[seg])
            is_partial = True
            break
        else:
            break
        number += 1
    # A heartbeat says the archive was current at its time: if it was written while this
    # path's end was the archive's end (its position falls in the segment where the path stops),
    # the window reaches its time even if no WAL was written since.
    here = segment_on(number, tli, switches, size)
    confirmed: datetime | None = None
    for beat in wal.heartbeats:
        if (beat.timeline, beat.lsn // size) == (here.timeline, here.number) and files:
            end_time = max(end_time, beat.time)
            confirmed = max(confirmed or beat.time, beat.time)
    # WAL on this path beyond where it stops means a hole, not the end of the archive. (The
    # parent timeline going on past the switch is another history, not later WAL.)
    later = any(
        s.number > number and s == segment_on(s.number, tli, switches, size)
        for s in (*full, *partial)
    )
    gap = here.name(size) if later else None
    limit = (number + 1) * size if is_partial else end_lsn
    return Window(tli, tuple(files), end_time, end_lsn, is_partial, gap, limit, confirmed)


def plan_pitr(
    scan: CatalogScan,
    wal: WalScan,
    histories: dict[int, list[Switch]],
    *,
    policy: str,
    target: Target,
    from_destination: str | None = None,
) -> PitrPlan:
    """Choose the base backup and WAL for `target`; `NoRestorePoint` if no chain reaches it."""
    physical = [b for b in scan.backups if b.manifest.mode == "physical"]
    if from_destination is not None:
        physical = [b for b in physical if b.copy_in(from_destination) is not None]
    if not physical and scan.unreachable and not scan.backups:
        raise StorageUnavailable(
            "no destination of "
            f"{policy} could be read: "
            + "; ".join(f"{d}: {e.message}" for d, e in scan.unreachable.items())
        )
    if not physical:
        where = f" in {from_destination}" if from_destination else ""
        raise NoRestorePoint(
            f"policy {policy} has no complete physical base backup{where}",
            hint="take one with `drbot backup --policy NAME` (source.mode: physical)",
        )
    if target.kind == "time":
        assert target.time is not None
        fits = [b for b in physical if b.manifest.completed_at <= target.time]
    elif target.kind == "lsn":
        assert target.lsn is not None
        fits = [b for b in physical if parse_lsn(b.manifest.positions["stop_lsn"]) <= target.lsn]
    else:
        fits = physical
    if not fits:
        oldest = min(physical, key=lambda b: b.manifest.completed_at)
        raise NoRestorePoint(
            f"no base backup of {policy} ends before {target.describe()}; the oldest "
            f"({oldest.backup_id}) completed at {oldest.manifest.completed_at.isoformat()}"
        )
    entry = max(fits, key=lambda b: b.manifest.completed_at)
    window = restorable_window(entry, wal, histories)
    _check_reach(policy, target, entry, window)
    pos = entry.manifest.positions
    sources = [c.destination for c in entry.copies]
    if from_destination in sources:
        sources.remove(from_destination)
        sources.insert(0, from_destination)
    # Every history file, not only this path's: at promotion the server picks a timeline id
    # above all it can see, so it never reuses one another branch already has in the archive.
    needed = tuple(history_file_name(t) for t in sorted(histories))
    return PitrPlan(
        policy=policy,
        backup_id=entry.backup_id,
        target=target,
        timeline=window.timeline,
        sources=tuple(sources),
        base_bytes=entry.manifest.size_bytes,
        wal=window.wal,
        histories=needed,
        window_end=window.end_time,
        confirmed_until=window.confirmed_time,
        gap=window.gap,
        system_identifier=int(pos["system_identifier"]),
        segment_size=int(pos["segment_size"]),
        stop_lsn=parse_lsn(str(pos["stop_lsn"])),
    )


def _check_reach(policy: str, target: Target, entry: BackupEntry, window: Window) -> None:
    gap = f"; WAL is missing from segment {window.gap} on" if window.gap else ""
    if target.kind == "time" and target.time is not None:
        if window.end_time is None or target.time > window.end_time:
            reach = window.end_time.isoformat() if window.end_time else "its end"
            raise NoRestorePoint(
                f"{policy}: no restore point at {target.describe()}: from backup "
                f"{entry.backup_id} the WAL reaches only about {reach}{gap}",
                hint="pick an earlier --at, or check `drbot verify` and the WAL streamer",
            )
    elif (
        target.kind == "lsn"
        and target.lsn is not None
        and (target.lsn >= window.limit_lsn if window.partial else target.lsn > window.end_lsn)
    ):
        reach = (
            f"into the partial segment ending at {format_lsn(window.limit_lsn)}"
            if window.partial
            else format_lsn(window.end_lsn)
        )
        raise NoRestorePoint(
            f"{policy}: no restore point at {target.describe()}: from backup "
            f"{entry.backup_id} the WAL reaches only {reach}{gap}"
        )


# -- execution ---------------------------------------------------------------------------------


def unpack_base(
    plan: PitrPlan,
    scan: CatalogScan,
    storages: dict[str, Storage],
    staging: Path,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[str, bool]:
    """Unpack the base backup into `staging` (which must not exist) from the first copy that
    works; returns the destination used, and whether its files were checked against
    PostgreSQL's `backup_manifest` (False: a checksum only `verify_base` checks). Every byte is
    authenticated before tar sees it."""
    entry = scan.find(plan.backup_id)
    assert entry is not None
    errors: dict[str, str] = {}
    for name in plan.sources:
        copy = entry.copy_in(name)
        if copy is None:
            continue
        rec = copy.manifest.artifact("base.tar")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700, parents=True)
        # Decompressing in a thread of its own (reading and authenticating in another, inside
        # read_artifact) overlaps them with writing the files (zstd and the writes release
        # the GIL).
        chunks = prefetch(read_artifact(storages[name], rec, copy.data_key), depth=8)
        extractor = TarExtractor(staging)
        try:
            for chunk in Counted(chunks, rec.name, progress):
                extractor.feed(chunk)
            extractor.finish()
            where = f"{name}:{rec.key}"
            manifest = _check_backup_manifest(staging, copy.manifest.positions, where)
            return name, check_files(manifest, extractor.files, where)
        except (DrbotError, OSError) as exc:
            why = exc.message if isinstance(exc, DrbotError) else f"{exc.__class__.__name__}: {exc}"
            errors[name] = why
            log.warning("restore.copy_failed", destination=name, error=why)
        except BaseException:
            extractor.release()  # first: a writer must not create files behind the removal
            shutil.rmtree(staging, ignore_errors=True)  # no decrypted data left behind
            raise
        finally:
            extractor.release()
            chunks.close()  # stops the reading thread, whatever ended the unpacking
    shutil.rmtree(staging, ignore_errors=True)
    raise IntegrityFailure(
        "no copy of base backup "
        f"{plan.backup_id} could be unpacked: " + "; ".join(f"{d}: {w}" for d, w in errors.items())
    )


def _check_backup_manifest(staging: Path, positions: dict[str, object], where: str) -> bytes:
    """The unpacked `backup_manifest`, if it is the one drbot recorded at backup time."""
    try:
        manifest = (staging / "backup_manifest").read_bytes()
    except OSError:
        raise IntegrityFailure(f"{where}: the base backup has no backup_manifest") from None
    if hashlib.sha256(manifest).hexdigest() != positions.get("backup_manifest_sha256"):
        raise IntegrityFailure(f"{where}: backup_manifest differs from the one drbot recorded")
    return manifest


def verify_base(bin_dir: Path, staging: Path) -> None:
    """pg_verifybackup: every file's size and checksum against PostgreSQL's backup_manifest
    (for a manifest `unpack_base` could not check itself)."""
    proc = subprocess.run(
        [str(bin_dir / "pg_verifybackup"), "--no-parse-wal", "--quiet", str(staging)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise IntegrityFailure(
            f"the unpacked base backup does not match its backup_manifest: "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )


def recovery_settings(plan: PitrPlan, restore_command: str) -> dict[str, str]:
    """The settings appended to postgresql.auto.conf for this restore."""
    settings = {
        "restore_command": restore_command,
        "recovery_target_timeline": str(plan.timeline),
        "recovery_target_action": "promote",
        # A restored copy must never archive into, or replicate from, the source's setup.
        "archive_mode": "off",
        "primary_conninfo": "",
        "primary_slot_name": "",
    }
    if plan.target.kind == "time" and plan.target.time is not None:
        settings["recovery_target_time"] = plan.target.time.isoformat()
        settings["recovery_target_inclusive"] = "on"
    elif plan.target.kind == "lsn" and plan.target.lsn is not None:
        settings["recovery_target_lsn"] = format_lsn(plan.target.lsn)
        settings["recovery_target_inclusive"] = "on"
    return settings


def write_recovery(data_dir: Path, settings: dict[str, str]) -> None:
    def quote(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    lines = ["", "# drbot restore: recovery settings (reset once the server is promoted)"]
    lines += [f"{k} = {quote(v)}" for k, v in settings.items()]
    with (data_dir / "postgresql.auto.conf").open("a") as f:
        f.write("\n".join(lines) + "\n")
    (data_dir / "recovery.signal").touch()
    for stale in ("standby.signal", "postmaster.pid", "postmaster.opts"):
        (data_dir / stale).unlink(missing_ok=True)


@dataclass
class SpoolFiller:
    """Fetches the plan's WAL files into the spool, in order, a few ahead of the server."""

    plan: PitrPlan
    storages: Sequence[Storage]
    keys: KeyCache
    spool: Path
    wait: bool = True
    failures: dict[str, str] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def names(self) -> list[str]:
        return [*self.plan.histories, *(w.name for w in self.plan.wal)]

    def run(self) -> None:
        # History files first and all at once: the server asks for only some of them (the
        # target's, and at promotion the next ids), so they must not hold up the window.
        for name in self.plan.histories:
            if self.stop.is_set():
                return
            self._place(name, partial_ok=False)  # one the server never asks for may fail
        progress = SpoolProgress(self.spool, [w.name for w in self.plan.wal])
        for index, wal in enumerate(self.plan.wal):
            while self.wait and progress.pending(placed=index) >= _SPOOL_AHEAD:
                if self.stop.wait(0.05):
                    return
            # A segment the plan counted complete must come complete: a partial from another
            # destination (the complete one being down) would end recovery short of the plan.
            if self.stop.is_set() or not self._place(wal.name, partial_ok=wal.partial):
                return

    def _place(self, name: str, *, partial_ok: bool) -> bool:
        try:
            data = fetch_wal_file(
                self.plan.policy,
                name,
                self.storages,
                self.keys,
                system_identifier=self.plan.system_identifier,
                segment_size=self.plan.segment_size,
                partial_ok=partial_ok,
            )
            put_spool_file(self.spool, name, data)
        except BaseException as exc:
            # Whatever it was, the server must hear of it rather than wait for the file.
            why = exc.message if isinstance(exc, DrbotError) else f"{exc!r}"
            self.failures[name] = why
            self.errors[name] = exc
            fail_spool_file(self.spool, name, why)
            log.error("restore.wal_failed", name=name, error=why)
            if not isinstance(exc, Exception):
                raise
            return False
        return True


def ensure_empty_target(path: Path) -> None:
    if path.is_mount():
        raise UsageError(
            f"{path} is a mount point; drbot unpacks next to the target and renames it into "
            "place, which a mount point cannot take",
            hint=f"restore into a new directory inside it, e.g. {path / 'data'}",
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(
            f"{path} exists and is not empty; drbot restores only into a new or empty directory",
            hint="choose another --to-dir, or move that directory away first",
        )
