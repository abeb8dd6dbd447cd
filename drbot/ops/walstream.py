"""The WAL streamer: continuous archiving through a replication slot drbot owns.

The order that makes it safe: WAL arrives over the replication protocol; a complete segment is
compressed, encrypted, stored in every destination and read back; only then does drbot report
the segment's end as flushed, which lets the slot (and so the server) forget it. The unfinished
segment is shipped as a `.partial` object every `partial_interval`, which bounds the RPO below
a segment. After a crash or restart, streaming resumes at the first segment not complete in
every destination; the slot has kept that WAL. If the slot was lost (dropped, or WAL removed
under `max_slot_wal_keep_size`), the hole is a *gap*: reported loudly, and the caller is told
so it can take a new full backup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from drbot.engines.postgres.engine import PostgresEngine
from drbot.engines.postgres.replication import (
    Keepalive,
    ReplicationConnection,
    TimelineEnd,
    WalData,
)
from drbot.engines.postgres.wal import (
    Segment,
    Switch,
    format_lsn,
    history_file_name,
    parse_history,
    segment_on,
)
from drbot.errors import (
    DatabaseError,
    DrbotError,
    ObjectNotFound,
    SourceUnavailable,
    StorageUnavailable,
)
from drbot.ops.walstore import (
    Heartbeat,
    KeyCache,
    WalShipper,
    list_wal,
    read_wal_object,
    safe_delete,
)
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

_STATUS_EVERY_S = 10.0
_HEARTBEAT_MARGIN = timedelta(seconds=1)
_RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class StreamSettings:
    policy: str
    slot: str
    partial_interval_s: float = 10.0


@dataclass(frozen=True)
class Gap:
    """WAL that is in neither the archive nor the server any more."""

    timeline: int
    first_missing: str
    resumed_at: str

    def describe(self) -> str:
        return (
            f"WAL from segment {self.first_missing} up to {self.resumed_at} is lost "
            "(the replication slot was dropped or the server removed the WAL); point-in-time "
            "restores into that range are impossible until a new full backup"
        )


@dataclass
class StreamState:
    """What the streamer has done, for callers and metrics (updated as it runs)."""

    timeline: int = 0
    received_lsn: int = 0
    archived_lsn: int = 0
    server_lsn: int = 0
    segments_shipped: int = 0
    partials_shipped: int = 0
    connected: bool = False
    archived_at: datetime | None = None
    """When WAL was last stored everywhere, or the archive last confirmed current (heartbeat)."""

    def as_json(self) -> dict[str, object]:
        """The state for a status file (`drbot wal stream --status-file`), LSNs as text."""
        return {
            "timeline": self.timeline,
            "received_lsn": format_lsn(self.received_lsn),
            "archived_lsn": format_lsn(self.archived_lsn),
            "server_lsn": format_lsn(self.server_lsn),
            "lag_bytes": max(0, self.server_lsn - self.archived_lsn),
            "segments_shipped": self.segments_shipped,
            "partials_shipped": self.partials_shipped,
            "connected": self.connected,
            "archived_at": self.archived_at.isoformat() if self.archived_at else None,
        }


class WalStreamer:
    """Streams one policy's WAL until `stop` is set; see the module docstring."""

    def __init__(
        self,
        settings: StreamSettings,
        source: PostgresEngine,
        shipper: WalShipper,
        *,
        on_gap: Callable[[Gap], None] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.shipper = shipper
        self.storages: list[Storage] = shipper.storages
        self.on_gap = on_gap
        self._keys = KeyCache(shipper.keys)
        self.state = StreamState()
        self._segment_size = 0

    # -- the outer loop: reconnect with backoff -----------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Stream until `stop` is set, reconnecting after failures (backoff up to 30 s).

        `DatabaseError` for problems a retry cannot fix (slot of the wrong kind, no
        privilege) propagates; so does `KeyProblem`.
        """
        delay = 1.0
        while not stop.is_set():
            try:
                self.run_session(stop)
                delay = 1.0
            except (SourceUnavailable, StorageUnavailable) as exc:
                self.state.connected = False
                log.warning("wal.stream_interrupted", policy=self.settings.policy, error=str(exc))
                stop.wait(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    # -- one connection -------------------------------------------------------------------

    def run_session(self, stop: threading.Event) -> None:
        """One replication connection: resume, stream, ship, until `stop` or the stream ends."""
        restart_lsn, created = self.source.ensure_slot(self.settings.slot)
        with self.source.replication() as repl:
            system = repl.identify_system()
            self._segment_size = repl.segment_size()
            history = self._ship_histories(repl, system.timeline)
            segment = self._resume_segment(system.timeline, history, restart_lsn, created)
            self.state.timeline = segment.timeline
            self.state.server_lsn = system.flush_lsn
            log.info(
                "wal.stream_started",
                policy=self.settings.policy,
                slot=self.settings.slot,
                timeline=segment.timeline,
                start=format_lsn(segment.start_lsn(self._segment_size)),
            )
            repl.start(self.settings.slot, segment.start_lsn(self._segment_size), segment.timeline)
            self.state.connected = True
            try:
                self._stream(repl, segment, stop)
            finally:
                self.state.connected = False

    def _ship_histories(self, repl: ReplicationConnection, timeline: int) -> list[Switch]:
        """Store every timeline history file up to the server's; its (parent, switch) list."""
        if timeline == 1:
            return []
        name, content = repl.timeline_history(timeline)
        switches = parse_history(content.decode())
        for tli in range(2, timeline + 1):
            key = layout.wal_history_key(self.settings.policy, history_file_name(tli))
            missing = [s.name for s in self.storages if not _exists(s, key)]
            if not missing:
                continue
            try:
                body = content if tli == timeline else repl.timeline_history(tli)[1]
            except DatabaseError as exc:
                # A server promoted from a standby may lack older history files; the current
                # one holds the whole ancestry, which is what restores need.
                log.warning(
                    "wal.history_missing", policy=self.settings.policy, timeline=tli, error=str(exc)
                )
                continue
            self._put_everywhere(key, body, missing)
        log.debug("wal.histories_shipped", policy=self.settings.policy, file=name)
        return switches

    def _resume_segment(
        self,
        server_timeline: int,
        history: list[Switch],
        restart_lsn: int | None,
        created: bool,
    ) -> Segment:
        """The first segment not yet complete in every destination."""
        size = self._segment_size
        common: set[Segment] | None = None
        for storage in self.storages:
            present = set(list_wal(self.settings.policy, storage, size).segments)
            common = present if common is None else common & present
        # Only segments on this server's history count: after a failover, the old timeline's
        # segments past the switch are another history, not WAL this server will send.
        on_path = {
            s for s in common or set() if s == segment_on(s.number, server_timeline, history, size)
        }
        newest = max(on_path, key=lambda s: s.number, default=None)
        slot_start = restart_lsn
        if newest is None:
            if slot_start is None:
                raise DatabaseError(f"replication slot {self.settings.slot} reserves no WAL")
            return segment_on(slot_start // size, server_timeline, history, size)
        wanted = newest.number + 1
        if slot_start is not None and slot_start // size > wanted:
            gap = Gap(
                timeline=newest.timeline,
                first_missing=Segment(newest.timeline, wanted).name(size),
                resumed_at=Segment(newest.timeline, slot_start // size).name(size),
            )
            log.error(
                "wal.gap",
                policy=self.settings.policy,
                slot=self.settings.slot,
                slot_created=created,
                first_missing=gap.first_missing,
                resumed_at=gap.resumed_at,
            )
            if self.on_gap is not None:
                self.on_gap(gap)
            wanted = slot_start // size
        return segment_on(wanted, server_timeline, history, size)

    def _stream(self, repl: ReplicationConnection, segment: Segment, stop: threading.Event) -> None:
        cur = _Current(segment, self._segment_size)
        # A partial stored before (by an earlier connection) may hold more than this one will
        # receive before it, too, breaks: never replace it with a shorter one.
        cur.partial_len = self._stored_partial_len(segment)
        self.state.archived_lsn = cur.start
        try:
            self._loop(repl, cur, stop)
        except BaseException:
            # Ctrl-C, SIGTERM, or the source gone (crashed, unreachable): what was received is
            # committed WAL that may exist nowhere else now; store it before giving up.
            try:
                self._ship_partial(cur)
            except Exception as exc:
                log.error("wal.partial_failed", policy=self.settings.policy, error=str(exc))
            raise

    def _loop(self, repl: ReplicationConnection, cur: _Current, stop: threading.Event) -> None:
        last_partial = last_status = time.monotonic()
        while not stop.is_set():
            for msg in repl.messages(timeout=0.5):
                if isinstance(msg, WalData):
                    self._receive(repl, cur, msg)
                elif isinstance(msg, Keepalive):
                    self._on_keepalive(repl, cur, msg)
                elif isinstance(msg, TimelineEnd):
                    # The server was promoted: what we hold is this timeline's final piece.
                    self._ship_partial(cur)
                    log.warning(
                        "wal.timeline_ended",
                        policy=self.settings.policy,
                        timeline=cur.segment.timeline,
                        next_timeline=msg.next_timeline,
                        at=format_lsn(msg.next_start_lsn),
                    )
                    return
                if time.monotonic() - last_partial >= self.settings.partial_interval_s:
                    break
            now = time.monotonic()
            if now - last_partial >= self.settings.partial_interval_s:
                if len(cur.buf) > cur.partial_len:
                    self._ship_partial(cur, repl)
                else:
                    # Nothing new: ask the server where its WAL ends; its answer (not our own
                    # idea of being caught up, which a stalled connection fakes) decides.
                    cur.ping = datetime.now(UTC)
                    repl.send_status(self.state.received_lsn, self.state.archived_lsn, reply=True)
                last_partial = now
            if now - last_status >= _STATUS_EVERY_S:
                repl.send_status(self.state.received_lsn, self.state.archived_lsn)
                last_status = now
        self._ship_partial(cur)

    def _stored_partial_len(self, segment: Segment) -> int:
        key = layout.wal_segment_key(
            self.settings.policy, segment.name(self._segment_size), partial=True
        )
        longest = 0
        for storage in self.storages:
            try:
                longest = max(longest, len(read_wal_object(storage, key, self._keys)))
            except ObjectNotFound:
                continue
            except DrbotError as exc:
                # Unreadable here: the next partial must then also be longer than the segment
                # start, which any will be; a damaged one is better replaced than kept.
                log.warning("wal.partial_unreadable", destination=storage.name, error=str(exc))
        return longest

    def _on_keepalive(self, repl: ReplicationConnection, cur: _Current, msg: Keepalive) -> None:
        self.state.server_lsn = max(self.state.server_lsn, msg.server_end_lsn)
        if cur.ping is not None and not msg.reply_requested:
            # The server's answer to our ping: if we hold all it has, the archive was current
            # when we asked (less a margin for WAL written but not yet sent).
            if msg.server_end_lsn <= cur.end and cur.partial_len == len(cur.buf):
                self._heartbeat(cur, cur.ping - _HEARTBEAT_MARGIN)
            cur.ping = None
        if msg.reply_requested:
            # Caught up and asked (a shutting-down server waits for this): store what we
            # hold now, so the server need not wait for the interval.
            if msg.server_end_lsn <= cur.end:
                self._ship_partial(cur, repl)
            repl.send_status(self.state.received_lsn, self.state.archived_lsn)

    def _receive(self, repl: ReplicationConnection, cur: _Current, msg: WalData) -> None:
        if msg.start_lsn != cur.end:
            raise SourceUnavailable(
                f"WAL stream jumped from {format_lsn(cur.end)} to {format_lsn(msg.start_lsn)}"
            )
        self.state.server_lsn = max(self.state.server_lsn, msg.server_end_lsn)
        data = memoryview(msg.data)
        while data:
            data = cur.take(data)
            if cur.full:
                self._ship_segment(repl, cur)
                cur.advance()
                self.state.archived_lsn = cur.start
                repl.send_status(cur.start, cur.start)
        self.state.received_lsn = cur.end

    # -- shipping ---------------------------------------------------------------------------

    def _put_everywhere(
        self,
        key: str,
        data: bytes,
        only: Sequence[str] | None = None,
        keepalive: Callable[[], None] | None = None,
    ) -> None:
        """Store until every destination has it, retrying failed ones with backoff."""
        pending: Sequence[str] | None = only
        delay = 1.0
        while True:
            failed = self.shipper.put(key, data, pending)
            if not failed:
                return
            for destination, why in failed.items():
                log.error(
                    "wal.ship_failed",
                    policy=self.settings.policy,
                    destination=destination,
                    key=key,
                    error=why,
                    retry_in_s=delay,
                )
            pending = list(failed)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if keepalive is not None:
                    keepalive()
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
            delay = min(delay * 2, _RETRY_MAX_S)

    def _ship_segment(self, repl: ReplicationConnection, cur: _Current) -> None:
        name = cur.segment.name(self._segment_size)
        key = layout.wal_segment_key(self.settings.policy, name)

        def keepalive() -> None:
            repl.send_status(self.state.received_lsn, self.state.archived_lsn)

        self._put_everywhere(key, bytes(cur.buf), keepalive=keepalive)
        if cur.partial_len:
            partial = layout.wal_segment_key(self.settings.policy, name, partial=True)
            for storage in self.storages:
                safe_delete(storage, partial)
        self.state.segments_shipped += 1
        self.state.archived_at = datetime.now(UTC)
        log.info("wal.segment_archived", policy=self.settings.policy, segment=name)

    def _ship_partial(self, cur: _Current, repl: ReplicationConnection | None = None) -> None:
        """Store the segment so far everywhere; then (with `repl`) report it flushed.

        Reporting a position inside the segment is safe: the server keeps the whole segment
        that holds the slot's position, and a restart resumes at that segment's start.
        """
        if len(cur.buf) <= cur.partial_len:
            return
        name = cur.segment.name(self._segment_size)
        key = layout.wal_segment_key(self.settings.policy, name, partial=True)
        failed = self.shipper.put(key, bytes(cur.buf))
        if not failed:
            cur.partial_len = len(cur.buf)
            self.state.partials_shipped += 1
            self.state.archived_lsn = cur.end
            self.state.archived_at = datetime.now(UTC)
            if repl is not None:
                repl.send_status(self.state.received_lsn, cur.end)
        # The next interval tries again; the complete segment will follow in any case.
        self._warn_failed("wal.partial_failed", failed, segment=name)
        log.debug(
            "wal.partial_archived",
            policy=self.settings.policy,
            segment=name,
            upto=format_lsn(cur.end),
        )

    def _heartbeat(self, cur: _Current, at: datetime) -> None:
        """The server confirmed drbot held (and had archived) all its WAL at `at`: say so, so
        restores may target this moment."""
        beat = Heartbeat(at, cur.segment.timeline, cur.end)
        failed = self.shipper.put(layout.wal_heartbeat_key(self.settings.policy), beat.encode())
        if not failed:
            self.state.archived_at = max(self.state.archived_at or at, at)
        self._warn_failed("wal.heartbeat_failed", failed)

    def _warn_failed(self, event: str, failed: dict[str, str], **fields: str) -> None:
        for destination, why in failed.items():
            log.warning(
                event, policy=self.settings.policy, destination=destination, error=why, **fields
            )


class _Current:
    """The segment being received: its bytes so far, and how much of it is shipped as partial."""

    def __init__(self, segment: Segment, size: int) -> None:
        self.segment = segment
        self.size = size
        self.buf = bytearray()
        self.partial_len = 0
        self.ping: datetime | None = None
        """When drbot last asked the server for its WAL end (unanswered yet)."""

    @property
    def start(self) -> int:
        return self.segment.start_lsn(self.size)

    @property
    def end(self) -> int:
        return self.start + len(self.buf)

    @property
    def full(self) -> bool:
        return len(self.buf) == self.size

    def take(self, data: memoryview) -> memoryview:
        """Append what fits in this segment; returns the rest."""
        room = self.size - len(self.buf)
        self.buf += data[:room]
        return data[room:]

    def advance(self) -> None:
        self.segment = self.segment.next()
        self.buf = bytearray()
        self.partial_len = 0


def _exists(storage: Storage, key: str) -> bool:
    try:
        storage.stat(key)
    except DrbotError:
        return False
    return True
