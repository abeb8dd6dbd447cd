"""The MongoDB engine: probe a deployment and produce the artifacts of a full backup."""

from __future__ import annotations

from collections.abc import Sequence

from pymongo.errors import PyMongoError

from drbot.engines.base import DumpStream, SourceInfo
from drbot.engines.mongodb.client import (
    PLAIN,
    SYSTEM_DATABASES,
    RawClient,
    Topology,
    connect,
    topology,
    translate,
    translated,
    where,
)
from drbot.engines.mongodb.dump import ChangesDump, ChangeWatcher, DatabaseDump
from drbot.errors import NoRestorePoint, PolicyInvalid


class MongoEngine:
    """Backups of one MongoDB deployment (replica set, sharded cluster or standalone server).

    Errors: `SourceUnavailable` when the deployment cannot be reached or refuses access,
    `DatabaseError` for anything else it reports, `NoRestorePoint` when a database named in
    the policy does not exist, `PolicyInvalid` when incrementals are asked of a standalone
    server (it has no change streams). Nothing from pymongo escapes.
    """

    def __init__(
        self, uri: str, databases: Sequence[str] | None, *, wants_incrementals: bool = False
    ) -> None:
        self.uri = uri
        self._wanted = list(databases) if databases else None
        self._wants_incrementals = wants_incrementals
        self._client: RawClient | None = None
        self._topology: Topology | None = None

    @property
    def client(self) -> RawClient:
        if self._client is None:
            self._client = connect(self.uri)
        return self._client

    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = topology(self.client, self.uri)
            if self._wants_incrementals and not self._topology.has_change_streams:
                raise PolicyInvalid(
                    f"{where(self.uri)} is a standalone server: it has no change streams, so "
                    "it can have full backups only",
                    hint="remove schedule.incremental, or run MongoDB as a replica set "
                    "(a one-node replica set is enough)",
                )
        return self._topology

    def probe(self) -> SourceInfo:
        topo = self.topology()
        with translated(f"list databases on {where(self.uri)}"):
            names = self.client.admin.command("listDatabases", nameOnly=True, codec_options=PLAIN)[
                "databases"
            ]
        present = sorted(str(d["name"]) for d in names)
        if self._wanted is None:
            chosen = [d for d in present if d not in SYSTEM_DATABASES]
        else:
            missing = [d for d in self._wanted if d not in present]
            if missing:
                raise NoRestorePoint(
                    f"{where(self.uri)} has no database {', '.join(missing)} "
                    f"(it has: {', '.join(present) or 'none'})",
                    hint="fix source.databases in the policy",
                )
            chosen = list(self._wanted)
        return SourceInfo(server_version=topo.server_version, databases=tuple(chosen))

    def full_dumps(self) -> list[DumpStream]:
        """One artifact per database, then (replica sets and sharded clusters) the change
        events seen while they were read. The change stream opens here, before any read."""
        topo = self.topology()
        databases = self.probe().databases
        dumps: list[DumpStream] = []
        watcher = None
        if topo.has_change_streams:
            watcher = ChangeWatcher(
                self.client, self.uri, databases, only_these=self._wanted is not None
            )
            watcher.start()
        dumps.extend(DatabaseDump(self.client, self.uri, db, topo) for db in databases)
        if watcher is not None:
            dumps.append(ChangesDump(watcher))
        return dumps

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except PyMongoError as exc:
                raise translate(exc, f"close {where(self.uri)}") from None
            self._client = None
