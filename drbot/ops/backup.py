"""Take a full backup: dump once, compress, encrypt, store in every destination, verify, then
write each destination's manifest.

The order is what makes a backup trustworthy: a manifest is written to a destination only after
every artifact there has been read back and its size and SHA-256 match what drbot sent. Until
then the backup does not exist; if anything fails, the objects already stored are removed (or, if
the process dies, by the next backup's cleanup).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from drbot import __version__
from drbot.clock import Clock
from drbot.engines.base import BackupSource, DumpStream, Fingerprint
from drbot.errors import DrbotError, IntegrityFailure, StorageUnavailable
from drbot.manifest import ArtifactRecord, Manifest, encode_manifest
from drbot.ops.cleanup import cleanup_incomplete
from drbot.ops.fanout import DestinationWriter, Sent, new_data_key, read_back, send_stream
from drbot.pipeline.compress import compress_chunks
from drbot.pipeline.keys import KeyProvider, WrappedKey
from drbot.pipeline.prefetch import prefetch
from drbot.pipeline.stream import DEFAULT_FRAME_SIZE, StreamEncryptor
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

ProgressFn = Callable[[str, int], None]
"""Called with (artifact name, plaintext bytes read so far) as a dump is read."""


@dataclass(frozen=True)
class BackupSettings:
    """How one policy's backups are made (built from the policy by the CLI or daemon)."""

    policy: str
    engine_name: str
    mode: str = "logical"
    compression_level: int = 3
    compression_threads: int = -1
    frame_size: int = DEFAULT_FRAME_SIZE


@dataclass(frozen=True)
class BackupResult:
    """The outcome of one backup across destinations."""

    backup_id: str
    started_at: datetime
    completed_at: datetime
    source_version: str
    databases: tuple[str, ...]
    plaintext_bytes: int
    stored_bytes: dict[str, int]
    destinations_ok: tuple[str, ...]
    destinations_failed: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    artifacts: dict[str, tuple[ArtifactRecord, ...]] = field(default_factory=dict)
    """Per destination holding a complete copy: what was stored there, verified by read-back."""
    manifest_sha256: dict[str, str] = field(default_factory=dict)
    """Per destination holding a complete copy: SHA-256 of the manifest object written there."""
    positions: dict[str, Any] = field(default_factory=dict)
    """Physical backups: timeline, start/stop LSN, system identifier (see the manifest)."""

    @property
    def partial(self) -> bool:
        return bool(self.destinations_failed)


class Counted:
    """Counts the bytes of a stream as they pass, reporting (name, bytes so far) to `progress`."""

    def __init__(self, chunks: Iterable[bytes], name: str, progress: ProgressFn | None) -> None:
        self._chunks = chunks
        self._name = name
        self._progress = progress
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._chunks:
                self.total += len(chunk)
                if self._progress is not None:
                    self._progress(self._name, self.total)
                yield chunk
        finally:
            # Closing this closes the dump too (pg_dump is killed), not whenever it is freed.
            if isinstance(self._chunks, Generator):
                self._chunks.close()


class _Run:
    """State of one backup run; lives only for the duration of `run_backup`."""

    def __init__(
        self,
        settings: BackupSettings,
        storages: Sequence[Storage],
        keys: KeyProvider,
        backup_id: str,
        progress: ProgressFn | None,
    ) -> None:
        self.settings = settings
        self.storages = list(storages)
        self.keys = keys
        self.backup_id = backup_id
        self.progress = progress
        self.failed: dict[str, str] = {}
        self.records: dict[str, list[ArtifactRecord]] = {s.name: [] for s in storages}
        self.manifest_sha256: dict[str, str] = {}
        self.plaintext_bytes = 0

    def live(self) -> list[Storage]:
        return [s for s in self.storages if s.name not in self.failed]

    def fail(self, storage: Storage, why: str) -> None:
        if storage.name not in self.failed:
            self.failed[storage.name] = why
            log.warning(
                "backup.destination_failed",
                policy=self.settings.policy,
                backup_id=self.backup_id,
                destination=storage.name,
                error=why,
            )

    def store_artifact(
        self, dump: DumpStream, data_key: bytes, wrapped: dict[str, WrappedKey]
    ) -> None:
        key = layout.artifact_key(self.settings.policy, self.backup_id, dump.name)
        enc = StreamEncryptor(data_key, frame_size=self.settings.frame_size)
        writers = [DestinationWriter(s, key, enc.header(wrapped[s.name])) for s in self.live()]
        counted = Counted(dump.chunks(), dump.name, self.progress)
        source = prefetch(counted, cancel=dump.cancel)
        stream = compress_chunks(
            source,
            level=self.settings.compression_level,
            threads=self.settings.compression_threads,
        )

        def stop_dump() -> None:
            # Stop the dump now (not when the traceback is freed): it holds a snapshot and
            # locks on the source, and its thread would otherwise outlive this backup.
            stream.close()
            source.close()

        send_stream(writers, enc, stream, stop_producer=stop_dump)
        plain = counted.total
        for w in writers:
            sent = w.finish()
            if sent is None:
                self.fail(w.storage, w.describe_error())
                continue
            self.records[w.storage.name].append(self._record(dump, sent, plain))
        self.plaintext_bytes += plain
        log.info(
            "backup.artifact_stored",
            policy=self.settings.policy,
            backup_id=self.backup_id,
            artifact=dump.name,
            size_bytes=plain,
            destinations=[w.storage.name for w in writers if not w.failed],
        )

    def _record(self, dump: DumpStream, sent: Sent, plain: int) -> ArtifactRecord:
        return ArtifactRecord(
            name=dump.name,
            kind=dump.kind,
            database=dump.database,
            key=sent.key,
            size_bytes=sent.size_bytes,
            sha256=sent.sha256,
            plaintext_bytes=plain,
        )

    def verify_readback(self) -> None:
        """Read every stored artifact back; a destination with any mismatch is failed."""
        for storage in self.live():
            for rec in self.records[storage.name]:
                sent = Sent(storage.name, rec.key, rec.size_bytes, rec.sha256)
                problem = read_back(storage, sent)
                if problem is not None:
                    self.fail(storage, problem)
                    break

    def write_manifests(self, manifest_for: Callable[[Storage], Manifest], data_key: bytes) -> None:
        for storage in self.live():
            raw = encode_manifest(manifest_for(storage), data_key)
            key = layout.manifest_key(self.settings.policy, self.backup_id)
            try:
                storage.put(key, [raw])
                if b"".join(storage.open(key)) != raw:
                    raise IntegrityFailure(f"{storage.name}:{key}: manifest read-back differs")
                self.manifest_sha256[storage.name] = hashlib.sha256(raw).hexdigest()
            except DrbotError as exc:
                # A manifest that may be stored makes the backup exist; one that failed its
                # read-back must not, or `list` would show what this run reports as failed.
                with contextlib.suppress(DrbotError):
                    storage.delete(key)
                self.fail(storage, f"manifest: {exc}")

    def discard(self) -> None:
        """Best effort: remove this backup's objects everywhere after a failure."""
        cleanup_incomplete(self.settings.policy, self.storages, keep=frozenset())


