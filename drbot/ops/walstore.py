"""WAL objects in the destinations: ship one (to every destination, verified), read one back,
and take stock of what a policy's WAL archive holds.

Every WAL object is a complete encrypted stream (docs/design.md) whose header carries its own
wrapped data key, so each object opens on its own. The object's key names the segment; after
decryption the segment's first page header is checked against that name and the cluster's
system identifier (`wal.check_segment_bytes`), so a segment renamed or copied from elsewhere is
an integrity failure, not silently replayed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from drbot.engines.postgres.wal import (
    DEFAULT_SEGMENT_SIZE,
    Segment,
    Switch,
    format_lsn,
    history_file_name,
    parse_history,
    parse_history_file_name,
    parse_lsn,
    parse_segment_name,
)
from drbot.errors import DrbotError, IntegrityFailure, KeyProblem, StorageUnavailable
from drbot.ops.fanout import DestinationWriter, new_data_key, read_back, send_stream
from drbot.ops.rewrap import read_entry
from drbot.pipeline.compress import compress_chunks, decompress_chunks
from drbot.pipeline.keys import KeyProvider, WrappedKey
from drbot.pipeline.stream import DEFAULT_FRAME_SIZE, StreamEncryptor, decrypt_chunks
from drbot.storage import layout
from drbot.storage.base import ObjectInfo, Storage

log = structlog.get_logger(__name__)


class WalShipper:
    """Ships WAL objects of one policy. One data key per shipper (one wrap per region)."""

    def __init__(
        self,
        policy: str,
        storages: Sequence[Storage],
        keys: KeyProvider,
        *,
        compression_level: int = 3,
        compression_threads: int = 0,
    ) -> None:
        self.policy = policy
        self.storages = list(storages)
        self.keys = keys
        self._level = compression_level
        self._threads = compression_threads
        self._key: tuple[bytes, dict[str, WrappedKey]] | None = None

    def put(self, key: str, data: bytes, only: Sequence[str] | None = None) -> dict[str, str]:
        """Store `data` under `key` in every destination (or those named in `only`), then read
        each copy back. Returns the destinations that failed, with why (empty: all stored).

        `KeyProblem` from the key provider propagates; storage failures are returned.
        """
        if self._key is None:
            self._key = new_data_key(self.keys, self.storages)
        data_key, wrapped = self._key
        targets = [s for s in self.storages if only is None or s.name in only]
        enc = StreamEncryptor(data_key, frame_size=DEFAULT_FRAME_SIZE)
        writers = [DestinationWriter(s, key, enc.header(wrapped[s.name])) for s in targets]
        compressed = compress_chunks([data], level=self._level, threads=self._threads)
        with contextlib.suppress(StorageUnavailable):  # every one failed: each says why below
            send_stream(writers, enc, compressed)
        failed: dict[str, str] = {}
        for w in writers:
            sent = w.finish()
            problem = w.describe_error() if sent is None else read_back(w.storage, sent)
            if problem:
                failed[w.storage.name] = problem
        return failed


class KeyCache:
    """Unwraps data keys once per (region, wrapped key): WAL objects share a streamer's key.

    A wrapped key the policy's keys cannot open is looked up among the destination's
    re-wrapped entries (`drbot keys rotate`, drbot/ops/rewrap.py) before giving up.
    """

    def __init__(self, keys: KeyProvider) -> None:
        self._keys = keys
        self._cache: dict[tuple[str | None, WrappedKey], bytes] = {}

    def unwrap(self, wrapped: WrappedKey, region: str | None) -> bytes:
        found = self._cache.get((region, wrapped))
        if found is None:
            found = self._keys.unwrap(wrapped, region)
            self._cache[(region, wrapped)] = found
        return found

    def unwrap_in(self, wrapped: WrappedKey, storage: Storage) -> bytes:
        """As `unwrap`, falling back on `storage`'s re-wrapped entry for `wrapped`."""
        try:
            return self.unwrap(wrapped, storage.region)
        except KeyProblem as exc:
            rewrapped = read_entry(storage, wrapped)
            if rewrapped is None:
                raise
            try:
                found = self.unwrap(rewrapped, storage.region)
            except KeyProblem:
                raise exc from None
            self._cache[(storage.region, wrapped)] = found
            return found


