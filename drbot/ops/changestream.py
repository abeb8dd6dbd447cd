"""The MongoDB change streamer: follow the deployment's change stream and ship slices.

Where it starts: after the newest slice in the destinations, or, before the first slice, at
the end position of the newest full backup. Every `interval` (and whenever the buffer passes
`max_bytes`) the events gathered so far become one slice, stored and read back in every
destination; the next slice starts exactly where that one ended. A slice is cut only between
events of different cluster times, so one transaction never straddles two slices.

Killed mid-slice, the streamer loses only its unshipped buffer, and a restart resumes after
the last stored slice, so the same events are read again: no gap and, since every slice starts
where the previous one ended, no event twice. When the server no longer holds the history to
resume from (ChangeStreamHistoryLost), the streamer reports a gap (`on_gap`), which a new full
backup answers, and resumes from that backup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo.change_stream import ChangeStream
from pymongo.errors import PyMongoError

from drbot.catalog import scan_catalog
from drbot.engines.mongodb import archive
from drbot.engines.mongodb.client import SYSTEM_DATABASES, RawClient, translate, where
from drbot.engines.mongodb.dump import stream_filter
from drbot.engines.mongodb.position import ts_key, ts_parse, ts_text
from drbot.errors import (
    ChangeHistoryLost,
    DrbotError,
    NoRestorePoint,
    ObjectNotFound,
    StorageUnavailable,
)
from drbot.ops.changestore import (
    Heartbeat,
    SliceBody,
    SliceRef,
    encode_slice,
    list_slices,
    read_slice,
)
from drbot.ops.walstore import KeyCache, WalShipper
from drbot.pipeline.keys import KeyProvider
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

HEARTBEAT_MARGIN = timedelta(seconds=1)
BACKFILL_EVERY_S = 30.0
"""How often a destination that missed slices is brought up to date again."""


@dataclass(frozen=True)
class Position:
    """A point in the deployment's change history: a cluster time and a resume token."""

    time: Timestamp
    token: dict[str, Any] | None
    source: str  # "slice KEY" or "backup ID", for messages


@dataclass
class StreamerState:
    slices_shipped: int = 0
    events_shipped: int = 0
    position: str = ""
    connected: bool = False
    archived_at: datetime | None = None
    """When the destinations last held every change the server had: a slice was stored with
    nothing more to read, or the stream was idle with nothing pending."""
    failed_destinations: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        """The state for a status file (`drbot changes stream --status-file`)."""
        return {
            "position": self.position,
            "slices_shipped": self.slices_shipped,
            "events_shipped": self.events_shipped,
            "connected": self.connected,
            "archived_at": self.archived_at.isoformat() if self.archived_at else None,
            "failed_destinations": self.failed_destinations,
        }


def newest_slice(policy: str, storages: Sequence[Storage]) -> tuple[Storage, SliceRef] | None:
    best: tuple[Storage, SliceRef] | None = None
    for storage in storages:
        try:
            refs = list_slices(policy, storage)
        except StorageUnavailable:
            continue
        if refs and (best is None or refs[-1].end > best[1].end):
            best = (storage, refs[-1])
    return best


def backup_position(policy: str, storages: Sequence[Storage], keys: KeyProvider) -> Position | None:
    """The end position of the newest full backup that recorded one."""
    scan = scan_catalog(policy, storages, keys)
    for entry in reversed(scan.backups):
        pos = entry.manifest.positions
        if pos.get("consistent_time") and "end_token" in pos:
            return Position(
                ts_parse(str(pos["consistent_time"])),
                archive.token_parse(str(pos["end_token"])),
                f"backup {entry.backup_id}",
            )
    return None