def run_backup(
    settings: BackupSettings,
    engine: BackupSource,
    storages: Sequence[Storage],
    keys: KeyProvider,
    clock: Clock,
    *,
    backup_id: str | None = None,
    progress: ProgressFn | None = None,
) -> BackupResult:
    """Take one full backup of `engine`'s source into every destination of `storages`.

    Raises `SourceUnavailable`/`DatabaseError` from the engine, `KeyProblem` from the key
    provider, and `StorageUnavailable`/`IntegrityFailure` when no destination ends with a complete
    copy. When some destinations succeed and others fail, returns a result with `partial` set.
    The caller must hold the policy lock.
    """
    started_at = clock.now()
    t0 = clock.monotonic()
    backup_id = backup_id or layout.new_backup_id(started_at)
    info = engine.probe()
    log.info(
        "backup.started",
        policy=settings.policy,
        backup_id=backup_id,
        databases=list(info.databases),
        destinations=[s.name for s in storages],
    )
    cleanup_incomplete(settings.policy, storages, keep=frozenset({backup_id}))
    run = _Run(settings, storages, keys, backup_id, progress)
    fingerprints: dict[str, Fingerprint] = {}
    positions: dict[str, Any] = {}
    data_key, wrapped = new_data_key(keys, storages)
    dumps: list[DumpStream] = []
    try:
        dumps = engine.full_dumps()
        for dump in dumps:
            if not run.live():
                break
            run.store_artifact(dump, data_key, wrapped)
            fp = dump.fingerprint()
            if fp is not None and dump.database is not None:
                fingerprints[dump.database] = fp
            positions.update(dump.positions() or {})
        run.verify_readback()
        completed_at = clock.now()

        def manifest_for(storage: Storage) -> Manifest:
            return Manifest(
                policy=settings.policy,
                backup_id=backup_id,
                type="full",
                mode=settings.mode,
                engine=settings.engine_name,
                source_version=info.server_version,
                databases=info.databases,
                started_at=started_at,
                completed_at=completed_at,
                destination=storage.name,
                wrapped_key=wrapped[storage.name],
                compression={"algorithm": "zstd", "level": settings.compression_level},
                encryption={"algorithm": "AES-256-GCM", "frame_size": settings.frame_size},
                artifacts=tuple(run.records[storage.name]),
                fingerprints=fingerprints,
                positions=positions,
                drbot_version=__version__,
                host=socket.gethostname(),
            )

        if run.live():
            run.write_manifests(manifest_for, data_key)
    except BaseException as exc:
        log.error(
            "backup.failed",
            policy=settings.policy,
            backup_id=backup_id,
            error=str(exc) or exc.__class__.__name__,
            duration_s=round(clock.monotonic() - t0, 3),
        )
        run.discard()
        for dump in dumps:
            # Stop what the engine started for the dumps not read (a MongoDB backup's change
            # stream follower), not only the one that failed.
            dump.cancel()
        raise
    ok = tuple(s.name for s in run.live())
    # a destination that failed holds objects without a manifest: remove them now if it lets us
    cleanup_incomplete(settings.policy, [s for s in storages if s.name in run.failed])
    if not ok:
        run.discard()
        reasons = "; ".join(f"{d}: {why}" for d, why in run.failed.items())
        raise StorageUnavailable(f"backup {backup_id} failed in every destination: {reasons}")
    result = BackupResult(
        backup_id=backup_id,
        started_at=started_at,
        completed_at=completed_at,
        source_version=info.server_version,
        databases=info.databases,
        plaintext_bytes=run.plaintext_bytes,
        stored_bytes={d: sum(r.size_bytes for r in run.records[d]) for d in ok},
        destinations_ok=ok,
        destinations_failed=dict(run.failed),
        fingerprints=fingerprints,
        artifacts={d: tuple(run.records[d]) for d in ok},
        manifest_sha256={d: run.manifest_sha256[d] for d in ok if d in run.manifest_sha256},
        positions=positions,
    )
    log.info(
        "backup.completed",
        policy=settings.policy,
        backup_id=backup_id,
        size_bytes=run.plaintext_bytes,
        destinations=list(ok),
        failed=list(run.failed),
        duration_s=round(clock.monotonic() - t0, 3),
    )
    return result
