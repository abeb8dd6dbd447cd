"""A destination in a local directory (file:///abs/path): one file per object.

Puts are atomic: bytes go to `.<basename>.partial-<random>` next to the final file, are
fsynced, then renamed over the key, and the directory is fsynced, so after a crash a key holds
either the old object, the new one, or nothing, never a torn file. The root must already exist:
a missing root is far more often an unmounted volume than a wish for a new directory.

Conditional writes (`put_if`) are serialized by an flock on a sidecar `.<basename>.put-if.lock`
next to the object. It is never listed, and stays when the object is deleted: removing a lock
file another writer may be waiting on would let two writers in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import structlog

from drbot.durable import Writeback, sync_dir
from drbot.errors import ObjectNotFound, PreconditionFailed, StorageUnavailable
from drbot.storage.base import ObjectInfo, PutResult, Storage

log = structlog.get_logger(__name__)

READ_CHUNK_BYTES = 1 << 20
PARTIAL_MARK = ".partial-"
LOCK_SUFFIX = ".put-if.lock"


def check_key(key: str) -> tuple[str, ...]:
    """The '/'-separated parts of `key`; ValueError if it could escape or alias a directory.

    Rejected: empty keys, a leading '/', empty parts ('a//b', trailing '/'), '.' and '..'
    parts, NUL bytes, and names that look like an unfinished put's temp file or a put_if lock.
    """
    if not key or key.startswith("/") or "\0" in key:
        raise ValueError(f"invalid object key {key!r}: must be non-empty and relative")
    parts = tuple(key.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' part")
        if part.startswith(".") and PARTIAL_MARK in part:
            raise ValueError(f"invalid object key {key!r}: reserved for unfinished puts")
        if _is_lock(part):
            raise ValueError(f"invalid object key {key!r}: reserved for put_if lock files")
    return parts


def _check_prefix(prefix: str) -> None:
    # A prefix may end in '/' or a partial name; only path tricks are refused.
    if prefix.startswith("/") or "\0" in prefix:
        raise ValueError(f"invalid prefix {prefix!r}: must be relative")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"invalid prefix {prefix!r}: '.' or '..' part")


def _is_lock(name: str) -> bool:
    """Whether `name` is the flock sidecar of a put_if'd object (never an object itself)."""
    return name.startswith(".") and name.endswith(LOCK_SUFFIX)


def _is_partial(name: str) -> bool:
    return name.startswith(".") and PARTIAL_MARK in name and not _is_lock(name)


def _partial_target(name: str) -> str:
    """The basename an unfinished put's temp file was going to become."""
    return name[1 : name.index(PARTIAL_MARK)]