def read_any_copy(storages: Sequence[Storage], ref: SliceRef, keys: KeyCache) -> SliceBody:
    """The slice `ref` from the first destination whose copy reads back intact."""
    errors: list[DrbotError] = []
    for storage in storages:
        try:
            return read_slice(storage, ref, keys)
        except DrbotError as exc:
            log.warning(
                "changes.slice_unreadable", destination=storage.name, key=ref.key, error=str(exc)
            )
            errors.append(exc)
    raise errors[0] if errors else ObjectNotFound(f"slice {ref.key} is in no destination")


def backfill(
    policy: str, storages: Sequence[Storage], keys: KeyProvider, shipper: WalShipper
) -> dict[str, str]:
    """Copy every slice some destination lacks into it, from a destination that has it.

    A slice that a destination failed to store (down, refused) would otherwise leave a gap
    there for good. The copy is decrypted and encrypted again under the destination's own
    wrapping (a KMS key is regional). Returns the destinations still behind, with why.
    """
    listed: dict[str, set[str]] = {}
    behind: dict[str, str] = {}
    refs: dict[str, SliceRef] = {}
    for storage in storages:
        try:
            found = list_slices(policy, storage)
        except StorageUnavailable as exc:
            behind[storage.name] = exc.message
            continue
        listed[storage.name] = {r.key for r in found}
        refs.update({r.key: r for r in found})
    cache = KeyCache(keys)
    for key in sorted(refs):
        missing = [d for d, keys_there in listed.items() if key not in keys_there]
        if not missing:
            continue
        holders = [s for s in storages if s.name in listed and key in listed[s.name]]
        body = read_any_copy(holders, refs[key], cache)
        data = encode_slice(
            body.start_time, body.start_token, body.end_time, body.end_token, body.events
        )
        failed = shipper.put(key, data, only=missing)
        behind.update(failed)
        for dest in missing:
            if dest not in failed:
                log.info("changes.slice_backfilled", policy=policy, key=key, destination=dest)
    return behind


def resume_candidates(
    policy: str, storages: Sequence[Storage], keys: KeyProvider
) -> list[Position]:
    """Where the streamer may resume, in order of preference: after the newest slice, then
    at the newest backup's end if that is later. `NoRestorePoint` if there is neither."""
    out: list[Position] = []
    found = newest_slice(policy, storages)
    if found is not None:
        _, ref = found
        body = read_any_copy(storages, ref, KeyCache(keys))
        out.append(Position(body.end_time, body.end_token, f"slice {ref.key}"))
    backup = backup_position(policy, storages, keys)
    if backup is not None and (not out or ts_key(backup.time) > ts_key(out[0].time)):
        out.append(backup)
    if not out:
        raise NoRestorePoint(
            f"policy {policy!r} has no full backup with a change-stream position to start from",
            hint=f"take one first: drbot backup --policy {policy}",
        )
    return out


