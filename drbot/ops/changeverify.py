"""Verify a policy's change-stream slices: open each one, and find the gaps in the chains."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bson.timestamp import Timestamp

from drbot.catalog import CatalogScan
from drbot.engines.mongodb import archive
from drbot.engines.mongodb.position import ts_datetime, ts_key, ts_parse
from drbot.errors import DrbotError, StorageUnavailable
from drbot.ops.changestore import SliceRef, chain_from, list_slices, read_slice
from drbot.ops.walstore import KeyCache
from drbot.ops.walverify import WalFinding, WalVerifyResult
from drbot.pipeline.keys import KeyProvider
from drbot.storage.base import Storage


def _when(key: int) -> str:
    return ts_datetime(Timestamp(key >> 32, key & 0xFFFFFFFF)).isoformat()


def verify_changes(
    policy: str,
    storages: Sequence[Storage],
    keys: KeyProvider,
    scan: CatalogScan,
    progress: Callable[[str, str, int], None] | None = None,
) -> WalVerifyResult:
    """Open and check every slice in every destination, then look for breaks in continuity.

    A break is a slice that does not start exactly where the previous one ended (by cluster
    time in the names, by resume token inside) after a chain of slices that continued a
    backup: restores from that backup stop there. Each is a finding naming the slices and the
    backups it cuts short.
    """
    result = WalVerifyResult()
    cache = KeyCache(keys)
    backups = [b for b in scan.backups if b.manifest.positions.get("consistent_time")]
    for storage in storages:
        try:
            refs = list_slices(policy, storage)
        except StorageUnavailable as exc:
            result.unreachable[storage.name] = exc.message
            continue
        ends: dict[int, str] = {}
        for ref in refs:
            try:
                body = read_slice(storage, ref, cache)
            except StorageUnavailable as exc:
                result.unreachable[storage.name] = exc.message
                break
            except DrbotError as exc:
                result.findings.append(WalFinding(storage.name, ref.key, ref.key, exc.message))
                continue
            result.checked_objects += 1
            result.checked_bytes += sum(len(e) for e in body.events)
            if progress is not None:
                progress(storage.name, ref.key, result.checked_bytes)
            start = archive.token_text(body.start_token)
            if ref.start in ends and ends[ref.start] != start:
                result.findings.append(
                    WalFinding(
                        storage.name,
                        ref.key,
                        ref.key,
                        "starts at another resume token than the slice before it ended at",
                    )
                )
            ends[ref.end] = archive.token_text(body.end_token)
        for entry in backups:
            if entry.copy_in(storage.name) is None:
                continue
            consistent = ts_key(ts_parse(str(entry.manifest.positions["consistent_time"])))
            run, gap = chain_from(refs, consistent)
            # No slice continues this backup at all: the streamer had not started yet (it
            # starts at the newest backup), which loses nothing that was ever shipped.
            if gap is not None and run:
                result.findings.append(
                    WalFinding(
                        storage.name,
                        entry.backup_id,
                        _gap_key(refs, gap.before),
                        f"the changes from {_when(gap.after)} to {_when(gap.before)} are "
                        f"missing: restores from backup {entry.backup_id} stop at "
                        f"{_when(gap.after)} although later changes exist",
                    )
                )
    return result


def _gap_key(refs: Sequence[SliceRef], start: int) -> str:
    return next((r.key for r in refs if r.start == start), "")
