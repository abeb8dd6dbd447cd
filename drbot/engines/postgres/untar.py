"""Unpack a base backup's tar stream into a directory as it arrives.

Written for what pg_basebackup produces instead of using `tarfile`: tarfile's stream mode reads
10 KiB at a time and copies every read, which made unpacking the slowest stage of a physical
restore. Here each chunk's file contents go to `os.write` as slices of the chunk itself.

Only what pg_basebackup writes is accepted: ustar regular files and directories with relative
names and no `..` component. Anything else (links, devices, pax or GNU extensions, absolute
names) fails with `IntegrityFailure`, as tarfile's "data" filter would refuse it; with
tablespaces refused at backup time, a PostgreSQL base backup holds nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from drbot.durable import Writeback
from drbot.engines.postgres.basebackup import tar_number
from drbot.errors import IntegrityFailure

_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # 7: contiguous file, a regular file to every reader
_DIR_TYPE = b"5"
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class TarExtractor:
    """Feed it the archive in chunks of any size; `finish()` confirms the archive ended.

    Files get mode 0600 and directories 0700, plus group read (and search) where the archive
    grants it: PostgreSQL's own modes for a data directory, with or without group access.
    Raises `IntegrityFailure` for a member it will not write, and `OSError` from the file system.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.members = 0
        self.data_bytes = 0
        self._header = bytearray()
        self._fd = -1
        self._left = 0  # content bytes of the current file still to write
        self._pad = 0  # padding after it
        self._mtime = 0
        self._writeback = Writeback(-1)  # the current file's
        self._ended = False
        self._made: set[Path] = {root}

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view and not self._ended:
            if self._left:
                take = min(self._left, len(view))
                piece = view[:take]
                while piece:
                    piece = piece[os.write(self._fd, piece) :]
                self._left -= take
                self._writeback.wrote(take)
                view = view[take:]
                if not self._left:
                    self._close_file()
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
        """Close the file being written, if any (idempotent; for failures midway)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self) -> None:
        """`IntegrityFailure` unless the archive's end marker was seen."""
        self.release()
        if not self._ended:
            raise IntegrityFailure(
                f"the base backup's tar stream ends early (after {self.members} members)"
            )

    def _member(self, block: bytes) -> None:
        if block == bytes(_BLOCK):
            self._ended = True
            return
        if block[257:262] != b"ustar":
            raise IntegrityFailure(f"tar member {self.members + 1} has no ustar header")
        stored = sum(block[:148]) + 8 * 32 + sum(block[156:])
        if tar_number(block[148:156]) != stored:
            raise IntegrityFailure(f"tar member {self.members + 1} has a bad header checksum")
        name = block[:100].split(b"\0", 1)[0]
        prefix = block[345:500].split(b"\0", 1)[0]
        raw = (prefix + b"/" + name) if prefix else name
        path = self._path(raw.decode("utf-8", errors="surrogateescape"))
        kind = block[156:157]
        mode = tar_number(block[100:108])
        size = tar_number(block[124:136])
        self.members += 1
        if kind == _DIR_TYPE:
            self._mkdir(path, 0o700 | (mode & 0o050))
            return
        if kind not in _FILE_TYPES:
            raise IntegrityFailure(
                f"tar member {raw!r} has type {kind!r}: a base backup holds only files and "
                "directories (tablespace links are not supported)"
            )
        self._mkdir(path.parent, 0o700)
        self._fd = os.open(path, _OPEN_FLAGS, 0o600 | (mode & 0o040))
        self._writeback = Writeback(self._fd)
        self._mtime = tar_number(block[136:148])
        self._left = size
        self._pad = -size % _BLOCK
        self.data_bytes += size
        if not size:
            self._close_file()

    def _close_file(self) -> None:
        os.utime(self._fd, (self._mtime, self._mtime))
        # Writing to disk starts now, while the next files are unpacked, so the fsyncs at the
        # end of the restore (sync_tree) mostly find the work done.
        self._writeback.start()
        os.close(self._fd)
        self._fd = -1

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
