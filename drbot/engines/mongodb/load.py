"""Load `mongo_dump` artifacts into a target deployment.

Collections are created with their options first, documents go in as raw BSON in batches on two
connections at once, and secondary indexes and views wait for `finish`: after the data (much
faster than maintaining indexes during the load) and after the replay of the backup's own
events over its fuzzy dump, during which a unique index could reject a document that only an
older, already superseded event brings back. While that replay runs, the `SchemaReplay`
methods keep the waiting indexes and views in step with the DDL events it applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure

from drbot.engines.mongodb import archive
from drbot.engines.mongodb.client import PLAIN, RawClient, translated
from drbot.engines.mongodb.replay import NamespaceFilter, _index_spec
from drbot.errors import IntegrityFailure

log = structlog.get_logger(__name__)

_NAMESPACE_EXISTS = 48
_INDEX_EXISTS = frozenset((68, 85, 86))  # IndexAlreadyExists, IndexOptionsConflict, ...KeySpecs...
_BATCH_DOCS = 1000
_BATCH_BYTES = 8 << 20
_WORKERS = 2


@dataclass
class LoadStats:
    collections: list[str] = field(default_factory=list)
    documents: int = 0


@dataclass
class _Pending:
    info: dict[str, Any]
    count: int = 0


class DumpLoader:
    """Loads dump artifacts into `client` (a raw client); `finish` builds indexes and views."""

    def __init__(self, client: RawClient, covers: NamespaceFilter) -> None:
        self._client = client
        self._covers = covers
        self._artifact = ""
        self._views: dict[tuple[str, str], dict[str, Any]] = {}
        self._current: _Pending | None = None
        self._batch: list[RawBSONDocument] = []
        self._batch_bytes = 0
        self._inflight: list[Future[None]] = []
        self._pool: ThreadPoolExecutor
        self._indexes: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.stats = LoadStats()

    def load(self, chunks: Iterable[bytes], artifact: str) -> LoadStats:
        """Load every record of one artifact (named `artifact` in errors); raises what reading
        or the target raises. Indexes and views wait for `finish`."""
        self._artifact = artifact
        with ThreadPoolExecutor(_WORKERS, thread_name_prefix="drbot-mongo-load") as pool:
            self._pool = pool
            for tag, raw in archive.read_records(chunks, artifact=self._artifact):
                if tag == archive.COLLECTION:
                    self._begin(archive.decode(raw))
                elif tag == archive.DOCUMENT:
                    self._add(raw)
                elif tag == archive.END:
                    self._end(archive.decode(raw))
            self._wait(0)
        return self.stats

    def _begin(self, info: dict[str, Any]) -> None:
        self._current = _Pending(info) if self._covers(info["db"], info["name"]) else None
        if self._current is not None:
            self._create(info)

    def _add(self, raw: bytes) -> None:
        if self._current is None:
            return
        self._batch.append(RawBSONDocument(raw))
        self._batch_bytes += len(raw)
        self._current.count += 1
        if len(self._batch) >= _BATCH_DOCS or self._batch_bytes >= _BATCH_BYTES:
            self._flush()

    def _end(self, end: dict[str, Any]) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        self._flush(current)
        if end["count"] != current.count:
            raise IntegrityFailure(
                f"{self._artifact}: {end['db']}.{end['name']} holds {current.count} "
                f"documents, its end record says {end['count']}"
            )
        self.stats.collections.append(f"{end['db']}.{end['name']}")
        self.stats.documents += current.count

    def _flush(self, pending: _Pending | None = None) -> None:
        current = pending or self._current
        if not self._batch or current is None:
            return
        docs, self._batch, self._batch_bytes = self._batch, [], 0
        # Bounds memory: at most this many batches in flight. A capped collection keeps
        # insertion order (its natural order is its meaning): one batch at a time there.
        self._wait(0 if current.info.get("options", {}).get("capped") else _WORKERS * 2)
        self._inflight.append(
            self._pool.submit(self._insert, current.info["db"], current.info["name"], docs)
        )

    def _wait(self, keep: int) -> None:
        """Wait for in-flight inserts until at most `keep` remain (errors surface here)."""
        while len(self._inflight) > keep:
            self._inflight.pop(0).result()

    def _insert(self, db: str, name: str, docs: list[RawBSONDocument]) -> None:
        with translated(f"load {db}.{name}"):
            self._client[db][name].insert_many(docs, ordered=False, bypass_document_validation=True)

    def _create(self, info: dict[str, Any]) -> None:
        db, name, kind = info["db"], info["name"], info.get("type", "collection")
        options = dict(info.get("options") or {})
        if kind == "view":
            self._views[(db, name)] = info
            return
        with translated(f"create {db}.{name}"):
            try:
                self._client[db].create_collection(name, check_exists=False, **options)
            except OperationFailure as exc:
                if exc.code != _NAMESPACE_EXISTS or self._client[db][name].find_one({}, {"_id": 1}):
                    raise
                # An empty collection of that name (occupied ones were refused or dropped):
                # the backup's, with its options, takes its place.
                self._client[db].drop_collection(name)
                self._client[db].create_collection(name, check_exists=False, **options)
        specs = [i for i in info.get("indexes") or [] if i.get("name") != "_id_"]
        if specs:
            self._indexes[(db, name)] = specs

    def finish(self) -> None:
        """Build the waiting indexes, then create the waiting views."""
        for (db, name), specs in self._indexes.items():
            with translated(f"build indexes of {db}.{name}"):
                if not specs or name not in self._client[db].list_collection_names():
                    continue
                try:
                    self._client[db].command(
                        "createIndexes",
                        name,
                        indexes=[_index_spec(s) for s in specs],
                        codec_options=PLAIN,
                    )
                except OperationFailure as exc:
                    if exc.code not in _INDEX_EXISTS:
                        raise
                    self._one_by_one(db, name, specs)
        for (db, name), info in self._views.items():
            with translated(f"create view {db}.{name}"):
                try:
                    self._client[db].create_collection(name, check_exists=False, **info["options"])
                except OperationFailure as exc:
                    if exc.code != _NAMESPACE_EXISTS:
                        raise
            self.stats.collections.append(f"{db}.{name}")

    def _one_by_one(self, db: str, name: str, specs: list[dict[str, Any]]) -> None:
        """Some index already exists (a replayed event made it): build the others."""
        for spec in specs:
            try:
                self._client[db].command(
                    "createIndexes", name, indexes=[_index_spec(spec)], codec_options=PLAIN
                )
            except OperationFailure as exc:
                if exc.code not in _INDEX_EXISTS:
                    raise

    # -- SchemaReplay: DDL replayed before `finish` --------------------------------------------

    def created_indexes(self, db: str, name: str, specs: list[dict[str, Any]]) -> None:
        names = {s.get("name") for s in specs}
        held = [s for s in self._indexes.get((db, name), []) if s.get("name") not in names]
        self._indexes[(db, name)] = held + [s for s in specs if s.get("name") != "_id_"]

    def dropped_indexes(self, db: str, name: str, index_names: list[str]) -> None:
        specs = self._indexes.get((db, name))
        if specs is not None:
            self._indexes[(db, name)] = [s for s in specs if s.get("name") not in index_names]

    def dropped_collection(self, db: str, name: str) -> None:
        self._indexes.pop((db, name), None)
        self._views.pop((db, name), None)

    def dropped_database(self, db: str) -> None:
        for key in [k for k in self._indexes if k[0] == db]:
            del self._indexes[key]
        for key in [k for k in self._views if k[0] == db]:
            del self._views[key]

    def renamed(self, db: str, name: str, to_db: str, to_name: str) -> None:
        self.dropped_collection(to_db, to_name)  # dropTarget
        specs = self._indexes.pop((db, name), None)
        if specs is not None:
            self._indexes[(to_db, to_name)] = specs
