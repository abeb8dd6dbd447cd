"""Remove what interrupted backups left behind: unfinished uploads and manifest-less backups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from drbot.catalog import group_by_backup
from drbot.errors import DrbotError
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CleanupResult:
    """What one destination's cleanup removed, and what it could not."""

    destination: str
    aborted_uploads: int
    removed_backups: tuple[str, ...]
    failed: tuple[str, ...]


def cleanup_incomplete(
    policy: str, storages: Sequence[Storage], *, keep: frozenset[str] = frozenset()
) -> list[CleanupResult]:
    """Delete every backup of `policy` that has objects but no manifest, except ids in `keep`.

    Callers must hold the policy's lock, so no backup of this policy is being written. Failures
    (an unreachable destination, an object still under object lock) are logged and reported,
    never raised: cleanup must not stand in the way of the next backup.
    """
    results: list[CleanupResult] = []
    for storage in storages:
        removed: list[str] = []
        failed: list[str] = []
        aborted = 0
        try:
            aborted = storage.abort_incomplete(layout.backups_prefix(policy))
            listing = storage.list(layout.backups_prefix(policy))
            by_id = group_by_backup(policy, listing)
            for backup_id, objs in sorted(by_id.items()):
                keys = [o.key for o in objs]
                if backup_id in keep or layout.manifest_key(policy, backup_id) in keys:
                    continue
                try:
                    for key in keys:
                        storage.delete(key)
                    removed.append(backup_id)
                except DrbotError as exc:
                    failed.append(backup_id)
                    log.warning(
                        "cleanup.delete_failed",
                        policy=policy,
                        destination=storage.name,
                        backup_id=backup_id,
                        error=str(exc),
                    )
        except DrbotError as exc:
            log.warning("cleanup.failed", policy=policy, destination=storage.name, error=str(exc))
            failed.append("*")
        if aborted or removed:
            log.info(
                "cleanup.completed",
                policy=policy,
                destination=storage.name,
                aborted_uploads=aborted,
                removed_backups=len(removed),
            )
        results.append(CleanupResult(storage.name, aborted, tuple(removed), tuple(failed)))
    return results
