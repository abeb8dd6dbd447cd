"""Unpacking a base backup's tar stream: what pg_basebackup writes is restored exactly, in any
chunking; anything else is refused before it touches the file system outside the target."""

from __future__ import annotations

import io
import os
import random
import stat
import tarfile
import threading
from collections.abc import Sequence
from pathlib import Path

import crc32c
import pytest

from drbot.directio import DIRECT_MIN, FileWriter
from drbot.durable import sync_dir, sync_tree
from drbot.engines.postgres.untar import TarExtractor
from drbot.errors import IntegrityFailure

pytestmark = pytest.mark.unit


def _archive(
    members: Sequence[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.USTAR_FORMAT
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(
    name: str, data: bytes, mode: int = 0o600, mtime: int = 1_700_000_000
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, mtime
    return info, data


def _dir(name: str, mode: int = 0o700) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def _unpack(archive: bytes, root: Path, seed: int = 0) -> TarExtractor:
    rng = random.Random(seed)
    extractor = TarExtractor(root)
    pos = 0
    try:
        while pos < len(archive):
            step = rng.choice([1, 7, 511, 512, 513, 4096, 1 << 20])
            extractor.feed(archive[pos : pos + step])
            pos += step
        extractor.finish()
    finally:
        extractor.release()
    return extractor


SEGMENT = random.Random(5).randbytes(3 * 8192 + 17)


def _cluster() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        _file("PG_VERSION", b"15\n"),
        _dir("base"),
        _dir("base/1"),
        _file("base/1/1259", SEGMENT),
        _file("base/1/empty", b""),
        _file("global/pg_control", bytes(8192), mode=0o640),  # parent not listed first
        _dir("pg_wal", mode=0o750),
        _file("pg_wal/000000010000000000000002", bytes(512)),
        _file("backup_manifest", b'{"PostgreSQL-Backup-Manifest-Version": 1}\n'),
    ]


@pytest.mark.parametrize("seed", range(6))
def test_files_directories_and_modes_are_restored_exactly(tmp_path: Path, seed: int) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o700)
    extractor = _unpack(_archive(_cluster()), root, seed)
    assert (root / "base/1/1259").read_bytes() == SEGMENT
    assert (root / "base/1/empty").read_bytes() == b""
    assert (root / "global/pg_control").read_bytes() == bytes(8192)
    assert (root / "PG_VERSION").read_bytes() == b"15\n"
    assert stat.S_IMODE((root / "base/1/1259").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "global/pg_control").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "pg_wal").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "global").stat().st_mode) == 0o700
    assert int((root / "base/1/1259").stat().st_mtime) == 1_700_000_000
    assert extractor.members == 9
    assert extractor.data_bytes == sum(len(data) for _info, data in _cluster() if data)
    # What the backup_manifest check compares: each file's size and CRC-32C, by its tar name.
    assert extractor.files == {
        info.name: (len(data), crc32c.crc32c(data)) for info, data in _cluster() if data is not None
    }


def test_many_files_over_several_writers_each_get_their_own_bytes(tmp_path: Path) -> None:
    """Files spread over the writers in any order of sizes, large ones past the page cache."""
    rng = random.Random(11)
    sizes = [0, 5, 8192, DIRECT_MIN + 4097, 3, 2 * DIRECT_MIN, 100_000, 1] * 4
    members = [_file(f"base/5/{i}", rng.randbytes(size)) for i, size in enumerate(sizes)]
    root = tmp_path / "data"
    root.mkdir()
    extractor = TarExtractor(root, writers=3)
    archive = _archive(members)
    try:
        for pos in range(0, len(archive), 300_001):
            extractor.feed(archive[pos : pos + 300_001])
        extractor.finish()
    finally:
        extractor.release()
    for info, data in members:
        assert (root / info.name).read_bytes() == data
    assert len(extractor.files) == len(members)


def test_a_write_that_fails_is_raised_and_leaves_no_file_open(tmp_path: Path) -> None:
    """A file member where the archive made a directory: the writer's OSError reaches the
    caller (from feed or finish), and release closes what it had open."""
    root = tmp_path / "data"
    root.mkdir()
    before = set(os.listdir("/proc/self/fd"))
    members = [_dir("base"), _file("base", b"x" * 10), _file("after", b"y" * 10)]
    with pytest.raises(IsADirectoryError):
        _unpack(_archive(members), root)
    assert set(os.listdir("/proc/self/fd")) == before


def test_a_long_name_uses_the_ustar_prefix(tmp_path: Path) -> None:
    name = "base/16384/" + "d" * 90 + "/" + "f" * 60
    _unpack(_archive([_file(name, b"deep")]), tmp_path)
    assert (tmp_path / name).read_bytes() == b"deep"


def test_an_archive_without_its_end_marker_is_truncated(tmp_path: Path) -> None:
    whole = _archive(_cluster())
    body = whole[: len(whole) - 1024 * 9]  # drop the two zero blocks and the padding
    for cut in (len(body), len(body) - 100, 700):
        root = tmp_path / f"cut{cut}"
        root.mkdir()
        with pytest.raises(IntegrityFailure, match="ends early"):
            _unpack(body[:cut], root)


