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


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    """`tmp_path`, where its file system takes O_DIRECT (ext4 and xfs do; tmpfs did not
    before Linux 6.6): elsewhere only the page-cache path could be tested."""
    if not directio._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | directio._O_DIRECT))
    except OSError as exc:
        pytest.skip(f"this file system refuses O_DIRECT: {exc}")
    return tmp_path


def test_files_of_every_size_are_written_exactly(direct_dir: Path) -> None:
    tmp_path = direct_dir
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
        # Large files did go past the page cache, small ones did not.
        writer.open(tmp_path / "probe", 0o600, DIRECT_MIN)
        assert writer.direct
        writer.abandon()
        writer.open(tmp_path / "probe", 0o600, DIRECT_MIN - 1)
        assert not writer.direct
        writer.abandon()
    finally:
        writer.release()


def test_a_refused_direct_write_falls_back_to_the_page_cache(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
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
    tmp_path = direct_dir
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
    assert refused  # the direct path was tried before it was given up


def test_a_refusal_at_open_falls_back_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open
    tried: list[str] = []

    def refuse(path: Path, flags: int, mode: int = 0o777) -> int:
        if flags & directio._O_DIRECT:
            tried.append(str(path))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(directio, "_O_DIRECT", 0o40000)  # also where the platform has none
    rng = random.Random(5)
    writer = FileWriter()
    try:
        for name in ("a", "b"):
            data = rng.randbytes(DIRECT_MIN + 3)
            _write(writer, tmp_path / name, data, rng)
            assert (tmp_path / name).read_bytes() == data
    finally:
        writer.release()
    assert tried == [str(tmp_path / "a")]  # once refused, never tried again


def test_a_failed_direct_write_is_raised_and_the_writer_still_releases(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC (or EIO) is not a refusal: it reaches the caller, and the buffer a failed write
    still references does not make release() fail."""

    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = FileWriter()
    writer.open(direct_dir / "big", 0o600, 2 * BUFFER_BYTES)
    monkeypatch.setattr(os, "pwrite", full)
    try:
        with pytest.raises(OSError, match="No space left") as failure:
            writer.write(memoryview(bytes(2 * BUFFER_BYTES)))
    finally:
        writer.release()
    assert failure.value.__traceback__ is not None  # still holding the failed write's frames
    assert writer.direct_ok  # ENOSPC says nothing about O_DIRECT


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & directio._O_DIRECT)
