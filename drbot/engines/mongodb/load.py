"""Load a `mongo_dump` artifact into a target deployment.

Collections are created with their options first (views last, since they name other
collections), documents go in as raw BSON in batches on two connections at once, and indexes
are built after the data, which is much faster than maintaining them during the load.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from bson.raw_bson import RawBSONDocument

from drbot.engines.mongodb import archive
from drbot.engines.mongodb.client import PLAIN, RawClient, translated
from drbot.engines.mongodb.replay import NamespaceFilter, _index_spec
from drbot.errors import IntegrityFailure

log = structlog.get_logger(__name__)

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
    """Loads the records of one dump artifact into `client` (a raw client)."""

    def __init__(self, client: RawClient, covers: NamespaceFilter, artifact: str) -> None:
        self._client = client
        self._covers = covers
        self._artifact = artifact
        self._views: list[dict[str, Any]] = []
        self._current: _Pending | None = None
        self._batch: list[RawBSONDocument] = []
        self._batch_bytes = 0
        self._inflight: list[Future[None]] = []
        self._pool: ThreadPoolExecutor
        self._indexes: list[dict[str, Any]] = []
        self.stats = LoadStats()

    def load(self, chunks: Iterable[bytes]) -> LoadStats:
        """Load every record of the artifact; raises what reading or the target raises."""
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
        self._finish()
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
        self._wait(_WORKERS * 2)  # bounds memory: at most this many batches in flight
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
            self._views.append(info)
            return
        with translated(f"create {db}.{name}"):
            self._client[db].create_collection(name, **options)
        specs = [i for i in info.get("indexes") or [] if i.get("name") != "_id_"]
        if specs:
            self._indexes.append({"db": db, "name": name, "specs": specs})

    def _finish(self) -> None:
        for item in self._indexes:
            with translated(f"build indexes of {item['db']}.{item['name']}"):
                self._client[item["db"]].command(
                    "createIndexes",
                    item["name"],
                    indexes=[_index_spec(s) for s in item["specs"]],
                    codec_options=PLAIN,
                )
        for info in self._views:
            with translated(f"create view {info['db']}.{info['name']}"):
                self._client[info["db"]].create_collection(info["name"], **info["options"])
            self.stats.collections.append(f"{info['db']}.{info['name']}")
