"""Writeback while writing: every WRITEBACK_EVERY bytes a file's written pages are handed to the
disk, after any buffered ones reach the kernel; local objects and unpacked files both do it."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from drbot import durable
from drbot.durable import Writeback
from drbot.engines.postgres.untar import TarExtractor
from drbot.storage.local import LocalStorage

pytestmark = pytest.mark.unit

EVERY = 64 * 1024


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(fd, the file's size as the kernel sees it) for each writeback started."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(durable, "WRITEBACK_EVERY", EVERY)
    monkeypatch.setattr(
        durable, "start_writeback", lambda fd: calls.append((fd, os.fstat(fd).st_size))
    )
    return calls


def test_every_so_many_bytes_and_not_before(started: list[tuple[int, int]], tmp_path: Path) -> None:
    flushed: list[int] = []
    with open(tmp_path / "f", "wb") as out:
        writeback = Writeback(out.fileno(), lambda: flushed.append(len(started)))
        writeback.wrote(EVERY - 1)
        assert started == []
        writeback.wrote(1)
        assert [fd for fd, _ in started] == [out.fileno()]
        assert flushed == [0]  # flushed before writeback started
        writeback.wrote(EVERY - 1)
        assert len(started) == 1  # the count started again
        writeback.wrote(3 * EVERY)
        assert len(started) == 2


def test_local_put_hands_written_bytes_to_the_disk(
    started: list[tuple[int, int]], tmp_path: Path
) -> None:
    storage = LocalStorage("d", tmp_path)
    chunks = [bytes([i]) * 10_000 for i in range(40)]  # 400,000 bytes
    storage.put("obj", chunks)
    assert (tmp_path / "obj").read_bytes() == b"".join(chunks)
    # One each time 65,536 more bytes were written (in 10,000-byte chunks), each after those
    # bytes were flushed from Python's buffer into the file; the final fsync does the rest.
    assert [size for _, size in started] == [70_000, 140_000, 210_000, 280_000, 350_000]


def test_unpacking_hands_each_file_to_the_disk(
    started: list[tuple[int, int]], tmp_path: Path
) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size in (("big", 3 * EVERY + 5), ("small", 10)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    extractor = TarExtractor(tmp_path, writers=1)  # one writer: the two files in tar order
    data = out.getvalue()
    extractor.feed(data[:512])  # the first header, so that file data comes in 4 KiB pieces
    for pos in range(512, len(data), 4096):
        extractor.feed(data[pos : pos + 4096])
    extractor.finish()
    # Three while the big file is written, then one at each file's close.
    assert [size for _, size in started] == [EVERY, 2 * EVERY, 3 * EVERY, 3 * EVERY + 5, 10]