class ChangeStreamer:
    """Follows one deployment's change stream into slices until `stop` is set."""

    def __init__(
        self,
        policy: str,
        client: RawClient,
        uri: str,
        storages: Sequence[Storage],
        keys: KeyProvider,
        shipper: WalShipper,
        *,
        interval_s: float = 10.0,
        max_bytes: int = 64 << 20,
        databases: Sequence[str] | None = None,
        on_gap: Callable[[ChangeHistoryLost], None] | None = None,
    ) -> None:
        self.policy = policy
        self._client = client
        self._uri = uri
        self._storages = list(storages)
        self._keys = keys
        self._shipper = shipper
        self._interval = interval_s
        self._max_bytes = max_bytes
        self._databases = set(databases) if databases else None
        self._on_gap = on_gap
        self.state = StreamerState()
        self._backfill_at: float | None = time.monotonic()  # once at start
        self._beat_at: float | None = None
        self._once = False

    def _covers(self, event: RawBSONDocument) -> bool:
        ns = event.get("ns")
        db = ns.get("db") if ns is not None else None
        if db is None:
            return True
        if self._databases is not None:
            return db in self._databases
        return db not in SYSTEM_DATABASES

    def _open(self) -> tuple[ChangeStream[RawBSONDocument], Position]:
        """The stream, resumed at the best position the server still has history for."""
        lost: ChangeHistoryLost | None = None
        for pos in resume_candidates(self.policy, self._storages, self._keys):
            try:
                stream = self._client.watch(
                    stream_filter(sorted(self._databases) if self._databases else None),
                    show_expanded_events=True,
                    resume_after=pos.token,
                    start_at_operation_time=None if pos.token else pos.time,
                    max_await_time_ms=500,
                )
            except PyMongoError as exc:
                err = translate(exc, f"resume the change stream of {where(self._uri)}")
                if isinstance(err, ChangeHistoryLost):
                    log.error(
                        "changes.history_lost", policy=self.policy, after=pos.source, error=str(err)
                    )
                    lost = err
                    continue
                raise err from None
            log.info("changes.resumed", policy=self.policy, after=pos.source, at=ts_text(pos.time))
            return stream, pos
        assert lost is not None
        raise lost

    def run(self, stop: threading.Event, *, once: bool = False) -> None:
        """Stream until `stop` is set (ships what it holds first), or with `once` until caught
        up (everything the server had is stored; a scheduled incremental). Raises
        `SourceUnavailable`, `DatabaseError`, `StorageUnavailable` (no destination took a
        slice), and `ChangeHistoryLost` when no resume point is left and `on_gap` did not
        provide one."""
        self._once = once
        while not stop.is_set():
            try:
                stream, pos = self._open()
                try:
                    self._follow(stream, pos, stop)
                finally:
                    stream.close()
            except ChangeHistoryLost as exc:
                if self._on_gap is None:
                    raise
                self._on_gap(exc)  # takes a new full backup; the next _open resumes there

    def _follow(
        self, stream: ChangeStream[RawBSONDocument], pos: Position, stop: threading.Event
    ) -> None:
        pending = _Pending(pos.time, pos.token)
        self.state.connected = True
        caught_up = False
        try:
            while not stop.is_set():
                try:
                    event = stream.try_next()
                except PyMongoError as exc:
                    raise translate(
                        exc, f"follow the change stream of {where(self._uri)}"
                    ) from None
                caught_up = event is None
                due = time.monotonic() - pending.opened >= self._interval
                if event is None:
                    # Nothing more to read now: once what is pending is stored, the
                    # destinations hold everything the server has.
                    if pending.events and (due or self._once):
                        self._ship(pending)
                    self._maybe_backfill()
                    if not pending.events and not self.state.failed_destinations:
                        self._maybe_heartbeat(pending.start)
                    if self._once and not pending.events:
                        stop.set()  # caught up: a scheduled incremental is done
                    continue
                if (due or pending.size >= self._max_bytes) and pending.can_cut_before(event):
                    self._ship(pending)
                if self._covers(event):
                    pending.add(event)
        finally:
            self.state.connected = False
            # Stopping (signal, error while reading): what was gathered is still worth keeping.
            # Its last cluster time is complete if the server had nothing more when last
            # asked; otherwise it may not be (a transaction, a batched write), and is left to
            # be read again after a restart.
            if (pending.events and caught_up) or pending.trim_last_cluster_time():
                try:
                    self._ship(pending)
                except Exception as exc:  # the original error matters more
                    log.error("changes.final_slice_failed", policy=self.policy, error=str(exc))

    def _maybe_heartbeat(self, end: Timestamp) -> None:
        """Caught up, nothing pending, every destination current: say so, at most once an
        interval, so restores and the RPO may count this moment even if nothing changes."""
        now = datetime.now(UTC)
        if self._beat_at is not None and time.monotonic() - self._beat_at < self._interval:
            self.state.archived_at = now
            return
        # Less a margin: a write committed while the empty answer was on its way is not in it.
        beat = Heartbeat(now - HEARTBEAT_MARGIN, ts_key(end))
        failed = self._shipper.put(layout.changes_heartbeat_key(self.policy), beat.encode())
        for dest, why in failed.items():
            log.warning("changes.heartbeat_failed", policy=self.policy, destination=dest, error=why)
        self._beat_at = time.monotonic()
        if not failed:
            self.state.archived_at = now

    def _maybe_backfill(self) -> None:
        """Bring destinations that missed slices up to date (at most every BACKFILL_EVERY_S)."""
        if self._backfill_at is None or time.monotonic() < self._backfill_at:
            return
        behind = backfill(self.policy, self._storages, self._keys, self._shipper)
        self.state.failed_destinations = behind
        self._backfill_at = time.monotonic() + BACKFILL_EVERY_S if behind else None

    def _ship(self, pending: _Pending) -> None:
        """Store the pending slice everywhere; the next one starts where it ends."""
        assert pending.last_time is not None
        body = encode_slice(
            pending.start,
            pending.start_token,
            pending.last_time,
            pending.last_token,
            pending.events,
        )
        key = layout.changes_slice_key(
            self.policy, ts_key(pending.start), ts_key(pending.last_time)
        )
        failed = self._shipper.put(key, body)
        if len(failed) == len(self._storages):
            raise StorageUnavailable(
                f"slice {key} could not be stored anywhere: "
                + "; ".join(f"{d}: {why}" for d, why in failed.items())
            )
        if failed:
            # Stored somewhere: the history goes on. The others get it by backfill.
            self.state.failed_destinations = failed
            self._backfill_at = time.monotonic() + BACKFILL_EVERY_S
        for dest, why in failed.items():
            log.warning(
                "changes.destination_failed", policy=self.policy, destination=dest, error=why
            )
        self.state.slices_shipped += 1
        self.state.events_shipped += len(pending.events)
        self.state.position = ts_text(pending.last_time)
        log.info(
            "changes.slice_shipped",
            policy=self.policy,
            key=key,
            events=len(pending.events),
            bytes=len(body),
        )
        pending.restart()


