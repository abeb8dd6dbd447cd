"""Unpack a base backup's tar stream into a directory as it arrives.

Written for what pg_basebackup produces instead of using `tarfile`: tarfile's stream mode reads
10 KiB at a time and copies every read, which made unpacking the slowest stage of a physical
restore. Here the thread parsing the stream only checks headers and hands out file contents as
slices of the chunks themselves.

Files are written by a few threads (`directio.FileWriter`, large files past the page cache),
each file by one of them from its open to its close, so that creating one file and writing
another overlap (both release the GIL; creating a file took about 0.7 ms here, a third of a
physical restore's unpacking for a cluster of 1,300 files).

Only what pg_basebackup writes is accepted: ustar regular files and directories with relative
names and no `..` component. Anything else (links, devices, pax or GNU extensions, absolute
names) fails with `IntegrityFailure`, as tarfile's "data" filter would refuse it; with
tablespaces refused at backup time, a PostgreSQL base backup holds nothing else.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path, PurePosixPath

import crc32c

from drbot.directio import FileWriter
from drbot.engines.postgres.basebackup import read_header
from drbot.errors import IntegrityFailure

_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # 7: contiguous file, a regular file to every reader
_DIR_TYPE = b"5"
WRITERS = min(4, os.cpu_count() or 1)
"""Threads writing files: more would only wait for the disk, fewer leaves file creation serial."""
_QUEUED = 8  # pieces (up to a decompressed chunk each) waiting per writer: bounds the memory


class _Writer:
    """One thread that opens, writes and closes files in the order it is told to.

    The first exception is kept in `error` (and the file it hit closed); later work is
    skipped, so the thread keeps draining its queue and the feeder never blocks on a dead writer.
    The same once `end(discard=True)` is called: a failed restore writes nothing more.
    """

    def __init__(self, name: str, done: dict[str, tuple[int, int]]) -> None:
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, object, int] | None] = queue.Queue(_QUEUED)
        self._file = FileWriter()
        self._done = done  # shared by the writers: name -> (size, CRC-32C), once closed
        self._name = ""
        self._size = 0
        self._crc = 0
        self._discard = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, op: int, arg: object = None, number: int = 0) -> None:
        self._queue.put((op, arg, number))

    def load(self) -> int:
        return self._queue.qsize()

    def end(self, *, discard: bool) -> None:
        """Tell the thread to end after what is queued (or, with `discard`, without doing it)."""
        self._discard = self._discard or discard
        self._queue.put(None)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            while (task := self._queue.get()) is not None:
                if self.error is not None or self._discard:
                    continue
                try:
                    self._do(*task)
                except BaseException as exc:  # kept for the feeder, which raises it
                    self.error = exc
                    with contextlib.suppress(OSError):  # the thread must live on to drain
                        self._file.abandon()
        finally:
            with contextlib.suppress(OSError):  # only a failure leaves a file open here
                self._file.release()

    def _do(self, op: int, arg: object, number: int) -> None:
        if op == _WRITE:
            assert isinstance(arg, memoryview)
            self._crc = crc32c.crc32c(arg, self._crc)
            self._size += len(arg)
            self._file.write(arg)
        elif op == _OPEN:
            assert isinstance(arg, tuple)
            self._name, path, mode = arg
            self._size = self._crc = 0
            self._file.open(path, mode, number)
        else:
            self._file.close(number)
            self._done[self._name] = (self._size, self._crc)


_OPEN, _WRITE, _CLOSE = 0, 1, 2


class TarExtractor:
    """Feed it the archive in chunks of any size; `finish()` confirms the archive ended and
    every file was written; `release()` (always, also after a failure) stops the writers.

    Files get mode 0600 and directories 0700, plus group read (and search) where the archive
    grants it: PostgreSQL's own modes for a data directory, with or without group access.
    Raises `IntegrityFailure` for a member it will not write, and `OSError` from the file system
    (from `feed` or `finish`, possibly for a file handed to a writer earlier).
    """

    def __init__(self, root: Path, writers: int = WRITERS) -> None:
        self.root = root
        self.members = 0
        self.data_bytes = 0
        self._header = bytearray()
        self._left = 0  # content bytes of the current file still to hand out
        self._pad = 0  # padding after it
        self._mtime = 0
        self._ended = False
        self._made: set[Path] = {root}
        self._names: set[str] = set()  # the files handed out
        self.files: dict[str, tuple[int, int]] = {}
        """Each file written, by its name in the archive: its size and CRC-32C (as the
        `backup_manifest` of PostgreSQL records them), complete after `finish`."""
        self._writers: list[_Writer] = []
        self._stopped = False
        try:
            for n in range(max(1, writers)):
                self._writers.append(_Writer(f"untar-{n}", self.files))
        except BaseException:
            self.release()
            raise
        self._writer = self._writers[0]  # the current file's

    def _stop(self, *, discard: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        # Every writer is told before any is waited for: an interrupt while waiting for one
        # still leaves the others ending (and, discarding, writing nothing more).
        for writer in self._writers:
            writer.end(discard=discard)
        for writer in self._writers:
            writer.join()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._stopped:
            raise RuntimeError("feed() after finish() or release()")
        self._raise_failure()
        # Pieces are written later, by other threads: they must be views of immutable bytes.
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        while view and not self._ended:
            if self._left:
                take = min(self._left, len(view))
                self._writer.put(_WRITE, view[:take])
                self._left -= take
                view = view[take:]
                if not self._left:
                    self._writer.put(_CLOSE, number=self._mtime)
                continue
            if self._pad:
                take = min(self._pad, len(view))
                self._pad -= take
                view = view[take:]
                continue
            take = _BLOCK - len(self._header)
            self._header += view[:take]
            view = view[take:]
            if len(self._header) == _BLOCK:
                block = bytes(self._header)
                self._header.clear()
                self._member(block)

    def release(self) -> None:
        """Stop the writers, dropping what they were handed and not yet written, and close any
        file left open (idempotent; for failures midway, and after `finish`). Files already
        written stay: the caller removes the directory."""
        self._stop(discard=True)

    def finish(self) -> None:
        """Wait for every file to be written and check each one's size on disk.

        `IntegrityFailure` unless the archive's end marker was seen, or if a file's size on
        disk is not what was written to it; the first writer's `OSError`, if one failed.
        """
        self._stop(discard=False)
        self._raise_failure()
        if not self._ended:
            raise IntegrityFailure(
                f"the base backup's tar stream ends early (after {self.members} members)"
            )
        # Metadata only, no data read back: a file cut short or left padded by the writing
        # (O_DIRECT's whole blocks) would otherwise pass the checksums taken while writing.
        for name, (size, _crc) in self.files.items():
            found = self._path(name).stat().st_size
            if found != size:
                raise IntegrityFailure(
                    f"unpacked file {name} has {found} bytes on disk, {size} were written"
                )

    def _raise_failure(self) -> None:
        for writer in self._writers:
            if writer.error is not None:
                raise writer.error

    def _member(self, block: bytes) -> None:
        self._raise_failure()  # once per member: a writer's failure stops the unpacking soon
        if block == bytes(_BLOCK):
            self._ended = True
            return
        header = read_header(block)
        if not header.ustar:
            raise IntegrityFailure(f"tar member {self.members + 1} has no ustar header")
        if not header.checksum_ok:
            raise IntegrityFailure(f"tar member {self.members + 1} has a bad header checksum")
        raw = header.name
        name = raw.decode("utf-8", errors="surrogateescape")
        path = self._path(name)
        kind, mode, size = header.kind, header.mode, header.size
        self.members += 1
        if kind == _DIR_TYPE:
            self._mkdir(path, 0o700 | (mode & 0o050))
            return
        if kind not in _FILE_TYPES:
            raise IntegrityFailure(
                f"tar member {raw!r} has type {kind!r}: a base backup holds only files and "
                "directories (tablespace links are not supported)"
            )
        if name in self._names:
            # Two writers could interleave two copies of one file; pg_basebackup writes none.
            raise IntegrityFailure(f"tar member {name!r} appears twice")
        self._names.add(name)
        self._mkdir(path.parent, 0o700)
        # The least busy writer: a small file need not wait behind a large one's pieces.
        self._writer = min(self._writers, key=_Writer.load)
        self._writer.put(_OPEN, (name, path, 0o600 | (mode & 0o040)), size)
        self._mtime = header.mtime
        self._left = size
        self._pad = header.padded_size - size
        self.data_bytes += size
        if not size:
            self._writer.put(_CLOSE, number=self._mtime)

    def _path(self, name: str) -> Path:
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts or "\0" in name:
            raise IntegrityFailure(f"tar member name {name!r} points outside the data directory")
        return self.root.joinpath(*parts)

    def _mkdir(self, path: Path, mode: int) -> None:
        if path in self._made:
            return
        self._mkdir(path.parent, 0o700)
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            if not path.is_dir() or path.is_symlink():
                raise IntegrityFailure(f"tar member {path} is a file and a directory") from None
        self._made.add(path)