class LocalStorage:
    """Objects as files under `root`; see the module docstring for the durability rules."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root.absolute()
        self.url = self.root.as_uri()
        self.region: str | None = None

    # -- helpers -------------------------------------------------------------------------

    def _unavailable(self, what: str, exc: OSError) -> StorageUnavailable:
        return StorageUnavailable(
            f"{self.url}: {what} failed: {exc.strerror or exc} ({exc.filename or self.root})",
            hint=f"check that {self.root} exists, is mounted and is writable by this user",
        )

    def _require_root(self) -> None:
        """StorageUnavailable unless the root directory exists."""
        if not self.root.is_dir():
            raise StorageUnavailable(
                f"{self.url}: destination directory {self.root} does not exist",
                hint=f"create {self.root} (or mount the volume that holds it)",
            )

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` under root, fsyncing each new entry's parent so it survives."""
        missing: list[Path] = []
        current = directory
        while current != self.root and not current.is_dir():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):  # a concurrent put made it first
                path.mkdir()
            sync_dir(path.parent)

    # -- Storage -------------------------------------------------------------------------

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        """Store `chunks` under `key` atomically; returns size and SHA-256 of what was written.

        Raises ValueError for an invalid key, StorageUnavailable if the root is missing or a
        write fails; an exception from `chunks` removes the temp file and propagates as is.
        """
        path = self._path(key)
        self._require_root()
        try:
            self._make_dirs(path.parent)
        except OSError as exc:
            raise self._unavailable(f"put {key}", exc) from exc
        result = self._write_atomic(key, path, chunks)
        log.debug(
            "storage.put_completed", destination=self.name, key=key, size_bytes=result.size_bytes
        )
        return result

    def _write_atomic(self, key: str, path: Path, chunks: Iterable[bytes]) -> PutResult:
        """Write `chunks` to a temp file beside `path`, fsync, rename over it, fsync the dir.

        The directory must exist. StorageUnavailable on OSError; anything `chunks` raises
        propagates as is; either way the temp file is removed.
        """
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", dir=path.parent)
        except OSError as exc:
            raise self._unavailable(f"put {key}", exc) from exc
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                writeback = Writeback(out.fileno(), out.flush)
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    writeback.wrote(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(path)
            sync_dir(path.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._unavailable(f"put {key}", exc) from exc
            raise
        return PutResult(key=key, size_bytes=size, sha256=digest.hexdigest())

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the object's bytes from `offset` (`length` of them, or to the end), ~1 MiB a chunk.

        Raises (when iterated) ObjectNotFound if absent, StorageUnavailable on read errors,
        ValueError for an invalid key or a negative offset/length.
        """
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        path = self._path(key)
        return self._read(key, path, offset, length)

    def _read(self, key: str, path: Path, offset: int, length: int | None) -> Iterator[bytes]:
        self._require_root()
        try:
            handle = path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        except OSError as exc:
            raise self._unavailable(f"open {key}", exc) from exc
        with handle:
            try:
                handle.seek(offset)
                remaining = length
                while remaining is None or remaining > 0:
                    want = (
                        READ_CHUNK_BYTES if remaining is None else min(remaining, READ_CHUNK_BYTES)
                    )
                    block = handle.read(want)
                    if not block:
                        return
                    if remaining is not None:
                        remaining -= len(block)
                    yield block
            except OSError as exc:
                raise self._unavailable(f"read {key}", exc) from exc

    def stat(self, key: str) -> ObjectInfo:
        """Size and mtime of `key`; ObjectNotFound if absent, StorageUnavailable on errors."""
        path = self._path(key)
        self._require_root()
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        except OSError as exc:
            raise self._unavailable(f"stat {key}", exc) from exc
        if not path.is_file():
            raise ObjectNotFound(f"{self.url}/{key} is not an object (it is a directory)")
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, prefix: str) -> Iterator[tuple[str, str, Path]]:
        """(directory key prefix, file name, path) of every file that may match `prefix`."""
        _check_prefix(prefix)
        self._require_root()
        start_key = prefix.rpartition("/")[0]
        start = self.root.joinpath(*start_key.split("/")) if start_key else self.root
        if not start.is_dir():
            return

        def fail(exc: OSError) -> None:
            raise self._unavailable(f"list {prefix!r}", exc)

        for dirpath, _dirnames, filenames in os.walk(start, onerror=fail):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            dir_key = "" if rel == "." else f"{rel}/"
            for name in filenames:
                yield dir_key, name, Path(dirpath, name)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key; never unfinished puts.

        Raises StorageUnavailable if the root is missing or unreadable.
        """
        found: list[ObjectInfo] = []
        for dir_key, name, path in self._walk(prefix):
            key = dir_key + name
            if _is_partial(name) or _is_lock(name) or not key.startswith(prefix):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # deleted while listing
            except OSError as exc:
                raise self._unavailable(f"list {prefix!r}", exc) from exc
            found.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC)))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def delete(self, key: str) -> None:
        """Remove `key` if present (a missing object is fine); StorageUnavailable on errors."""
        path = self._path(key)
        self._require_root()
        try:
            path.unlink(missing_ok=True)
            if path.parent.is_dir():
                sync_dir(path.parent)
        except NotADirectoryError:
            return
        except OSError as exc:
            raise self._unavailable(f"delete {key}", exc) from exc

    def abort_incomplete(self, prefix: str) -> int:
        """Delete temp files of unfinished puts whose key starts with `prefix`; returns how many.

        Callers must make sure no put under `prefix` is running (they hold the policy's lock).
        """
        removed = 0
        for dir_key, name, path in self._walk(prefix):
            if not _is_partial(name) or not (dir_key + _partial_target(name)).startswith(prefix):
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise self._unavailable(f"abort_incomplete {prefix!r}", exc) from exc
            removed += 1
        if removed:
            log.info("storage.incomplete_aborted", destination=self.name, count=removed)
        return removed

    def _read_current(self, key: str, path: Path) -> bytes | None:
        """The whole object at `path`, or None if there is none (a directory is none)."""
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise self._unavailable(f"read {key}", exc) from exc

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The whole object and its tag, the SHA-256 (hex) of its bytes.

        ObjectNotFound if absent, StorageUnavailable on read errors, ValueError for a bad key.
        """
        path = self._path(key)
        self._require_root()
        data = self._read_current(key, path)
        if data is None:
            raise ObjectNotFound(f"{self.url}/{key} does not exist")
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes, *, expected: str | None) -> str:
        """Store `data` at `key` if its current tag is `expected` (None: if there is no object).

        Writers are serialized by an flock on the key's sidecar, so the compare and the atomic
        rename happen as one step for every put_if writer (also across processes on this host).
        Returns the new tag; PreconditionFailed if the tag differs, StorageUnavailable on I/O
        errors, ValueError for a bad key.
        """
        path = self._path(key)
        self._require_root()
        try:
            self._make_dirs(path.parent)
            lock_fd = os.open(
                path.parent / f".{path.name}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as exc:
            raise self._unavailable(f"put_if {key}", exc) from exc
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise self._unavailable(f"put_if {key}", exc) from exc
            current = self._read_current(key, path)
            tag = None if current is None else hashlib.sha256(current).hexdigest()
            if tag != expected:
                raise PreconditionFailed(
                    f"{self.url}/{key} changed: expected {expected or 'no object'}, "
                    f"found {tag or 'no object'}"
                )
            result = self._write_atomic(key, path, [data])
        finally:
            os.close(lock_fd)  # releases the flock
        log.debug("storage.put_if_completed", destination=self.name, key=key)
        return result.sha256


_: type[Storage] = LocalStorage
