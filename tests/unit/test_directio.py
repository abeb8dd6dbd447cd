"""Restored files written past the page cache: the bytes on disk are exactly the bytes given,
whatever the size against the alignment, and a refusal of O_DIRECT falls back without loss."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import stat
from pathlib import Path

import pytest

from drbot import directio
from drbot.directio import ALIGN, BUFFER_BYTES, DIRECT_MIN, FileWriter

pytestmark = pytest.mark.unit

SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1]
SIZES += [3 * BUFFER_BYTES + 123, 2 * BUFFER_BYTES]


def _write(writer: FileWriter, path: Path, data: bytes, rng: random.Random) -> None:
    writer.open(path, 0o640, len(data))
    view = memoryview(data)
    while view:
        step = rng.choice([1, 511, 4096, 70_000, BUFFER_BYTES, 3 * BUFFER_BYTES])
        writer.write(view[:step])
        view = view[step:]
    writer.close(1_700_000_000)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_files_of_every_size_are_written_exactly(tmp_path: Path) -> None:
    rng = random.Random(3)
    writer = FileWriter()
    try:
        for size in SIZES:
            data = rng.randbytes(size)
            path = tmp_path / f"f{size}"
            _write(writer, path, data, rng)
            assert path.read_bytes() == data, size
            info = path.stat()
            assert stat.S_IMODE(info.st_mode) == 0o640
            assert int(info.st_mtime) == 1_700_000_000
        # On this file system (the test machine's ext4) large files did go past the cache.
        writer.open(tmp_path / "probe", 0o600, DIRECT_MIN)
        assert writer.direct == writer.direct_ok
        writer.abandon()
    finally:
        writer.release()


def test_a_refused_direct_write_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that opens with O_DIRECT but refuses the write (or wants larger blocks):
    the same bytes land through the page cache, and later files do not try again."""
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if _is_direct(fd):
            refused.append(offset)
            if offset >= BUFFER_BYTES:  # the first buffer went through: a refusal midway
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    rng = random.Random(4)
    writer = FileWriter()
    try:
        data = rng.randbytes(3 * BUFFER_BYTES + 5)
        _write(writer, tmp_path / "big", data, rng)
        assert (tmp_path / "big").read_bytes() == data
        assert (tmp_path / "big").stat().st_size == len(data)
        assert not writer.direct_ok
        after = rng.randbytes(2 * DIRECT_MIN)
        _write(writer, tmp_path / "after", after, rng)
        assert (tmp_path / "after").read_bytes() == after
    finally:
        writer.release()
    if directio._O_DIRECT:
        assert refused  # the direct path was tried before it was given up


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & directio._O_DIRECT)