@pytest.mark.parametrize(
    "member",
    [
        pytest.param(("symlink", tarfile.SYMTYPE), id="symlink"),
        pytest.param(("hardlink", tarfile.LNKTYPE), id="hardlink"),
        pytest.param(("device", tarfile.CHRTYPE), id="device"),
        pytest.param(("fifo", tarfile.FIFOTYPE), id="fifo"),
    ],
)
def test_links_and_special_files_are_refused(tmp_path: Path, member: tuple[str, bytes]) -> None:
    info = tarfile.TarInfo(member[0])
    info.type = member[1]
    info.linkname = "/etc/passwd"
    with pytest.raises(IntegrityFailure, match="only files and directories"):
        _unpack(_archive([(info, None)]), tmp_path)
    assert not os.path.lexists(tmp_path / member[0])


@pytest.mark.parametrize("name", ["/etc/cron.d/x", "../escape", "base/../../escape", "a/../../b"])
def test_names_outside_the_target_are_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    info, data = _file("placeholder", b"evil")
    archive = bytearray(_archive([(info, data)]))
    # tarfile will not write such names; put one into the header by hand, checksum fixed.
    archive[0:100] = name.encode().ljust(100, b"\0")
    archive[148:156] = b" " * 8
    archive[148:156] = f"{sum(archive[:512]):06o}\0 ".encode()
    with pytest.raises(IntegrityFailure, match="outside the data directory"):
        _unpack(bytes(archive), root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert list(root.iterdir()) == []


def test_pax_and_gnu_extensions_are_refused(tmp_path: Path) -> None:
    long = "x" * 120  # too long for ustar's name alone, and no "/" to split at a prefix
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        with pytest.raises(IntegrityFailure, match="only files and directories"):
            _unpack(_archive([_file(long, b"a")], fmt=fmt), tmp_path)
        assert list(tmp_path.iterdir()) == []


def test_a_header_that_is_not_tar_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IntegrityFailure, match="no ustar header"):
        _unpack(b"PGDMP" + bytes(2000), tmp_path)


def test_a_damaged_header_is_refused(tmp_path: Path) -> None:
    archive = bytearray(_archive(_cluster()))
    archive[130] ^= 0x01  # inside the first member's size field
    with pytest.raises(IntegrityFailure, match="bad header checksum"):
        _unpack(bytes(archive), tmp_path)


def test_sync_tree_fsyncs_every_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a restore leaves must survive a power cut: each file, each directory (their
    names), the root. The writeback started while unpacking is advice, not a substitute."""
    root = tmp_path / "data"
    root.mkdir()
    _unpack(_archive(_cluster()), root)
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    sync_tree(root)
    everything = {str(p) for p in root.rglob("*")} | {str(root)}
    assert set(synced) == everything
    assert len(synced) == len(everything)
    sync_dir(tmp_path)
    assert synced[-1] == str(tmp_path)


def test_a_file_named_twice_is_refused(tmp_path: Path) -> None:
    """Two copies of one name could go to two writers and interleave on disk."""
    members = [_file("base/1/1259", b"first"), _file("base/1/1259", b"second")]
    with pytest.raises(IntegrityFailure, match="appears twice"):
        _unpack(_archive(members), tmp_path)


def test_a_file_whose_size_on_disk_differs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checksums are taken of the bytes handed to the file system; what lands is checked
    by size (here O_DIRECT's padding left in place, as a broken ftruncate would)."""
    monkeypatch.setattr("drbot.directio.DIRECT_MIN", 1)
    probe = FileWriter()
    probe.open(tmp_path / "probe", 0o600, 1)
    direct = probe.direct
    probe.release()
    if not direct:
        pytest.skip("this file system refuses O_DIRECT: no padding to leave behind")
    monkeypatch.setattr(os, "ftruncate", lambda fd, size: None)
    (tmp_path / "probe").unlink()
    with pytest.raises(IntegrityFailure, match="bytes on disk"):
        _unpack(_archive([_file("PG_VERSION", b"15\n")]), tmp_path)


def test_release_midway_drops_queued_work_and_stops_every_writer(tmp_path: Path) -> None:
    """A failed or interrupted restore: no writer thread left (nothing can be written behind
    the removal of the directory), no file open, and the extractor refuses more input."""
    rng = random.Random(2)
    members = [_file(f"f{i}", rng.randbytes(200_000)) for i in range(40)]
    archive = _archive(members)
    before = set(os.listdir("/proc/self/fd"))
    extractor = TarExtractor(tmp_path, writers=2)
    extractor.feed(archive[: len(archive) // 2])
    extractor.release()
    assert not [t for t in threading.enumerate() if t.name.startswith("untar-")]
    assert set(os.listdir("/proc/self/fd")) == before
    with pytest.raises(RuntimeError, match="after finish"):
        extractor.feed(archive[len(archive) // 2 :])