class _Pending:
    """The slice being gathered: where it starts, its raw events, where it ends so far."""

    def __init__(self, start: Timestamp, start_token: Any) -> None:
        self.start, self.start_token = start, start_token
        self.events: list[bytes] = []
        self.size = 0
        self.last_time: Timestamp | None = None
        self.last_token: Any = None
        self.opened = time.monotonic()

    def add(self, event: RawBSONDocument) -> None:
        raw = bytes(event.raw)
        self.events.append(raw)
        self.size += len(raw)
        self.last_time, self.last_token = event["clusterTime"], event["_id"]

    def can_cut_before(self, event: RawBSONDocument) -> bool:
        """Whether a slice may end before `event`: never inside one cluster time."""
        return bool(self.events) and (
            self.last_time is None or ts_key(event["clusterTime"]) != ts_key(self.last_time)
        )

    def restart(self) -> None:
        assert self.last_time is not None
        self.start, self.start_token = self.last_time, self.last_token
        self.events, self.size = [], 0
        self.opened = time.monotonic()

    def trim_last_cluster_time(self) -> bool:
        """Drop the events of the last cluster time (maybe incomplete); whether any are left."""
        kept = _complete_prefix(self.events)
        if not kept:
            return False
        del self.events[kept:]
        last = RawBSONDocument(self.events[-1])
        self.last_time, self.last_token = last["clusterTime"], last["_id"]
        return True


def _complete_prefix(events: list[bytes]) -> int:
    """How many leading events to keep when stopping: all but those of the last cluster time,
    which may have more events not read yet (a transaction, a batched write): they are read
    again after a restart, so a slice never ends inside one cluster time."""
    if not events:
        return 0
    last = RawBSONDocument(events[-1])
    cut = len(events)
    while cut > 0 and ts_key(RawBSONDocument(events[cut - 1])["clusterTime"]) == ts_key(
        last["clusterTime"]
    ):
        cut -= 1
    return cut