def read_wal_object(storage: Storage, key: str, keys: KeyCache) -> bytes:
    """The plaintext of one WAL object (at most a segment), authenticated and decompressed.

    `ObjectNotFound` if absent, `StorageUnavailable` if unreachable, `KeyProblem` if the policy
    key does not open it, `IntegrityFailure` (naming destination and key) if it is damaged.
    """
    where = f"{storage.name}:{key}"
    try:
        return b"".join(
            decompress_chunks(
                decrypt_chunks(storage.open(key), lambda w: keys.unwrap_in(w, storage))
            )
        )
    except IntegrityFailure as exc:
        raise IntegrityFailure(f"{where}: {exc.message}", hint=exc.hint) from exc


@dataclass
class WalInventory:
    """What one destination's WAL archive holds (from a listing; nothing is opened)."""

    destination: str
    segments: dict[Segment, ObjectInfo] = field(default_factory=dict)
    partials: dict[Segment, ObjectInfo] = field(default_factory=dict)
    histories: dict[int, ObjectInfo] = field(default_factory=dict)
    heartbeat: ObjectInfo | None = None


def list_wal(
    policy: str, storage: Storage, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> WalInventory:
    """List a destination's WAL archive; `StorageUnavailable` if it cannot be listed."""
    inv = WalInventory(storage.name)
    for obj in storage.list(layout.wal_prefix(policy)):
        parsed = layout.parse_wal_key(policy, obj.key)
        if parsed is None:
            continue
        if parsed.kind == "heartbeat":
            inv.heartbeat = obj
            continue
        if parsed.kind == "history":
            tli = parse_history_file_name(parsed.name)
            if tli is not None:
                inv.histories[tli] = obj
            continue
        seg = parse_segment_name(parsed.name, segment_size)
        if seg is None:
            continue
        (inv.partials if parsed.kind == "partial" else inv.segments)[seg] = obj
    return inv


@dataclass(frozen=True)
class Heartbeat:
    """At `time`, every WAL byte up to `lsn` on `timeline` was archived and the streamer had
    received all the server had written: the archive was current then."""

    time: datetime
    timeline: int
    lsn: int

    def encode(self) -> bytes:
        return json.dumps(
            {"time": self.time.isoformat(), "timeline": self.timeline, "lsn": format_lsn(self.lsn)}
        ).encode()


def read_heartbeat(policy: str, storage: Storage, keys: KeyCache) -> Heartbeat | None:
    """The destination's heartbeat, authenticated; None if absent or unreadable (logged)."""
    try:
        doc = json.loads(read_wal_object(storage, layout.wal_heartbeat_key(policy), keys))
        return Heartbeat(
            datetime.fromisoformat(doc["time"]), int(doc["timeline"]), parse_lsn(doc["lsn"])
        )
    except (DrbotError, ValueError, KeyError, TypeError) as exc:
        log.warning("wal.heartbeat_unreadable", destination=storage.name, error=str(exc))
        return None


@dataclass(frozen=True)
class WalScan:
    """The WAL archive across destinations."""

    inventories: dict[str, WalInventory]
    unreachable: dict[str, StorageUnavailable]
    heartbeats: tuple[Heartbeat, ...] = ()


def scan_wal(
    policy: str, storages: Sequence[Storage], segment_size: int = DEFAULT_SEGMENT_SIZE
) -> WalScan:
    inventories: dict[str, WalInventory] = {}
    unreachable: dict[str, StorageUnavailable] = {}
    for storage in storages:
        try:
            inventories[storage.name] = list_wal(policy, storage, segment_size)
        except StorageUnavailable as exc:
            unreachable[storage.name] = exc
    return WalScan(inventories, unreachable)


def read_history(policy: str, storage: Storage, timeline: int, keys: KeyCache) -> list[Switch]:
    """The switches in `timeline`'s history file in `storage` (its ancestry)."""
    raw = read_wal_object(
        storage, layout.wal_history_key(policy, history_file_name(timeline)), keys
    )
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise IntegrityFailure(
            f"{storage.name}: history of timeline {timeline} is not text"
        ) from None
    return parse_history(text)


def safe_delete(storage: Storage, key: str) -> None:
    """Delete, logging instead of raising: used for superseded partial segments."""
    try:
        storage.delete(key)
    except DrbotError as exc:
        log.warning("wal.delete_failed", destination=storage.name, key=key, error=str(exc))


def with_heartbeats(
    wal: WalScan, policy: str, storages: Sequence[Storage], keys: KeyCache
) -> WalScan:
    """`wal` with the heartbeats of the destinations that have one (read and authenticated)."""
    beats = []
    for storage in storages:
        inv = wal.inventories.get(storage.name)
        if inv is not None and inv.heartbeat is not None:
            beat = read_heartbeat(policy, storage, keys)
            if beat is not None:
                beats.append(beat)
    return dataclasses.replace(wal, heartbeats=tuple(beats))
