"""Full backups of a MongoDB deployment: one artifact per database, plus the change events
that happened while they were read.

A logical dump reads each collection at a different moment. As `mongodump --oplog` does with
the oplog, drbot opens a change stream *before* the first read and keeps every event until
after the last one; a restore loads the documents and then replays those events, which are
idempotent writes (drbot/engines/mongodb/replay.py), so the result is the state at one moment:
the backup's consistent time. Events are spooled to a temporary file by a thread while the
dump runs, so a long dump neither holds them in memory nor lets the history roll past them.
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import structlog
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo.change_stream import ChangeStream
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern

from drbot.engines.base import Fingerprint, TableFingerprint
from drbot.engines.mongodb import archive
from drbot.engines.mongodb.client import (
    PLAIN,
    SYSTEM_DATABASES,
    RawClient,
    Topology,
    translate,
    translated,
    where,
)
from drbot.engines.mongodb.fingerprint import CollectionSummer
from drbot.engines.mongodb.position import ts_datetime, ts_key, ts_text
from drbot.engines.mongodb.replay import wall_ms
from drbot.errors import DatabaseError

log = structlog.get_logger(__name__)

DUMP_KIND = "mongo_dump"
CHANGES_KIND = "mongo_changes"
_SPOOL_IN_MEMORY = 16 << 20
PARALLEL = 2
"""Collections read at once (each on its own connection) in one database's dump."""
_QUEUE_CHUNKS = 8
_CHUNK = 1 << 20


def operation_time(client: RawClient) -> Timestamp | None:
    """The deployment's current operation time (None where the server does not report one)."""
    reply = client.admin.command("ping", codec_options=PLAIN)
    ts = reply.get("operationTime")
    return ts if isinstance(ts, Timestamp) else None


def majority_time(client: RawClient, db: str) -> Timestamp | None:
    """The deployment's majority commit point: the operation time of a majority read.

    Change streams return only majority-committed events, so every event up to this time can
    be read from the stream; the last applied write (a ping's operation time) may be later.
    """
    reply = client[db].command(
        "find",
        "drbot.majority.probe",  # never created: a find on a missing collection is empty
        filter={},
        limit=1,
        readConcern={"level": "majority"},
        codec_options=PLAIN,
    )
    ts = reply.get("operationTime")
    return ts if isinstance(ts, Timestamp) else operation_time(client)


def stream_filter(databases: Sequence[str] | None) -> list[dict[str, Any]]:
    """A change stream pipeline keeping only events of `databases` (None: every database but
    admin, local and config) and events of no namespace (invalidate), so the server sends
    nothing else."""
    dbs = {"$in": list(databases)} if databases is not None else {"$nin": list(SYSTEM_DATABASES)}
    return [{"$match": {"$or": [{"ns.db": dbs}, {"ns": {"$exists": False}}]}}]


def split_batch(batch: bytes) -> Iterator[memoryview]:
    """The documents of a raw batch (concatenated BSON documents)."""
    view = memoryview(batch)
    pos = 0
    end = len(batch)
    while pos < end:
        size = int.from_bytes(view[pos : pos + 4], "little")
        if size < 5 or pos + size > end:
            raise DatabaseError(f"server sent a malformed document batch (length {size})")
        yield view[pos : pos + size]
        pos += size


def user_collections(client: RawClient, db: str) -> list[dict[str, Any]]:
    """listCollections of `db`, without system collections, sorted by name."""
    infos = [dict(i) for i in client[db].with_options(codec_options=PLAIN).list_collections()]
    return sorted(
        (i for i in infos if not str(i["name"]).startswith("system.")),
        key=lambda i: str(i["name"]),
    )


