"""read_artifact: a stored artifact back to its plaintext, checked, in two threads.

Against a real local destination (files in a temp directory); the artifact is written the way a
backup writes it (zstd, then the encrypted stream).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drbot.errors import IntegrityFailure
from drbot.manifest import ArtifactRecord
from drbot.ops.artifacts import read_artifact
from drbot.pipeline.compress import compress_chunks
from drbot.pipeline.keys import WrappedKey
from drbot.pipeline.stream import encrypt_chunks
from drbot.storage.local import LocalStorage

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

DATA_KEY = bytes(range(32))
KEY = "p/backups/b1/base.tar.zst.enc"


class _Tracked(LocalStorage):
    """A local destination that notes when a reader of it is closed."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, root)
        self.closed = threading.Event()

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        return self._track(super().open(key, offset=offset, length=length))

    def _track(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from chunks
        finally:
            self.closed.set()


def _store(tmp_path: Path, plain: bytes) -> tuple[_Tracked, ArtifactRecord]:
    storage = _Tracked("d", tmp_path / "dest")
    storage.root.mkdir()
    pieces = (plain[i : i + 100_000] for i in range(0, len(plain), 100_000))
    stream = encrypt_chunks(compress_chunks(pieces, level=3), DATA_KEY, WrappedKey("k", b"w"))
    put = storage.put(KEY, stream)
    rec = ArtifactRecord(
        name="base.tar",
        kind="pg_basebackup",
        key=KEY,
        size_bytes=put.size_bytes,
        sha256=put.sha256,
        plaintext_bytes=len(plain),
    )
    return storage, rec


def _plain(size: int) -> bytes:
    # Hex digits of random bytes: about 2x at zstd level 3, so many frames.
    return os.urandom(size // 2).hex().encode()


def test_round_trip(tmp_path: Path) -> None:
    plain = _plain(5 << 20)
    storage, rec = _store(tmp_path, plain)
    digest, size = hashlib.sha256(), 0
    for chunk in read_artifact(storage, rec, DATA_KEY):
        assert chunk
        digest.update(chunk)
        size += len(chunk)
    assert (size, digest.digest()) == (len(plain), hashlib.sha256(plain).digest())


def test_a_consumer_that_stops_early_stops_the_reading_thread(tmp_path: Path) -> None:
    storage, rec = _store(tmp_path, _plain(32 << 20))  # 16 MiB stored: 4x what is read ahead
    before = set(threading.enumerate())
    chunks = read_artifact(storage, rec, DATA_KEY)
    assert next(chunks)
    started = [t for t in set(threading.enumerate()) - before if t.name == "prefetch"]
    assert len(started) == 1  # reading ahead, blocked on its full queue
    chunks.close()  # returns once the thread has stopped
    assert storage.closed.is_set(), "the destination's reader was not closed"
    assert not started[0].is_alive()


def test_a_changed_object_fails_naming_it(tmp_path: Path) -> None:
    storage, rec = _store(tmp_path, _plain(3 << 20))
    path = storage.root / KEY
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityFailure, match=f"^d:{KEY}: .*authentication"):
        for _chunk in read_artifact(storage, rec, DATA_KEY):
            pass


@pytest.mark.parametrize(
    ("sha256", "recorded_minus_stored", "problem"),
    [
        ("0" * 64, 0, "SHA-256 .* does not match the manifest"),
        (None, 1, r"\d+ bytes, the manifest records"),
        (None, -1, "longer than the"),
    ],
)
def test_an_object_unlike_its_record_never_yields_the_whole_plaintext(
    tmp_path: Path, sha256: str | None, recorded_minus_stored: int, problem: str
) -> None:
    """The object authenticates, but its size or SHA-256 is not what the manifest records: the
    check fails before the last frame is released, so a consumer never sees a whole stream."""
    plain = _plain(3 << 20)
    storage, rec = _store(tmp_path, plain)
    rec = dataclasses.replace(
        rec,
        sha256=sha256 or rec.sha256,
        size_bytes=rec.size_bytes + recorded_minus_stored,
    )
    got: list[int] = []
    with pytest.raises(IntegrityFailure, match=f"^d:{KEY}: {problem}"):
        got.extend(map(len, read_artifact(storage, rec, DATA_KEY)))
    assert sum(got) < len(plain)
