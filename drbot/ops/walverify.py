"""Verify a policy's WAL archive: open every WAL object, and find the holes in each chain."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from drbot.catalog import CatalogScan
from drbot.engines.postgres.wal import (
    DEFAULT_SEGMENT_SIZE,
    Switch,
    check_segment_bytes,
    history_file_name,
)
from drbot.errors import DrbotError, IntegrityFailure, StorageUnavailable
from drbot.ops.pitr import restorable_window
from drbot.ops.walstore import (
    KeyCache,
    WalInventory,
    WalScan,
    list_wal,
    read_history,
    read_wal_object,
)
from drbot.pipeline.keys import KeyProvider
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)


@dataclass
class WalFinding:
    destination: str
    subject: str
    """The backup id whose chain has the hole, or the WAL file name that is damaged."""
    key: str
    problem: str


@dataclass
class WalVerifyResult:
    checked_objects: int = 0
    checked_bytes: int = 0
    findings: list[WalFinding] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)


def verify_wal(
    policy: str,
    storages: Sequence[Storage],
    keys: KeyProvider,
    scan: CatalogScan,
    progress: Callable[[str, str, int], None] | None = None,
) -> WalVerifyResult:
    """Open and check every WAL object in every destination, then look for gaps.

    A gap is a missing segment after which the same chain has WAL again: restores from the
    base backups before it stop there. Each is a finding naming the segment and the backup.
    """
    physical = [b for b in scan.backups if b.manifest.mode == "physical"]
    positions = physical[-1].manifest.positions if physical else {}
    checker = _Checker(
        policy,
        KeyCache(keys),
        int(positions.get("segment_size", DEFAULT_SEGMENT_SIZE)),
        int(positions.get("system_identifier", 0)),
        progress,
    )
    for storage in storages:
        try:
            inv = list_wal(policy, storage, checker.size)
            histories = checker.histories(storage, inv)
            checker.segments(storage, inv)
        except StorageUnavailable as exc:
            checker.result.unreachable[storage.name] = exc.message
            continue
        only_here = WalScan({storage.name: inv}, {})
        for entry in physical:
            if entry.copy_in(storage.name) is None:
                continue
            window = restorable_window(entry, only_here, histories)
            if window.gap is not None:
                checker.result.findings.append(
                    WalFinding(
                        storage.name,
                        entry.backup_id,
                        layout.wal_segment_key(policy, window.gap),
                        f"WAL segment {window.gap} is missing: restores from backup "
                        f"{entry.backup_id} stop before it although later WAL exists",
                    )
                )
    return checker.result


class _Checker:
    def __init__(
        self,
        policy: str,
        cache: KeyCache,
        size: int,
        system_id: int,
        progress: Callable[[str, str, int], None] | None,
    ) -> None:
        self.policy = policy
        self.cache = cache
        self.size = size
        self.system_id = system_id
        self.progress = progress
        self.result = WalVerifyResult()

    def _bad(self, storage: Storage, name: str, key: str, exc: DrbotError) -> None:
        if isinstance(exc, StorageUnavailable):
            raise exc
        self.result.findings.append(WalFinding(storage.name, name, key, exc.message))
        log.error("verify.wal_failed", destination=storage.name, key=key, error=exc.message)

    def histories(self, storage: Storage, inv: WalInventory) -> dict[int, list[Switch]]:
        out: dict[int, list[Switch]] = {}
        for tli in sorted(inv.histories):
            name = history_file_name(tli)
            try:
                out[tli] = read_history(self.policy, storage, tli, self.cache)
                self.result.checked_objects += 1
            except DrbotError as exc:
                self._bad(storage, name, layout.wal_history_key(self.policy, name), exc)
        return out

    def segments(self, storage: Storage, inv: WalInventory) -> None:
        objects = [
            *((seg, False) for seg in sorted(inv.segments)),
            *((seg, True) for seg in sorted(inv.partials)),
        ]
        for seg, partial in objects:
            name = seg.name(self.size)
            key = layout.wal_segment_key(self.policy, name, partial=partial)
            try:
                data = read_wal_object(storage, key, self.cache)
                if len(data) > self.size or (not partial and len(data) != self.size):
                    raise IntegrityFailure(
                        f"{storage.name}:{key}: {len(data)} bytes, a segment is {self.size}"
                    )
                check_segment_bytes(
                    data[:64], seg, self.system_id, self.size, where=f"{storage.name}:{key}"
                )
            except DrbotError as exc:
                self._bad(storage, name, key, exc)
                continue
            self.result.checked_objects += 1
            self.result.checked_bytes += len(data)
            if self.progress is not None:
                self.progress(storage.name, name, self.result.checked_bytes)