class DatabaseDump:
    """One database as a `mongo_dump` artifact (records H, then C D* E per collection, then Z)."""

    kind = DUMP_KIND

    def __init__(self, client: RawClient, uri: str, database: str, topology: Topology) -> None:
        self.name = f"db/{database}.mongo"
        self.database: str | None = database
        self._client = client
        self._uri = uri
        self._topology = topology
        self._tables: dict[str, TableFingerprint] = {}
        self._cancelled = threading.Event()

    def chunks(self) -> Iterator[bytes]:
        db = self.database or ""
        what = f"dump {db} on {where(self._uri)}"
        with translated(what):
            yield archive.record(
                archive.HEADER,
                {"format": archive.DUMP_FORMAT, "version": archive.VERSION, "database": db},
            )
            infos = user_collections(self._client, db)
            yield from self._in_parallel(db, infos)
            yield archive.record(archive.TRAILER, {"database": db, "collections": len(infos)})

    def _in_parallel(self, db: str, infos: list[dict[str, Any]]) -> Iterator[bytes]:
        """Every collection's records, in order, read `PARALLEL` collections at a time.

        Each reader fills a queue of at most `_QUEUE_CHUNKS` chunks of about 1 MiB, so memory
        stays bounded whatever the collections' sizes; the artifact still holds one collection
        after the other.
        """
        pending = list(infos)
        running: list[tuple[queue.Queue[bytes | BaseException | None], threading.Thread]] = []

        def start_next() -> None:
            if not pending:
                return
            info = pending.pop(0)
            q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_QUEUE_CHUNKS)
            t = threading.Thread(
                target=self._read_into, args=(db, info, q), name="drbot-mongo-dump", daemon=True
            )
            t.start()
            running.append((q, t))

        try:
            for _ in range(PARALLEL):
                start_next()
            while running:
                q, _t = running[0]
                while (item := q.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                running.pop(0)
                start_next()
        finally:
            self._cancelled.set()  # readers still running stop at their next batch
            for q, t in running:
                while t.is_alive():
                    with contextlib.suppress(queue.Empty):
                        q.get(timeout=0.1)  # unblock a reader waiting for room
            self._cancelled.clear()

    def _read_into(
        self, db: str, info: dict[str, Any], q: queue.Queue[bytes | BaseException | None]
    ) -> None:
        try:
            for chunk in self._collection(db, info):
                q.put(chunk)
                if self._cancelled.is_set():
                    return
            q.put(None)
        except BaseException as exc:  # raised again by the consumer, in its thread
            q.put(exc)

    def _collection(self, db: str, info: dict[str, Any]) -> Iterator[bytes]:
        name = str(info["name"])
        kind = str(info.get("type", "collection"))
        coll = self._client[db][name]
        if self._topology.has_change_streams:
            # Only majority-committed data: all of it is in the change stream, so nothing the
            # dump reads can be a write the backup's events then miss.
            coll = coll.with_options(read_concern=ReadConcern("majority"))
        indexes = (
            [] if kind == "view" else list(coll.with_options(codec_options=PLAIN).list_indexes())
        )
        yield archive.record(
            archive.COLLECTION,
            {
                "db": db,
                "name": name,
                "type": kind,
                "options": info.get("options", {}),
                "indexes": indexes,
            },
        )
        summer = CollectionSummer()
        if kind != "view":
            out = bytearray()
            for batch in coll.find_raw_batches():
                if self._cancelled.is_set():
                    raise DatabaseError(f"dump of {db}.{name} cancelled")
                # pymongo types raw batches as documents; they are bytes of concatenated BSON
                for doc in split_batch(cast(bytes, batch)):
                    raw = bytes(doc)
                    summer.add(raw)
                    out += archive.DOCUMENT
                    out += raw
                if len(out) >= _CHUNK:
                    yield bytes(out)
                    out.clear()
            if out:
                yield bytes(out)
            self._tables[f"{db}.{name}"] = summer.result()
        yield archive.record(
            archive.END,
            {"db": db, "name": name, "count": summer.count, "checksum": summer.checksum},
        )

    def fingerprint(self) -> Fingerprint | None:
        return Fingerprint(tables=dict(self._tables))

    def positions(self) -> dict[str, str | int] | None:
        return {"topology": self._topology.kind, "server_version": self._topology.server_version}

    def cancel(self) -> None:
        self._cancelled.set()


class ChangeWatcher(threading.Thread):
    """Follows the deployment's change stream from before a dump until after it.

    Opening happens in the constructor, so the start point is fixed before any collection is
    read and a server without change streams fails the backup at once. Errors met by the thread
    are raised again by `finish`.
    """

    def __init__(
        self, client: RawClient, uri: str, databases: Sequence[str], *, only_these: bool
    ) -> None:
        super().__init__(name="drbot-mongo-watch", daemon=True)
        self._client = client
        self._uri = uri
        self._databases = list(databases)
        with translated(f"open the change stream of {where(uri)}"):
            self.start_time = operation_time(client)
            self._stream: ChangeStream[RawBSONDocument] = client.watch(
                stream_filter(databases if only_these else None),
                show_expanded_events=True,
                max_await_time_ms=200,
            )
            self.start_token = self._stream.resume_token
        self.renames: list[str] = []
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
        self._until: Timestamp | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.count = 0
        self.last_time: Timestamp | None = None
        self.last_wall: Any = None
        self.end_token: Any = None

    def run(self) -> None:
        try:
            idle_after_until = 0
            while not self._stop.is_set():
                armed = self._until is not None
                event = self._stream.try_next()
                if event is None:
                    # An empty answer begun after `until` was set means the stream has read
                    # everything majority-committed then, which includes all up to `until`.
                    if armed:
                        idle_after_until += 1
                        if idle_after_until >= 2:
                            break
                    continue
                ts: Timestamp = event["clusterTime"]
                if self._until is not None and ts_key(ts) > ts_key(self._until):
                    # After the consistent point: left out, and read again by the streamer,
                    # which resumes after end_token. The events of one transaction share one
                    # cluster time, so a backup holds all of one or none of it.
                    break
                self._spool.write(archive.record(archive.EVENT, bytes(event.raw)))
                if event.get("operationType") == "rename":
                    ns = event["ns"]
                    self.renames.append(f"{ns.get('db')}.{ns.get('coll')}")
                self.count += 1
                self.last_time = ts
                self.last_wall = event.get("wallTime")
                self.end_token = event["_id"]
            if self.end_token is None:
                self.end_token = self.start_token
        except BaseException as exc:  # raised again in the caller's thread by finish()
            self._error = exc
        finally:
            self._stream.close()
            self._done.set()

    def finish(self) -> tuple[Timestamp, Any]:
        """Read on until the stream has passed the majority commit point, then stop.

        Returns (consistent time, resume token after the last event kept). Raises
        `DatabaseError` if a collection was renamed while the dump ran.
        """
        with translated(f"read the change stream of {where(self._uri)}"):
            until = majority_time(self._client, self._databases[0] if self._databases else "admin")
        self._until = until or self.last_time or self.start_time
        self._done.wait()
        if self._error is not None:
            if isinstance(self._error, PyMongoError):
                raise translate(self._error, f"follow the change stream of {where(self._uri)}")
            raise self._error
        if self.renames:
            # A rename moves data the dump may have read under either name, or under neither;
            # no replay can tell which (mongodump --oplog refuses this as well).
            raise DatabaseError(
                f"{', '.join(sorted(set(self.renames)))} was renamed while the dump ran, so "
                "this backup cannot be made consistent; it was discarded",
                hint="run the backup again (the daemon does at the next schedule); avoid "
                "renameCollection and $out into backed-up databases during backups",
            )
        candidates = [t for t in (self._until, self.last_time, self.start_time) if t is not None]
        if not candidates:
            raise DatabaseError(f"{where(self._uri)} reports no cluster time")
        return max(candidates, key=ts_key), self.end_token

    def abort(self) -> None:
        self._stop.set()

    def spooled(self) -> Iterator[bytes]:
        self._spool.seek(0)
        while chunk := self._spool.read(_CHUNK):
            yield chunk
        self._spool.close()


def data_since(start: Timestamp, last_wall: Any) -> datetime:
    """From when (wall clock, to the millisecond) a backup's data stays what it restores to.

    Nothing changed between its last event and its consistent time; without events in the dump
    window, nothing changed since the stream opened (rounded up to the next second: cluster
    times count whole seconds).
    """
    ms = wall_ms(last_wall)
    if ms is not None:
        wall = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
        return max(wall, ts_datetime(start))
    return ts_datetime(start) + timedelta(seconds=1)


class ChangesDump:
    """The change events seen during the dump, as a `mongo_changes` artifact."""

    kind = CHANGES_KIND
    name = "changes.mongo"
    database: str | None = None

    def __init__(self, watcher: ChangeWatcher) -> None:
        self._watcher = watcher
        self._positions: dict[str, str | int] | None = None

    def chunks(self) -> Iterator[bytes]:
        w = self._watcher
        consistent, end_token = w.finish()
        start = w.start_time or consistent
        yield archive.record(
            archive.HEADER,
            {
                "format": archive.CHANGES_FORMAT,
                "version": archive.VERSION,
                "start_time": start,
                "start_token": w.start_token,
            },
        )
        yield from w.spooled()
        yield archive.record(
            archive.TRAILER,
            {"count": w.count, "end_time": consistent, "end_token": end_token},
        )
        self._positions = {
            "start_time": ts_text(start),
            "consistent_time": ts_text(consistent),
            "consistent_at": ts_datetime(consistent).isoformat(),
            "data_since": data_since(start, w.last_wall).isoformat(),
            "start_token": archive.token_text(w.start_token),
            "end_token": archive.token_text(end_token),
            "events": w.count,
        }
        log.info("mongo.dump_changes", events=w.count, consistent_time=ts_text(consistent))

    def fingerprint(self) -> Fingerprint | None:
        return None

    def positions(self) -> dict[str, str | int] | None:
        return self._positions

    def cancel(self) -> None:
        self._watcher.abort()
