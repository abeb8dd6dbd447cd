"""An in-process Engine for unit tests of the operations (real contract, fake database)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from drbot.engines.base import DumpStream, Engine, Fingerprint, SourceInfo, TableFingerprint
from drbot.errors import DatabaseError


@dataclass
class FakeDump:
    name: str
    kind: str
    database: str | None
    data: bytes
    fail_after: int | None = None
    fp: Fingerprint | None = None

    def chunks(self) -> Iterator[bytes]:
        step = 7919
        for i in range(0, len(self.data), step):
            if self.fail_after is not None and i >= self.fail_after:
                raise DatabaseError(f"dump of {self.name} failed (simulated)")
            yield self.data[i : i + step]

    def fingerprint(self) -> Fingerprint | None:
        return self.fp

    def positions(self) -> dict[str, str | int] | None:
        return None

    def cancel(self) -> None:
        pass


@dataclass
class FakeEngine:
    """Dumps fixed bytes; 'loads' into a dict keyed by target URI."""

    databases: dict[str, bytes]
    fail_dump_after: int | None = None
    loaded: dict[str, bytes] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)

    def probe(self) -> SourceInfo:
        return SourceInfo("15.0", tuple(self.databases))

    def full_dumps(self) -> list[DumpStream]:
        dumps: list[DumpStream] = [FakeDump("globals.sql", "pg_globals", None, b"CREATE ROLE x;\n")]
        for db, data in self.databases.items():
            fp = Fingerprint({"public.t": TableFingerprint(len(data), f"{len(data):032x}", "a")})
            dumps.append(FakeDump(f"db/{db}.pgdump", "pg_dump", db, data, self.fail_dump_after, fp))
        return dumps

    def target_is_empty(self, target_uri: str) -> bool:
        return target_uri not in self.loaded

    def prepare_target(self, target_uri: str) -> bool:
        if target_uri in self.created:
            return False
        self.created.add(target_uri)
        return True

    def drop_target(self, target_uri: str) -> None:
        self.created.discard(target_uri)

    def apply_globals(self, chunks: Iterable[bytes], target_uri: str) -> list[str]:
        b"".join(chunks)
        return []

    def load(
        self,
        kind: str,
        chunks: Iterable[bytes],
        target_uri: str,
        *,
        replace: bool = False,
        no_owner: bool = False,
    ) -> None:
        data = b"".join(chunks)  # all or nothing: stored only if every chunk arrived
        self.loaded[target_uri] = data

    def fingerprint_target(self, target_uri: str, expected: Fingerprint) -> Fingerprint:
        data = self.loaded.get(target_uri, b"")
        return Fingerprint({"public.t": TableFingerprint(len(data), f"{len(data):032x}", "a")})


_: type[Engine] = FakeEngine
