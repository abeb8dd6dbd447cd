"""The Engine protocol and the values engines exchange with the rest of drbot."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class TableFingerprint:
    """What one table (or collection) looked like: row count and an order-independent checksum.

    `checksum` is hex; `columns` is the engine's column list used to recompute it after a restore
    (for PostgreSQL the quoted column list of the dump's COPY statement); `alg` names how the
    checksum was computed, empty for the engine's first way (the engine recomputes it the same
    way after a restore).
    """

    rows: int
    checksum: str
    columns: str = ""
    alg: str = ""


@dataclass(frozen=True)
class Fingerprint:
    """Per-table fingerprints of one database, keyed by qualified name ('public.orders')."""

    tables: dict[str, TableFingerprint] = field(default_factory=dict)

    def to_json(self) -> dict[str, dict[str, object]]:
        # "alg" only when set: fingerprints of the first way keep their original form.
        return {
            name: {"rows": t.rows, "checksum": t.checksum, "columns": t.columns}
            | ({"alg": t.alg} if t.alg else {})
            for name, t in sorted(self.tables.items())
        }

    @classmethod
    def from_json(cls, data: dict[str, dict[str, object]]) -> Fingerprint:
        return cls(
            tables={
                name: TableFingerprint(
                    rows=int(str(t["rows"])),
                    checksum=str(t["checksum"]),
                    columns=str(t.get("columns", "")),
                    alg=str(t.get("alg", "")),
                )
                for name, t in data.items()
            }
        )


@dataclass(frozen=True)
class Mismatch:
    """One difference between an expected and an actual fingerprint, for reports."""

    table: str
    problem: str  # "missing" | "unexpected" | "rows" | "checksum"
    expected: str
    actual: str


def compare_fingerprints(expected: Fingerprint, actual: Fingerprint) -> list[Mismatch]:
    """Every difference between two fingerprints, sorted by table name (empty means identical)."""
    out: list[Mismatch] = []
    for name in sorted(set(expected.tables) | set(actual.tables)):
        exp, act = expected.tables.get(name), actual.tables.get(name)
        if act is None and exp is not None:
            out.append(Mismatch(name, "missing", f"{exp.rows} rows", "absent"))
        elif exp is None and act is not None:
            out.append(Mismatch(name, "unexpected", "absent", f"{act.rows} rows"))
        elif exp is not None and act is not None:
            if exp.rows != act.rows:
                out.append(Mismatch(name, "rows", str(exp.rows), str(act.rows)))
            elif exp.checksum != act.checksum:
                out.append(Mismatch(name, "checksum", exp.checksum[:16], act.checksum[:16]))
    return out


@dataclass(frozen=True)
class SourceInfo:
    """What a probe learned about a source."""

    server_version: str
    databases: tuple[str, ...]


class DumpStream(Protocol):
    """One artifact's worth of dump output, produced once and read once.

    `chunks()` may be iterated only once; it starts the dump tool and yields its output as it
    comes. When the tool fails it raises `SourceUnavailable` (cannot connect) or `DatabaseError`
    (anything else, with the tool's own message) after the last chunk, so a failed dump can never
    look complete. If the consumer stops early (closes the generator), the tool is killed.
    `fingerprint()` is valid after `chunks()` is exhausted; None for artifacts without table data.
    """

    name: str
    """Artifact name, unique within a backup (e.g. 'globals.sql', 'db/shop.pgdump')."""

    kind: str
    """What the bytes are: 'pg_globals' (SQL script), 'pg_dump' (custom-format archive) or
    'pg_basebackup' (tar of the data directory)."""

    database: str | None

    def chunks(self) -> Iterator[bytes]: ...

    def fingerprint(self) -> Fingerprint | None: ...

    def positions(self) -> dict[str, str | int] | None:
        """Valid after `chunks()` is exhausted: where in the source's history this artifact
        was taken (physical base backups: timeline, start/stop LSN...); None for dumps."""
        ...

    def cancel(self) -> None:
        """Stop the dump tool now, from any thread (idempotent; a no-op once it has ended).

        A `chunks()` iteration in progress then ends by raising; nothing partial is returned
        as complete.
        """
        ...


class BackupSource(Protocol):
    """What a full backup needs of a database kind.

    Errors: `SourceUnavailable` when the source cannot be reached; `DatabaseError` when the
    database or its tool reports a failure; nothing from the driver or subprocess escapes.
    """

    def probe(self) -> SourceInfo:
        """Connect to the source and report its version and the databases a backup will cover."""
        ...

    def full_dumps(self) -> list[DumpStream]:
        """The artifacts of one full backup, in the order they should be produced."""
        ...


class Engine(BackupSource, Protocol):
    """A database kind that restores through drbot's generic restore: PostgreSQL.

    Errors: `SourceUnavailable` when the database (source or restore target) cannot be
    reached; `DatabaseError` when the database or its tool reports a failure; nothing from
    psycopg or subprocess escapes.
    """

    def target_is_empty(self, target_uri: str) -> bool:
        """Whether the target database holds no user tables, views, sequences or functions."""
        ...

    def prepare_target(self, target_uri: str) -> bool:
        """Create the target database if it does not exist; True if this call created it."""
        ...

    def drop_target(self, target_uri: str) -> None:
        """Drop the target database (undoes `prepare_target` after a failed restore)."""
        ...

    def apply_globals(self, chunks: Iterable[bytes], target_uri: str) -> list[str]:
        """Apply a globals artifact (roles...) best effort; returns warnings (e.g. roles exist)."""
        ...

    def load(
        self,
        kind: str,
        chunks: Iterable[bytes],
        target_uri: str,
        *,
        replace: bool = False,
        no_owner: bool = False,
    ) -> None:
        """Load one artifact into the target, all or nothing (one transaction).

        With `replace`, objects of the dump that already exist in the target are dropped first,
        inside the same transaction. With `no_owner`, ownership and privileges are not restored
        (for targets that lack the source's roles).

        If `chunks` raises (corrupt object, wrong key) or the database refuses, the target is
        left exactly as it was and the error propagates (translated to drbot's errors).
        """
        ...

    def fingerprint_target(self, target_uri: str, expected: Fingerprint) -> Fingerprint:
        """Recompute, in the target, the fingerprint of every table named in `expected`."""
        ...
