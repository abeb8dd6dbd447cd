"""The catalog: which backups exist, read from the destinations themselves.

A backup exists in a destination when its manifest is there and authenticates under the policy
key. Objects under a backup id without a manifest are an *incomplete* backup (interrupted, or still
being written): never listed, verified, restored or kept by retention, and cleaned up by the next
backup. The catalog holds no state of its own: the destinations are the truth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from drbot.errors import DrbotError, IntegrityFailure, StorageUnavailable
from drbot.manifest import Manifest, authenticate_manifest
from drbot.pipeline.keys import KeyProvider, WrappedKey
from drbot.storage import layout
from drbot.storage.base import ObjectInfo, Storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Copy:
    """One destination's authenticated copy of a backup."""

    destination: str
    manifest: Manifest
    data_key: bytes = field(repr=False)


@dataclass(frozen=True)
class BackupEntry:
    """A backup with every destination that holds a complete, authenticated copy of it."""

    backup_id: str
    copies: tuple[Copy, ...]

    @property
    def manifest(self) -> Manifest:
        return self.copies[0].manifest

    @property
    def destinations(self) -> list[str]:
        return [c.destination for c in self.copies]

    def copy_in(self, destination: str) -> Copy | None:
        return next((c for c in self.copies if c.destination == destination), None)


@dataclass(frozen=True)
class Incomplete:
    """Objects of a backup id that has no manifest in a destination."""

    destination: str
    backup_id: str
    keys: tuple[str, ...]
    size_bytes: int


@dataclass(frozen=True)
class Problem:
    """A manifest that exists but cannot be trusted or read."""

    destination: str
    backup_id: str
    key: str
    error: DrbotError


@dataclass(frozen=True)
class CatalogScan:
    """What the destinations hold for one policy."""

    backups: list[BackupEntry]  # oldest first, by start time
    incomplete: list[Incomplete]
    problems: list[Problem]
    unreachable: dict[str, StorageUnavailable]

    def find(self, backup_id: str) -> BackupEntry | None:
        return next((b for b in self.backups if b.backup_id == backup_id), None)


def group_by_backup(policy: str, objects: Iterable[ObjectInfo]) -> dict[str, list[ObjectInfo]]:
    """`objects` (a listing of the policy's backups prefix) by backup id; others are ignored."""
    groups: dict[str, list[ObjectInfo]] = {}
    for obj in objects:
        parsed = layout.parse_key(policy, obj.key)
        if parsed is not None:
            groups.setdefault(parsed.backup_id, []).append(obj)
    return groups


def _read_all(storage: Storage, key: str) -> bytes:
    return b"".join(storage.open(key))


def scan_catalog(policy: str, storages: Sequence[Storage], keys: KeyProvider) -> CatalogScan:
    """List and authenticate every backup of `policy` in every destination.

    Never raises for a single bad destination or manifest: unreachable destinations, manifests
    that fail authentication (`IntegrityFailure`) or cannot be opened with the policy key
    (`KeyProblem`) are reported in the result so callers can decide what they mean.
    """
    copies: dict[str, list[Copy]] = {}
    incomplete: list[Incomplete] = []
    problems: list[Problem] = []
    unreachable: dict[str, StorageUnavailable] = {}
    for storage in storages:
        try:
            objects = list(storage.list(layout.backups_prefix(policy)))
        except StorageUnavailable as exc:
            unreachable[storage.name] = exc
            log.warning("catalog.destination_unreachable", destination=storage.name, error=str(exc))
            continue
        region = storage.region

        def unwrap(w: WrappedKey, region: str | None = region) -> bytes:
            return keys.unwrap(w, region)

        for backup_id, objs in sorted(group_by_backup(policy, objects).items()):
            mkey = layout.manifest_key(policy, backup_id)
            if not any(o.key == mkey for o in objs):
                incomplete.append(
                    Incomplete(
                        storage.name,
                        backup_id,
                        tuple(o.key for o in objs),
                        sum(o.size_bytes for o in objs),
                    )
                )
                continue
            where = f"{storage.name}:{mkey}"
            try:
                manifest, data_key = authenticate_manifest(
                    _read_all(storage, mkey), unwrap, where=where
                )
            except StorageUnavailable as exc:
                unreachable[storage.name] = exc
                break
            except DrbotError as exc:  # KeyProblem or IntegrityFailure: the caller decides
                problems.append(Problem(storage.name, backup_id, mkey, exc))
                continue
            if manifest.backup_id != backup_id or manifest.policy != policy:
                problems.append(
                    Problem(
                        storage.name,
                        backup_id,
                        mkey,
                        IntegrityFailure(f"{where}: manifest names another backup"),
                    )
                )
                continue
            sizes = {o.key: o.size_bytes for o in objs}
            gone = [a for a in manifest.artifacts if sizes.get(a.key) != a.size_bytes]
            if gone:
                # Deleted or replaced behind drbot's back (lifecycle rule, manual delete): this
                # copy cannot restore, so it must not be listed or chosen as one that can.
                a = gone[0]
                found = "missing" if a.key not in sizes else f"{sizes[a.key]} bytes"
                problems.append(
                    Problem(
                        storage.name,
                        backup_id,
                        a.key,
                        IntegrityFailure(
                            f"{storage.name}:{a.key}: {found}, the manifest records "
                            f"{a.size_bytes} bytes ({len(gone)} artifact(s) affected)"
                        ),
                    )
                )
                continue
            copies.setdefault(backup_id, []).append(Copy(storage.name, manifest, data_key))
    # Oldest first by start time: ids sort by it only to the second, and two backups started
    # in the same second would otherwise be ordered by their random suffixes (so "the newest"
    # that restore picks could be the older one, and differ from retention's).
    backups = sorted(
        (BackupEntry(bid, tuple(cs)) for bid, cs in copies.items()),
        key=lambda b: (b.manifest.started_at, b.backup_id),
    )
    return CatalogScan(backups, incomplete, problems, unreachable)
