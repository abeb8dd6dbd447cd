"""Which copy of a WAL file a restore gets, when destinations disagree or some are down."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from drbot.engines.postgres.wal import Segment
from drbot.errors import IntegrityFailure, StorageUnavailable
from drbot.ops.walfetch import NotInArchive, SpoolProgress, fetch_wal_file
from drbot.ops.walstore import KeyCache, WalShipper
from drbot.pipeline.filekey import FileKeyProvider, generate_key_file
from drbot.storage import layout
from drbot.storage.memory import MemoryStorage

pytestmark = pytest.mark.unit

SIZE = 16 * 1024 * 1024
SEG = Segment(1, 5)
NAME = SEG.name(SIZE)


def _segment_bytes(length: int, fill: int) -> bytes:
    header = struct.pack("<HHIQI", 0xD110, 0x0002, 1, SEG.start_lsn(SIZE), 0) + bytes(4)
    header += struct.pack("<QII", 42, SIZE, 8192)
    return header + bytes([fill]) * (length - len(header))


@pytest.fixture
def keys(tmp_path: Path) -> FileKeyProvider:
    path = tmp_path / "k.key"
    generate_key_file(path)
    return FileKeyProvider(path)


def _store(storage: MemoryStorage, keys: FileKeyProvider, data: bytes, *, partial: bool) -> None:
    key = layout.wal_segment_key("p", NAME, partial=partial)
    assert WalShipper("p", [storage], keys).put(key, data) == {}


def _fetch(storages: list[MemoryStorage], keys: FileKeyProvider) -> bytes:
    return fetch_wal_file("p", NAME, storages, KeyCache(keys), system_identifier=42)


def test_the_longest_partial_wins_whatever_the_order(keys: FileKeyProvider) -> None:
    east, west = MemoryStorage("east"), MemoryStorage("west")
    _store(east, keys, _segment_bytes(1000, 1), partial=True)
    _store(west, keys, _segment_bytes(3000, 1), partial=True)  # shipped later: east missed it
    for order in ([east, west], [west, east]):
        data = _fetch(order, keys)
        assert len(data) == SIZE
        assert data[:3000] == _segment_bytes(3000, 1)
        assert data[3000:] == bytes(SIZE - 3000)


def test_a_complete_segment_beats_any_partial(keys: FileKeyProvider) -> None:
    east, west = MemoryStorage("east"), MemoryStorage("west")
    _store(east, keys, _segment_bytes(5000, 1), partial=True)
    _store(west, keys, _segment_bytes(SIZE, 2), partial=False)
    assert _fetch([east, west], keys) == _segment_bytes(SIZE, 2)


def test_a_damaged_complete_copy_falls_back_to_a_good_one_never_to_a_partial(
    keys: FileKeyProvider,
) -> None:
    east, west = MemoryStorage("east"), MemoryStorage("west")
    _store(east, keys, _segment_bytes(SIZE, 2), partial=False)
    _store(west, keys, _segment_bytes(SIZE, 2), partial=False)
    _store(west, keys, _segment_bytes(4000, 1), partial=True)
    key = layout.wal_segment_key("p", NAME)
    body, when = east.objects[key]
    east.objects[key] = (body[:-1] + bytes([body[-1] ^ 1]), when)
    assert _fetch([east, west], keys) == _segment_bytes(SIZE, 2)
    west.objects[key] = east.objects[key]
    with pytest.raises(IntegrityFailure):
        _fetch([east, west], keys)  # not the partial: it holds less than the segment did


def test_down_destinations_do_not_hide_the_end_of_the_archive(keys: FileKeyProvider) -> None:
    east, west = MemoryStorage("east"), MemoryStorage("west")
    _store(west, keys, _segment_bytes(2000, 1), partial=True)
    east.unreachable = True
    # the partial in the region that answers is used ...
    assert _fetch([east, west], keys)[:2000] == _segment_bytes(2000, 1)
    # ... and a file nobody that answered has is the end of the archive, not a failure
    with pytest.raises(NotInArchive):
        fetch_wal_file("p", Segment(1, 6).name(SIZE), [east, west], KeyCache(keys))
    west.unreachable = True
    with pytest.raises(StorageUnavailable):
        fetch_wal_file("p", Segment(1, 6).name(SIZE), [east, west], KeyCache(keys))


def test_spool_progress_counts_untaken_segments_and_keeps_the_last_two_taken(
    tmp_path: Path,
) -> None:
    names = [Segment(1, n).name(SIZE) for n in range(5)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / f"{name}.sha256").write_text("x\n")
    progress = SpoolProgress(tmp_path, names)
    assert progress.pending(placed=5) == 5
    for name in names[:3]:
        (tmp_path / f"{name}.taken").touch()
    assert progress.pending(placed=5) == 2
    # taken files before the last two taken are gone; the server may ask for the last again
    assert not (tmp_path / names[0]).exists()
    assert not (tmp_path / f"{names[0]}.sha256").exists()
    assert all((tmp_path / n).exists() for n in names[1:])
