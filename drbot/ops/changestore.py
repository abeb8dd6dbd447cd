"""Change-stream slices in the destinations: ship one, list them, read one back, and find
the unbroken chains they form (docs/mongodb.md, "Slices").

Each slice is a complete encrypted stream, like a WAL object, whose header carries its own
wrapped data key. Inside it is a `mongo_changes` artifact: a header naming the resume token and
cluster time it starts after, the raw events, and a trailer naming the token and time it ends
at. A slice starts exactly where the previous one ended; where one does not, there is a gap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from bson.timestamp import Timestamp

from drbot.engines.mongodb import archive
from drbot.engines.mongodb.position import ts_key
from drbot.errors import DrbotError, IntegrityFailure, ObjectNotFound, StorageUnavailable
from drbot.ops.walstore import KeyCache, read_wal_object
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True, order=True)
class SliceRef:
    """One slice as its key names it (nothing opened): cluster-time keys of start and end."""

    start: int
    end: int
    key: str = field(compare=False)


@dataclass(frozen=True)
class Gap:
    """Between `after` (end of one slice, or a backup's position) and `before` (start of the
    next slice) no slice holds the events."""

    after: int
    before: int


def list_slices(policy: str, storage: Storage) -> list[SliceRef]:
    """Slices in one destination, oldest first; `StorageUnavailable` if it cannot be listed."""
    out = []
    for obj in storage.list(layout.changes_prefix(policy)):
        parsed = layout.parse_changes_slice_key(policy, obj.key)
        if parsed is not None:
            out.append(SliceRef(parsed[0], parsed[1], obj.key))
    return sorted(out)


def chain_from(slices: Sequence[SliceRef], start: int) -> tuple[list[SliceRef], Gap | None]:
    """The slices that carry the history on from position `start` as far as it goes, and the
    gap that ends it.

    Each next slice is one that covers the position reached so far (starts at or before it and
    ends after it), the one reaching furthest; normally it starts exactly there, but after a
    restart from another destination's copy slices may overlap, and a restore then skips the
    events it already has (`events_after`). The gap is None when the run ends only because there
    are no newer slices. Pure.
    """
    ordered = sorted(slices)
    run: list[SliceRef] = []
    pos = start
    i = 0
    while True:
        best: SliceRef | None = None
        while i < len(ordered) and ordered[i].start <= pos:
            s = ordered[i]
            if s.end > pos and (
                best is None or s.end > best.end or (s.end == best.end and s.start == pos)
            ):
                best = s
            i += 1
        if best is None:
            return run, (Gap(pos, ordered[i].start) if i < len(ordered) else None)
        run.append(best)
        pos = best.end


@dataclass(frozen=True)
class Heartbeat:
    """At `time`, the stored slices ending at position `end` held every change the server
    had: restores may reach `time` from there even if nothing changed since."""

    time: datetime
    end: int

    def encode(self) -> bytes:
        return json.dumps({"time": self.time.isoformat(), "end": f"{self.end:016x}"}).encode()


def read_heartbeat(policy: str, storages: Sequence[Storage], keys: KeyCache) -> Heartbeat | None:
    """The newest heartbeat among the destinations (authenticated); None if there is none."""
    best: Heartbeat | None = None
    for storage in storages:
        try:
            doc = json.loads(read_wal_object(storage, layout.changes_heartbeat_key(policy), keys))
            beat = Heartbeat(datetime.fromisoformat(doc["time"]), int(doc["end"], 16))
        except ObjectNotFound:
            continue
        except (DrbotError, ValueError, KeyError, TypeError) as exc:
            log.warning("changes.heartbeat_unreadable", destination=storage.name, error=str(exc))
            continue
        if best is None or beat.time > best.time:
            best = beat
    return best


@dataclass(frozen=True)
class SliceBody:
    """A slice's records, decoded: header and trailer documents and raw events."""

    start_time: Timestamp
    start_token: dict[str, Any] | None
    end_time: Timestamp
    end_token: dict[str, Any] | None
    events: list[bytes]


def encode_slice(
    start_time: Timestamp,
    start_token: Any,
    end_time: Timestamp,
    end_token: Any,
    events: Sequence[bytes],
) -> bytes:
    parts = [
        archive.record(
            archive.HEADER,
            {
                "format": archive.CHANGES_FORMAT,
                "version": archive.VERSION,
                "start_time": start_time,
                "start_token": start_token,
            },
        )
    ]
    parts.extend(archive.EVENT + e for e in events)
    parts.append(
        archive.record(
            archive.TRAILER, {"count": len(events), "end_time": end_time, "end_token": end_token}
        )
    )
    return b"".join(parts)


def decode_changes(chunks: Any, where: str) -> SliceBody:
    """A `mongo_changes` artifact's records (a slice, or a full backup's own events)."""
    header: dict[str, Any] | None = None
    trailer: dict[str, Any] | None = None
    events: list[bytes] = []
    for tag, raw in archive.read_records(chunks, artifact=where):
        if tag == archive.HEADER:
            header = archive.decode(raw)
        elif tag == archive.EVENT:
            events.append(raw)
        elif tag == archive.TRAILER:
            trailer = archive.decode(raw)
    if header is None or trailer is None or header.get("format") != archive.CHANGES_FORMAT:
        raise IntegrityFailure(f"{where}: not a drbot change-event artifact")
    if int(trailer.get("count", -1)) != len(events):
        raise IntegrityFailure(
            f"{where}: {len(events)} events, its trailer says {trailer.get('count')}"
        )
    return SliceBody(
        start_time=header["start_time"],
        start_token=header.get("start_token"),
        end_time=trailer["end_time"],
        end_token=trailer.get("end_token"),
        events=events,
    )


def iter_changes(chunks: Any, where: str) -> Iterator[bytes]:
    """The raw events of a `mongo_changes` artifact, streamed (a full backup's can be large).

    The header is checked first, the count against the trailer at the end: a mismatch raises
    `IntegrityFailure` after the last event, so a consumer must treat what it did with them as
    unfinished until the iteration ends.
    """
    count = 0
    header_seen = False
    for tag, raw in archive.read_records(chunks, artifact=where):
        if tag == archive.HEADER:
            if archive.decode(raw).get("format") != archive.CHANGES_FORMAT:
                raise IntegrityFailure(f"{where}: not a drbot change-event artifact")
            header_seen = True
        elif not header_seen:
            raise IntegrityFailure(f"{where}: no header record")
        elif tag == archive.EVENT:
            count += 1
            yield raw
        elif tag == archive.TRAILER and int(archive.decode(raw).get("count", -1)) != count:
            raise IntegrityFailure(f"{where}: {count} events, its trailer says otherwise")


def read_slice(storage: Storage, ref: SliceRef, keys: KeyCache) -> SliceBody:
    """A slice, authenticated and checked against its key's times.

    `ObjectNotFound`, `StorageUnavailable`, `KeyProblem`, or `IntegrityFailure` naming the
    destination and key when it is damaged or its contents disagree with its name.
    """
    where = f"{storage.name}:{ref.key}"
    body = decode_changes([read_wal_object(storage, ref.key, keys)], where)
    if ts_key(body.start_time) != ref.start or ts_key(body.end_time) != ref.end:
        raise IntegrityFailure(f"{where}: its contents do not match its name (renamed?)")
    return body


def slices_in(policy: str, storages: Sequence[Storage]) -> Iterator[tuple[Storage, list[SliceRef]]]:
    """(destination, its slices) for every destination that can be listed."""
    for storage in storages:
        try:
            yield storage, list_slices(policy, storage)
        except StorageUnavailable:
            continue
