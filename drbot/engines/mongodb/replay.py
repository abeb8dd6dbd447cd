"""Replay change events into a target as ordinary, idempotent writes.

Inserts and replacements become upserts by document key, updates are applied to the current
document client-side (drbot/engines/mongodb/update.py) and written back as a replacement,
deletes delete by key, and DDL events become the matching commands. Nothing needs `applyOps`
or any privilege beyond reading and writing the restored databases, so this also works on
managed services. Events of one transaction (same `lsid` and `txnNumber`) travel as one group;
a restore to a moment takes a whole group or none of it (`select`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog
from bson.datetime_ms import DatetimeMS
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.errors import OperationFailure

from drbot.engines.mongodb.client import translated
from drbot.engines.mongodb.position import ts_key
from drbot.engines.mongodb.update import UpdateConflict, apply_update
from drbot.errors import DatabaseError

log = structlog.get_logger(__name__)

Event = dict[str, Any]
NamespaceFilter = Callable[[str, str | None], bool]
"""(database, collection or None) -> whether a restore covers it."""

_NAMESPACE_NOT_FOUND = 26
_INDEX_NOT_FOUND = 27
_NAMESPACE_EXISTS = 48
_IGNORED = frozenset(
    ("shardCollection", "reshardCollection", "refineCollectionShardKey", "invalidate")
)


def txn_of(event: Event) -> tuple[Any, ...] | None:
    """What identifies the transaction an event belongs to (None outside transactions)."""
    if "txnNumber" not in event or "lsid" not in event:
        return None
    lsid = event["lsid"]
    return (
        repr(sorted(lsid.items())) if isinstance(lsid, dict) else repr(lsid),
        event["txnNumber"],
    )


def group(events: Iterable[Event]) -> Iterator[list[Event]]:
    """Events in groups: one per transaction (consecutive events sharing lsid and txnNumber),
    one per event outside transactions."""
    current: list[Event] = []
    current_txn: tuple[Any, ...] | None = None
    for event in events:
        txn = txn_of(event)
        if current and (txn is None or txn != current_txn):
            yield current
            current = []
        current.append(event)
        current_txn = txn
    if current:
        yield current


def group_time(events: list[Event]) -> Timestamp:
    """The moment a group takes effect: its last event's cluster time (a commit's)."""
    times: list[Timestamp] = [e["clusterTime"] for e in events]
    return max(times, key=ts_key)


def select(
    groups: Iterable[list[Event]], until: Timestamp | None, at: datetime | None = None
) -> Iterator[list[Event]]:
    """The groups that took effect at or before the target, in order (all of them when both
    `until` and `at` are None).

    With `at`, a group carrying `wallTime` (milliseconds, MongoDB 6.0+) is judged by it: cluster
    times count whole seconds, and their second need not be the wall clock's. A group without
    it is judged by its cluster time against `until`. Selection stops at the first group after
    the target: what follows it in the history is after it too.
    """
    limit = None if until is None else ts_key(until)
    target_us = None if at is None else _micros(at)
    for g in groups:
        walls = [w for e in g if (w := wall_ms(e.get("wallTime"))) is not None]
        if target_us is not None and walls:
            if max(walls) * 1000 > target_us:
                return
        elif limit is not None and ts_key(group_time(g)) > limit:
            return
        yield g


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no floating point: .5 s must stay .5 s)."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(microseconds=1)


def wall_ms(value: Any) -> int | None:
    """A BSON date (as decoded exactly, or as a datetime) in milliseconds since the epoch."""
    if isinstance(value, DatetimeMS):
        return int(value)
    if isinstance(value, datetime):
        return _micros(value) // 1000
    return None


class SchemaReplay(Protocol):
    """Told of DDL replayed while a loader still holds indexes and views back (load.py)."""

    def created_indexes(self, db: str, name: str, specs: list[dict[str, Any]]) -> None: ...

    def dropped_indexes(self, db: str, name: str, index_names: list[str]) -> None: ...

    def dropped_collection(self, db: str, name: str) -> None: ...

    def dropped_database(self, db: str) -> None: ...

    def renamed(self, db: str, name: str, to_db: str, to_name: str) -> None: ...


@dataclass
class ReplayStats:
    events: int = 0
    skipped: int = 0
    conflicts_skipped: int = 0
    last_time: Timestamp | None = None
    by_type: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """What the replay could not make exact, for the person restoring (shown, audited)."""


class Replayer:
    """Applies events to the target `client` (a client decoding documents exactly)."""

    def __init__(
        self,
        client: MongoClient[dict[str, Any]],
        covers: NamespaceFilter,
        whole: Callable[[str], bool] | None = None,
    ) -> None:
        self._client = client
        self._covers = covers
        self._whole = whole or (lambda db: covers(db, None))
        self.stats = ReplayStats()
        self.fuzzy = False
        """Set while replaying a full backup's own events over its dump, whose documents may
        already show later events: an update path that no longer fits is then skipped (a
        later event settles it) instead of failing the restore."""
        self.schema: SchemaReplay | None = None
        """Told of replayed DDL while indexes and views are still held back."""

    def apply_group(self, events: list[Event]) -> None:
        for event in events:
            self.apply(event)

    def apply(self, event: Event) -> None:
        op = str(event.get("operationType"))
        ns = event.get("ns") or {}
        db, coll = ns.get("db"), ns.get("coll")
        self.stats.last_time = event.get("clusterTime", self.stats.last_time)
        if op in _IGNORED or db is None or not self._covers(db, coll):
            if op == "rename":
                self._renamed_in_from_outside(event, db, coll)
            self.stats.skipped += 1
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            log.warning("mongo.replay_unknown_event", operation=op, ns=f"{db}.{coll}")
            self.stats.skipped += 1
            return
        with translated(f"replay {op} on {db}.{coll}"):
            handler(event, db, coll)
        self.stats.events += 1
        self.stats.by_type[op] = self.stats.by_type.get(op, 0) + 1

    def _renamed_in_from_outside(self, event: Event, db: str | None, coll: str | None) -> None:
        to = (event.get("operationDescription") or {}).get("to") or event.get("to") or {}
        if to and self._covers(str(to.get("db")), to.get("coll")):
            self.stats.warnings.append(
                f"{db}.{coll} was renamed onto {to.get('db')}.{to.get('coll')}, which is "
                "restored, from outside what is restored: that collection's data from then on "
                "is not in this restore (restore the source namespace too)"
            )

    # -- documents --------------------------------------------------------------------------

    def _op_insert(self, event: Event, db: str, coll: str) -> None:
        # Validation was done by the source when the write happened; a validator changed
        # since (its own event, also replayed) must not refuse what the source accepted.
        self._client[db][coll].replace_one(
            event["documentKey"],
            event["fullDocument"],
            upsert=True,
            bypass_document_validation=True,
        )

    _op_replace = _op_insert

    def _op_update(self, event: Event, db: str, coll: str) -> None:
        target = self._client[db][coll]
        key = event["documentKey"]
        doc = target.find_one(key)
        if doc is None:
            if not self.fuzzy:
                # Over an exact state every updated document exists: this one does not, so the
                # restored data has drifted from the source's somewhere before.
                self.stats.warnings.append(
                    f"an update of {db}.{coll} {key!r} found no document to update"
                )
            # Over the fuzzy dump: deleted later in the history the dump already shows.
            self.stats.skipped += 1
            return
        try:
            apply_update(
                doc,
                event.get("updateDescription") or {},
                on_conflict=self._skip_conflict if self.fuzzy else None,
            )
        except UpdateConflict as exc:
            raise DatabaseError(f"replay update of {db}.{coll} {key!r}: {exc}") from None
        target.replace_one(key, doc, bypass_document_validation=True)

    def _skip_conflict(self, exc: UpdateConflict) -> None:
        self.stats.conflicts_skipped += 1
        log.debug("mongo.replay_conflict_skipped", error=str(exc))

    def _op_delete(self, event: Event, db: str, coll: str) -> None:
        self._client[db][coll].delete_one(event["documentKey"])

    # -- collections and databases ---------------------------------------------------------

    def _op_create(self, event: Event, db: str, coll: str) -> None:
        options = dict(event.get("operationDescription") or {})
        options.pop("idIndex", None)
        try:
            self._client[db].create_collection(coll, check_exists=False, **options)
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_EXISTS:
                raise

    def _op_drop(self, event: Event, db: str, coll: str) -> None:
        self._client[db].drop_collection(coll)
        if self.schema is not None:
            self.schema.dropped_collection(db, coll)

    def _op_dropDatabase(self, event: Event, db: str, coll: str | None) -> None:  # noqa: N802
        if not self._whole(db):
            # Only some collections of it are restored: drop those, not the rest of the
            # target's database.
            for name in self._client[db].list_collection_names():
                if self._covers(db, name):
                    self._op_drop(event, db, name)
            return
        self._client.drop_database(db)
        if self.schema is not None:
            self.schema.dropped_database(db)

    def _op_rename(self, event: Event, db: str, coll: str) -> None:
        desc = event.get("operationDescription") or {}
        to = desc.get("to") or event.get("to") or {}
        if not self._covers(str(to.get("db")), to.get("coll")):
            # Renamed out of what is being restored: as seen from here, it was dropped.
            self._op_drop(event, db, coll)
            return
        if self.schema is not None:
            self.schema.renamed(db, coll, str(to["db"]), str(to["coll"]))
        try:
            self._client.admin.command(
                "renameCollection",
                f"{db}.{coll}",
                to=f"{to['db']}.{to['coll']}",
                dropTarget=bool(desc.get("dropTarget", True)),
            )
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_NOT_FOUND:
                raise

    def _op_createIndexes(self, event: Event, db: str, coll: str) -> None:  # noqa: N802
        specs = (event.get("operationDescription") or {}).get("indexes") or []
        if self.schema is not None:
            # Over the fuzzy dump, a unique index could refuse a document an older event
            # brings back for a moment: it is built with the dump's, after this replay.
            self.schema.created_indexes(db, coll, specs)
            return
        if specs:
            self._client[db].command("createIndexes", coll, indexes=[_index_spec(s) for s in specs])

    def _op_dropIndexes(self, event: Event, db: str, coll: str) -> None:  # noqa: N802
        specs = (event.get("operationDescription") or {}).get("indexes") or []
        if self.schema is not None:
            self.schema.dropped_indexes(db, coll, [str(s.get("name")) for s in specs])
        for spec in specs:
            try:
                self._client[db][coll].drop_index(spec["name"])
            except OperationFailure as exc:
                if exc.code not in (_INDEX_NOT_FOUND, _NAMESPACE_NOT_FOUND):
                    raise

    def _op_modify(self, event: Event, db: str, coll: str) -> None:
        desc = dict(event.get("operationDescription") or {})
        desc.pop("stateBeforeChange", None)
        if desc:
            self._client[db].command("collMod", coll, **desc)


def _index_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """An index as listIndexes / an event shows it, as createIndexes takes it."""
    return {k: v for k, v in spec.items() if k not in ("v", "ns")}
