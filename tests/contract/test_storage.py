"""The Storage contract, run against a local directory and S3 (moto's server) in two regions.

Conditional writes (`read_tagged` / `put_if`) also run against MemoryStorage, which the lease's
unit tests stand on.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from drbot.clock import FakeClock
from drbot.errors import (
    DrbotError,
    ObjectNotFound,
    PolicyInvalid,
    PreconditionFailed,
    StorageUnavailable,
)
from drbot.storage.base import ObjectLock, Storage
from drbot.storage.local import LocalStorage
from drbot.storage.memory import MemoryStorage
from drbot.storage.open import open_storage
from drbot.storage.s3 import S3Storage
from tests.fixtures.s3 import REGIONS, S3Server

pytestmark = pytest.mark.contract

MiB = 1 << 20
PART_SIZE = 5 * MiB
"""The smallest part S3 allows, so ~12 MiB objects take three parts."""
MULTIPART_SIZE = 12 * MiB + 12_345
PARTIAL_MARK = ".partial-"
"""How LocalStorage names the temp file of an unfinished put: `.<basename>.partial-<random>`."""
S3_PREFIX = "site/db"
"""The prefix of the eu-west-1 case, so key <-> bucket key mapping is exercised too."""


class SourceFailedError(Exception):
    """Raised by a chunk iterator to interrupt a put."""


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def failing(data: bytes, size: int) -> Iterator[bytes]:
    """The chunks of `data`, then SourceFailedError: a source that fails midway."""
    yield from chunked(data, size)
    raise SourceFailedError("the source failed midway")


def read_all(chunks: Iterable[bytes]) -> bytes:
    return b"".join(chunks)


@dataclass(frozen=True)
class StorageCase:
    """One implementation under test, with the hooks the contract needs to look behind it."""

    kind: str
    storage: Storage
    leftovers: Callable[[], list[str]]
    """Keys (relative to the storage) of unfinished puts still present in the backend."""
    make_leftover: Callable[[str], None]
    """Leave an unfinished put for `key` behind, as a crash would."""


# --- local ---------------------------------------------------------------------------------


def _local_leftovers(root: Path) -> list[str]:
    found: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        dir_key = "" if rel == "." else f"{rel}/"
        for name in files:
            if name.startswith(".") and PARTIAL_MARK in name:
                found.append(dir_key + name[1 : name.index(PARTIAL_MARK)])
    return sorted(found)


def _local_case(tmp_path: Path) -> StorageCase:
    root = tmp_path / "dest"
    root.mkdir()

    def make_leftover(key: str) -> None:
        path = root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".{path.name}{PARTIAL_MARK}xyz").write_bytes(b"half of an object")

    return StorageCase(
        kind="local",
        storage=LocalStorage("local-dest", root),
        leftovers=lambda: _local_leftovers(root),
        make_leftover=make_leftover,
    )


# --- S3 ------------------------------------------------------------------------------------


def _s3_storage(
    server: S3Server, bucket: str, region: str, prefix: str = "", **kwargs: Any
) -> S3Storage:
    return S3Storage(
        f"s3-{region}",
        bucket,
        prefix,
        region,
        endpoint_url=server.endpoint_url,
        part_size=PART_SIZE,
        **kwargs,
    )


def _uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return uploads


def _s3_case(server: S3Server, region: str, prefix: str) -> StorageCase:
    bucket = server.make_bucket(region)
    s3 = server.client("s3", region)
    full = (lambda key: f"{prefix}/{key}") if prefix else (lambda key: key)
    if prefix:
        # Neighbours outside the storage's prefix that it must never list or touch.
        for decoy in ("outside", f"{prefix}x/decoy", f"{prefix}-decoy"):
            s3.put_object(Bucket=bucket, Key=decoy, Body=b"not mine")

    def leftovers() -> list[str]:
        keys = [str(upload["Key"]) for upload in _uploads(s3, bucket)]
        return sorted(k[len(prefix) + 1 :] if prefix else k for k in keys)

    def make_leftover(key: str) -> None:
        s3.create_multipart_upload(Bucket=bucket, Key=full(key))

    return StorageCase(
        kind=f"s3-{region}",
        storage=_s3_storage(server, bucket, region, prefix),
        leftovers=leftovers,
        make_leftover=make_leftover,
    )


@pytest.fixture(params=["local", *(f"s3-{region}" for region in REGIONS)])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> StorageCase:
    if request.param == "local":
        return _local_case(tmp_path)
    aws_env: S3Server = request.getfixturevalue("aws_env")
    region = request.param.removeprefix("s3-")
    return _s3_case(aws_env, region, S3_PREFIX if region != "us-east-1" else "")


# --- the contract, for every implementation ------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk_size"),
    [
        pytest.param(0, 1, id="empty"),
        pytest.param(1, 1, id="one-byte"),
        pytest.param(3_000, 1_000, id="small"),
        pytest.param(PART_SIZE, 64 * 1024, id="exactly-one-part"),
        pytest.param(PART_SIZE + 1, 64 * 1024, id="one-part-plus-one"),
        pytest.param(MULTIPART_SIZE, 64 * 1024 + 7, id="multipart-many-small-chunks"),
        pytest.param(MULTIPART_SIZE, MULTIPART_SIZE, id="multipart-one-big-chunk"),
    ],
)
def test_put_then_open_round_trips(case: StorageCase, size: int, chunk_size: int) -> None:
    """What put stores, open yields back byte for byte; PutResult describes exactly those bytes."""
    data = payload(size)
    result = case.storage.put("obj/data.bin", chunked(data, chunk_size))
    assert result.key == "obj/data.bin"
    assert result.size_bytes == size
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert read_all(case.storage.open("obj/data.bin")) == data
    assert case.storage.stat("obj/data.bin").size_bytes == size
    assert [info.key for info in case.storage.list("")] == ["obj/data.bin"]
    assert case.leftovers() == []


def test_put_accepts_empty_chunks_and_a_list(case: StorageCase) -> None:
    """Empty chunks are harmless; any iterable of bytes will do."""
    result = case.storage.put("k", [b"", b"abc", b"", b"def", b""])
    assert result.size_bytes == 6
    assert read_all(case.storage.open("k")) == b"abcdef"


def test_put_with_no_chunks_stores_an_empty_object(case: StorageCase) -> None:
    """A put of nothing is an empty object, not a missing one."""
    case.storage.put("empty", iter(()))
    assert case.storage.stat("empty").size_bytes == 0
    assert read_all(case.storage.open("empty")) == b""
    assert read_all(case.storage.open("empty", offset=0, length=10)) == b""


RANGE_DATA_SIZE = 2 * MiB + 500  # crosses the ~1 MiB read chunks


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, None),
        (0, 0),
        (0, 1),
        (0, 100),
        (10, None),
        (1_000, 1_500),
        (MiB - 3, 10),  # across a read-chunk boundary
        (5, MiB * 2),  # to just short of the end
        (RANGE_DATA_SIZE - 1, None),
        (RANGE_DATA_SIZE - 1, 1),
        (RANGE_DATA_SIZE - 10, 100),  # length runs past the end: what there is
        (RANGE_DATA_SIZE, None),  # at the end: nothing
        (RANGE_DATA_SIZE, 5),
        (RANGE_DATA_SIZE + 10, None),  # after the end: nothing
        (RANGE_DATA_SIZE + 10, 5),
        (7, 0),
    ],
)
def test_open_yields_the_requested_range(
    case: StorageCase, offset: int, length: int | None
) -> None:
    """open(offset, length) yields data[offset:offset+length]; at or past the end, no bytes."""
    data = payload(RANGE_DATA_SIZE, seed=1)
    case.storage.put("ranged", chunked(data, MiB))
    end = None if length is None else offset + length
    got = list(case.storage.open("ranged", offset=offset, length=length))
    assert b"".join(got) == data[offset:end]
    assert all(isinstance(chunk, bytes) for chunk in got)


def test_open_chunks_are_bounded(case: StorageCase) -> None:
    """open streams: no chunk is the whole of a large object."""
    data = payload(MULTIPART_SIZE, seed=2)
    case.storage.put("big", chunked(data, MiB))
    sizes = [len(chunk) for chunk in case.storage.open("big")]
    assert sum(sizes) == len(data)
    assert max(sizes) <= 2 * MiB


def test_open_refuses_negative_ranges(case: StorageCase) -> None:
    """A negative offset or length is a programming error: ValueError."""
    case.storage.put("k", [b"abc"])
    with pytest.raises(ValueError, match="invalid range"):
        case.storage.open("k", offset=-1)
    with pytest.raises(ValueError, match="invalid range"):
        case.storage.open("k", length=-1)


def test_stat_reports_size_and_recent_time(case: StorageCase) -> None:
    """stat gives the key, its size and a timezone-aware modification time."""
    before = datetime.now(UTC)
    case.storage.put("dir/file", [b"x" * 1234])
    info = case.storage.stat("dir/file")
    assert info.key == "dir/file"
    assert info.size_bytes == 1234
    assert info.modified_at.tzinfo is not None
    assert (
        before - timedelta(minutes=5)
        <= info.modified_at
        <= datetime.now(UTC) + timedelta(minutes=5)
    )


def test_missing_object_is_object_not_found(case: StorageCase) -> None:
    """stat raises ObjectNotFound at once; open raises it when iterated, even for length 0."""
    case.storage.put("present", [b"here"])
    with pytest.raises(ObjectNotFound):
        case.storage.stat("absent")
    with pytest.raises(ObjectNotFound):
        case.storage.stat("present/below")
    chunks = case.storage.open("absent")  # lazy: nothing happens yet
    with pytest.raises(ObjectNotFound):
        read_all(chunks)
    with pytest.raises(ObjectNotFound):
        read_all(case.storage.open("absent", offset=0, length=0))
    with pytest.raises(ObjectNotFound):
        read_all(case.storage.open("nested/absent", offset=3, length=5))


def test_a_key_prefix_is_not_an_object(case: StorageCase) -> None:
    """Where only deeper keys exist, the 'directory' itself is not an object."""
    case.storage.put("a/b/c", [b"deep"])
    with pytest.raises(ObjectNotFound):
        case.storage.stat("a/b")
    with pytest.raises(ObjectNotFound):
        read_all(case.storage.open("a"))


LIST_KEYS = {
    "b": b"1",
    "ab": b"22",
    "a/2": b"333",
    "a/10": b"4444",
    "a/1": b"55555",
    "a/sub/deep/x": b"666666",
    "a-dash": b"7",
    "c/only": b"",
}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", sorted(LIST_KEYS)),
        ("a", ["a-dash", "a/1", "a/10", "a/2", "a/sub/deep/x", "ab"]),
        ("a/", ["a/1", "a/10", "a/2", "a/sub/deep/x"]),
        ("a/1", ["a/1", "a/10"]),
        ("a/s", ["a/sub/deep/x"]),
        ("a/sub/deep/", ["a/sub/deep/x"]),
        ("b", ["b"]),
        ("b/", []),
        ("c/", ["c/only"]),
        ("zzz", []),
        ("nothing/here/", []),
    ],
)
def test_list_is_sorted_and_filtered_by_prefix(
    case: StorageCase, prefix: str, expected: list[str]
) -> None:
    """list(prefix) yields exactly the keys starting with prefix, sorted, with their sizes."""
    for key in reversed(list(LIST_KEYS)):
        case.storage.put(key, [LIST_KEYS[key]])
    listed = list(case.storage.list(prefix))
    assert [info.key for info in listed] == expected
    for info in listed:
        assert info.size_bytes == len(LIST_KEYS[info.key])
        assert info.modified_at.tzinfo is not None


def test_list_of_an_empty_store_is_empty(case: StorageCase) -> None:
    assert list(case.storage.list("")) == []


def test_delete_removes_and_is_idempotent(case: StorageCase) -> None:
    """delete removes an object; deleting it again, or a key never stored, is fine."""
    case.storage.put("x/y", [b"data"])
    case.storage.put("x/z", [b"other"])
    case.storage.delete("x/y")
    with pytest.raises(ObjectNotFound):
        case.storage.stat("x/y")
    with pytest.raises(ObjectNotFound):
        read_all(case.storage.open("x/y"))
    assert [info.key for info in case.storage.list("")] == ["x/z"]
    case.storage.delete("x/y")
    case.storage.delete("never/stored")
    case.storage.delete("x/z/below-a-file")
    assert read_all(case.storage.open("x/z")) == b"other"


@pytest.mark.parametrize(
    ("old_size", "new_size"),
    [(100, 5), (5, 100), (MULTIPART_SIZE, 7), (7, MULTIPART_SIZE)],
)
def test_overwrite_replaces(case: StorageCase, old_size: int, new_size: int) -> None:
    """A put to an existing key replaces the object entirely."""
    old, new = payload(old_size, seed=3), payload(new_size, seed=4)
    case.storage.put("k/v", chunked(old, MiB))
    result = case.storage.put("k/v", chunked(new, MiB))
    assert result.size_bytes == new_size
    assert read_all(case.storage.open("k/v")) == new
    assert case.storage.stat("k/v").size_bytes == new_size
    assert [(i.key, i.size_bytes) for i in case.storage.list("k")] == [("k/v", new_size)]


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(0, id="before-any-chunk"),
        pytest.param(1_000, id="small"),
        pytest.param(6 * MiB, id="after-first-part"),
        pytest.param(11 * MiB, id="after-two-parts"),
    ],
)
def test_failed_put_leaves_nothing(case: StorageCase, sent: int) -> None:
    """If chunks raise midway, the error propagates and no object or partial upload remains."""
    with pytest.raises(SourceFailedError):
        case.storage.put("dir/failed", failing(payload(sent), 256 * 1024))
    assert list(case.storage.list("")) == []
    assert list(case.storage.list("dir/")) == []
    with pytest.raises(ObjectNotFound):
        case.storage.stat("dir/failed")
    with pytest.raises(ObjectNotFound):
        read_all(case.storage.open("dir/failed"))
    assert case.leftovers() == []
    assert case.storage.abort_incomplete("") == 0


def test_failed_overwrite_keeps_the_old_object(case: StorageCase) -> None:
    """A failed put over an existing key leaves the previous object as it was."""
    old = payload(3_000, seed=5)
    case.storage.put("keep", [old])
    with pytest.raises(SourceFailedError):
        case.storage.put("keep", failing(payload(7 * MiB), MiB))
    assert read_all(case.storage.open("keep")) == old
    assert [info.key for info in case.storage.list("")] == ["keep"]
    assert case.leftovers() == []


def test_interrupt_during_put_leaves_nothing(case: StorageCase) -> None:
    """A KeyboardInterrupt (not an Exception) raised by the source cleans up just the same."""

    def interrupted() -> Iterator[bytes]:
        yield from chunked(payload(6 * MiB), MiB)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        case.storage.put("ctrl-c", interrupted())
    assert list(case.storage.list("")) == []
    assert case.leftovers() == []


def test_abort_incomplete_removes_leftovers_under_prefix(case: StorageCase) -> None:
    """Leftovers of interrupted puts are never listed; abort_incomplete removes them by prefix."""
    case.storage.put("a/done", [b"complete"])
    case.make_leftover("a/unfinished")
    case.make_leftover("a/deeper/unfinished")
    case.make_leftover("b/unfinished")
    assert case.leftovers() == ["a/deeper/unfinished", "a/unfinished", "b/unfinished"]
    assert [info.key for info in case.storage.list("")] == ["a/done"]
    with pytest.raises(ObjectNotFound):
        case.storage.stat("a/unfinished")

    assert case.storage.abort_incomplete("a/") == 2
    assert case.leftovers() == ["b/unfinished"]
    assert case.storage.abort_incomplete("zzz") == 0
    assert case.storage.abort_incomplete("") == 1
    assert case.leftovers() == []
    assert case.storage.abort_incomplete("") == 0
    assert read_all(case.storage.open("a/done")) == b"complete"


def test_abort_incomplete_matches_partial_names(case: StorageCase) -> None:
    """The prefix applies to the key the unfinished put was writing, even mid-name."""
    case.make_leftover("logs/2024-01")
    case.make_leftover("logs/2025-01")
    assert case.storage.abort_incomplete("logs/2024") == 1
    assert case.leftovers() == ["logs/2025-01"]


def test_invalid_keys_are_refused(case: StorageCase) -> None:
    """An empty key or one with a leading '/' is a ValueError, never a stored object."""
    for key in ("", "/abs"):
        with pytest.raises(ValueError, match="invalid object key"):
            case.storage.put(key, [b"x"])
        with pytest.raises(ValueError, match="invalid object key"):
            case.storage.stat(key)
    assert list(case.storage.list("")) == []


def test_storage_describes_itself(case: StorageCase) -> None:
    """name, url and region are set as the protocol says."""
    assert case.storage.name
    if case.kind == "local":
        assert case.storage.url.startswith("file:///")
        assert case.storage.region is None
    else:
        assert case.storage.url.startswith("s3://")
        assert case.storage.region == case.kind.removeprefix("s3-")


# --- conditional writes, for every implementation (and memory) ---------------------------


@pytest.fixture(params=["memory", "local", *(f"s3-{region}" for region in REGIONS)])
def tagged(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A storage to test read_tagged / put_if on: memory, local, S3 in each region."""
    if request.param == "memory":
        return MemoryStorage("memory-dest")
    if request.param == "local":
        return _local_case(tmp_path).storage
    aws_env: S3Server = request.getfixturevalue("aws_env")
    region = request.param.removeprefix("s3-")
    return _s3_case(aws_env, region, S3_PREFIX if region != "us-east-1" else "").storage


def test_put_if_absent_creates_once(tagged: Storage) -> None:
    """put_if(expected=None) creates a missing object; a second one fails and changes nothing."""
    tag = tagged.put_if("p/lease.json", b"first", expected=None)
    assert tagged.read_tagged("p/lease.json") == (b"first", tag)
    with pytest.raises(PreconditionFailed):
        tagged.put_if("p/lease.json", b"second", expected=None)
    assert tagged.read_tagged("p/lease.json") == (b"first", tag)


def test_put_if_replaces_only_the_expected_version(tagged: Storage) -> None:
    """An update with the current tag wins and yields a new tag; one with a stale tag fails."""
    first = tagged.put_if("k", b"one", expected=None)
    second = tagged.put_if("k", b"two", expected=first)
    assert second != first
    assert tagged.read_tagged("k") == (b"two", second)
    with pytest.raises(PreconditionFailed):
        tagged.put_if("k", b"stale", expected=first)
    assert tagged.read_tagged("k") == (b"two", second)
    third = tagged.put_if("k", b"three", expected=second)
    assert tagged.read_tagged("k") == (b"three", third)


def test_put_if_with_a_tag_on_a_missing_object_fails(tagged: Storage) -> None:
    """Expecting a version of an object that does not exist is a lost condition, not a create."""
    tag = tagged.put_if("there", b"x", expected=None)
    with pytest.raises(PreconditionFailed):
        tagged.put_if("absent", b"y", expected=tag)
    with pytest.raises(ObjectNotFound):
        tagged.read_tagged("absent")


def test_read_tagged_of_a_missing_object_is_object_not_found(tagged: Storage) -> None:
    """read_tagged raises ObjectNotFound for an absent key, also below an existing one."""
    tagged.put("present", [b"here"])
    with pytest.raises(ObjectNotFound):
        tagged.read_tagged("absent")
    with pytest.raises(ObjectNotFound):
        tagged.read_tagged("present/below")


def test_a_put_object_can_be_replaced_with_its_tag(tagged: Storage) -> None:
    """The tag read_tagged gives for an object stored by put works for put_if."""
    tagged.put("k", [b"plain ", b"put"])
    data, tag = tagged.read_tagged("k")
    assert data == b"plain put"
    with pytest.raises(PreconditionFailed):
        tagged.put_if("k", b"created", expected=None)
    tagged.put_if("k", b"replaced", expected=tag)
    assert read_all(tagged.open("k")) == b"replaced"


def test_put_if_objects_are_ordinary_objects(tagged: Storage) -> None:
    """A put_if object is listed, stat'ed, opened and deleted like any other; nothing else is."""
    tag = tagged.put_if("p/lease.json", b"{}", expected=None)
    tagged.put_if("p/lease.json", b'{"a": 1}', expected=tag)
    tagged.put("p/other", [b"x"])
    assert [(i.key, i.size_bytes) for i in tagged.list("")] == [
        ("p/lease.json", 8),
        ("p/other", 1),
    ]
    assert [i.key for i in tagged.list("p/l")] == ["p/lease.json"]
    assert tagged.stat("p/lease.json").size_bytes == 8
    assert read_all(tagged.open("p/lease.json")) == b'{"a": 1}'
    assert tagged.abort_incomplete("") == 0
    tagged.delete("p/lease.json")
    assert [i.key for i in tagged.list("")] == ["p/other"]
    tagged.put_if("p/lease.json", b"again", expected=None)
    assert [i.key for i in tagged.list("p/")] == ["p/lease.json", "p/other"]


RACERS = 8
INCREMENTS = 3


def test_racing_creates_have_one_winner(tagged: Storage) -> None:
    """Of several put_if(expected=None) released at once, exactly one succeeds."""
    start = threading.Barrier(RACERS)
    won: list[int] = []
    errors: list[BaseException] = []

    def race(i: int) -> None:
        start.wait()
        try:
            tagged.put_if("once", f"racer {i}".encode(), expected=None)
            won.append(i)
        except PreconditionFailed:
            pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(won) == 1
    assert tagged.read_tagged("once")[0] == f"racer {won[0]}".encode()


def test_racing_read_modify_writes_lose_no_update(tagged: Storage) -> None:
    """Threads incrementing one counter by read_tagged -> put_if (retrying on a lost
    condition) end with exactly as many increments as succeeded: no update is lost."""
    tagged.put_if("counter", b"0", expected=None)
    start = threading.Barrier(RACERS)
    wins: list[int] = []
    refused: list[int] = []
    errors: list[BaseException] = []

    def increment(i: int) -> None:
        start.wait()
        try:
            done = 0
            while done < INCREMENTS:
                data, tag = tagged.read_tagged("counter")
                try:
                    tagged.put_if("counter", str(int(data) + 1).encode(), expected=tag)
                except PreconditionFailed:
                    refused.append(i)
                    continue
                wins.append(i)
                done += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=increment, args=(i,)) for i in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(wins) == RACERS * INCREMENTS
    assert tagged.read_tagged("counter")[0] == str(RACERS * INCREMENTS).encode()


# --- local specifics ------------------------------------------------------------------------


ALL_OPS: dict[str, Callable[[Storage], object]] = {
    "put": lambda s: s.put("k", [b"x"]),
    "open": lambda s: read_all(s.open("k")),
    "stat": lambda s: s.stat("k"),
    "list": lambda s: list(s.list("")),
    "delete": lambda s: s.delete("k"),
    "abort_incomplete": lambda s: s.abort_incomplete(""),
    "read_tagged": lambda s: s.read_tagged("k"),
    "put_if": lambda s: s.put_if("k", b"x", expected=None),
}


@pytest.mark.parametrize("op", list(ALL_OPS))
def test_local_missing_root_is_storage_unavailable(tmp_path: Path, op: str) -> None:
    """A missing root (an unmounted volume, most likely) is StorageUnavailable, never created."""
    root = tmp_path / "not-mounted"
    with pytest.raises(StorageUnavailable) as caught:
        ALL_OPS[op](LocalStorage("local", root))
    assert caught.value.retryable
    assert caught.value.hint
    assert not root.exists()


def test_local_put_leaves_no_temp_file_and_keeps_dot_files_apart(tmp_path: Path) -> None:
    """After a put only the object's file exists; keys that look like temp files are refused."""
    storage = LocalStorage("local", tmp_path)
    storage.put("d/obj", [b"abc"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "d",
        "d/obj",
    ]
    with pytest.raises(ValueError, match="reserved"):
        storage.put(f"d/.obj{PARTIAL_MARK}x", [b"abc"])
    for key in ("a//b", "a/../b", "./a", "a/"):
        with pytest.raises(ValueError, match="invalid object key"):
            storage.put(key, [b"x"])


def test_local_failed_put_leaves_no_temp_file(tmp_path: Path) -> None:
    """A failed put removes its temp file; the directory it made may stay, but no file does."""
    storage = LocalStorage("local", tmp_path)
    with pytest.raises(SourceFailedError):
        storage.put("d/obj", failing(b"x" * 1000, 10))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_local_put_if_lock_sidecar_is_hidden_and_kept(tmp_path: Path) -> None:
    """put_if's flock sidecar sits next to the object, is never listed nor taken for an
    unfinished put, survives delete, and no key may name it."""
    storage = LocalStorage("local", tmp_path)
    tag = storage.put_if("p/lease.json", b"v1", expected=None)
    storage.put_if("p/lease.json", b"v2", expected=tag)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["p/.lease.json.put-if.lock", "p/lease.json"]
    assert [info.key for info in storage.list("")] == ["p/lease.json"]
    assert [info.key for info in storage.list("p/.lease")] == []
    assert storage.abort_incomplete("") == 0
    storage.delete("p/lease.json")
    assert list(storage.list("")) == []
    assert (tmp_path / "p/.lease.json.put-if.lock").exists()
    for key in ("p/.lease.json.put-if.lock", ".x.put-if.lock"):
        with pytest.raises(ValueError, match="reserved"):
            storage.put(key, [b"x"])
        with pytest.raises(ValueError, match="reserved"):
            storage.put_if(key, b"x", expected=None)


def test_local_put_if_serializes_across_processes(tmp_path: Path) -> None:
    """Writers in other processes (not just threads) are serialized too: no lost increment."""
    storage = LocalStorage("local", tmp_path)
    storage.put_if("counter", b"0", expected=None)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from drbot.errors import PreconditionFailed\n"
        "from drbot.storage.local import LocalStorage\n"
        "s = LocalStorage('local', Path(sys.argv[1]))\n"
        "done = 0\n"
        "while done < 20:\n"
        "    data, tag = s.read_tagged('counter')\n"
        "    try:\n"
        "        s.put_if('counter', str(int(data) + 1).encode(), expected=tag)\n"
        "    except PreconditionFailed:\n"
        "        continue\n"
        "    done += 1\n"
    )
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=root) for _ in range(4)
    ]
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0, 0, 0]
    assert storage.read_tagged("counter")[0] == b"80"


# --- S3 specifics --------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("op", list(ALL_OPS))
@pytest.mark.parametrize("region", REGIONS)
def test_s3_missing_bucket_is_storage_unavailable(aws_env: S3Server, region: str, op: str) -> None:
    """Every operation on a bucket that does not exist raises StorageUnavailable naming it."""
    storage = _s3_storage(aws_env, "drbot-test-no-such-bucket", region)
    with pytest.raises(StorageUnavailable, match="drbot-test-no-such-bucket") as caught:
        ALL_OPS[op](storage)
    assert caught.value.retryable


@pytest.mark.parametrize("op", list(ALL_OPS))
def test_s3_unreachable_endpoint_is_storage_unavailable(aws_env: S3Server, op: str) -> None:
    """An endpoint refusing connections raises StorageUnavailable, nothing from botocore."""
    storage = S3Storage(
        "s3-down",
        "some-bucket",
        "",
        REGIONS[0],
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        part_size=PART_SIZE,
        max_attempts=1,
        connect_timeout_s=0.5,
        read_timeout_s=0.5,
    )
    with pytest.raises(StorageUnavailable) as caught:
        ALL_OPS[op](storage)
    assert caught.value.retryable
    assert caught.value.hint


def test_s3_large_put_is_multipart_and_exact_part_size_is_not(aws_env: S3Server) -> None:
    """Objects over part_size go up in parts (ETag '-N'); one of exactly part_size does not."""
    region = REGIONS[0]
    bucket = aws_env.make_bucket(region)
    s3 = aws_env.client("s3", region)
    storage = _s3_storage(aws_env, bucket, region)
    storage.put("single", chunked(payload(PART_SIZE), MiB))
    storage.put("multi", chunked(payload(MULTIPART_SIZE), 64 * 1024))
    assert "-" not in s3.head_object(Bucket=bucket, Key="single")["ETag"]
    assert s3.head_object(Bucket=bucket, Key="multi")["ETag"].strip('"').endswith("-3")


def test_s3_parts_go_up_concurrently_in_order_and_a_failed_part_aborts_all(
    aws_env: S3Server,
) -> None:
    """Parts in flight together still assemble in order (the bytes read back are the bytes
    sent); a part refused by S3 (its upload gone) fails the put and leaves no upload behind."""
    region = REGIONS[0]
    bucket = aws_env.make_bucket(region)
    s3 = aws_env.client("s3", region)
    storage = _s3_storage(aws_env, bucket, region)
    data = payload(7 * PART_SIZE + 123)
    storage.put("many", chunked(data, 3 * MiB + 1))
    assert s3.head_object(Bucket=bucket, Key="many")["ETag"].strip('"').endswith("-8")
    assert b"".join(storage.open("many")) == data

    def upload_vanishes() -> Iterator[bytes]:
        for i, chunk in enumerate(chunked(data, MiB)):
            if i == 3 * PART_SIZE // MiB:
                for upload in _uploads(s3, bucket):
                    s3.abort_multipart_upload(
                        Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
            yield chunk

    with pytest.raises(StorageUnavailable, match="UploadPart"):
        storage.put("broken", upload_vanishes())
    assert _uploads(s3, bucket) == []
    assert [info.key for info in storage.list("")] == ["many"]


def test_s3_prefix_maps_keys_into_the_bucket(aws_env: S3Server) -> None:
    """Keys are stored under the prefix; list returns them relative, ignoring neighbours."""
    region = REGIONS[1]
    bucket = aws_env.make_bucket(region)
    s3 = aws_env.client("s3", region)
    s3.put_object(Bucket=bucket, Key="pre/fixed", Body=b"neighbour")
    storage = _s3_storage(aws_env, bucket, region, "/pre/fix/")
    assert storage.url == f"s3://{bucket}/pre/fix"
    storage.put("a/b", [b"mine"])
    assert s3.get_object(Bucket=bucket, Key="pre/fix/a/b")["Body"].read() == b"mine"
    assert [info.key for info in storage.list("")] == ["a/b"]
    assert [info.key for info in storage.list("a")] == ["a/b"]
    s3.create_multipart_upload(Bucket=bucket, Key="pre/fixed-upload")
    assert storage.abort_incomplete("") == 0
    assert len(_uploads(s3, bucket)) == 1


@pytest.mark.parametrize(
    "size", [pytest.param(1_000, id="single"), pytest.param(MULTIPART_SIZE, id="multipart")]
)
@pytest.mark.parametrize("region", REGIONS)
def test_s3_object_lock_sets_retention(aws_env: S3Server, region: str, size: int) -> None:
    """With object_lock, every stored object carries GOVERNANCE retention for `days` days."""
    bucket = aws_env.make_bucket(region, object_lock=True)
    s3 = aws_env.client("s3", region)
    start = datetime.now(UTC)
    storage = _s3_storage(
        aws_env,
        bucket,
        region,
        object_lock=ObjectLock(mode="governance", days=1),
        clock=FakeClock(start),
    )
    data = payload(size, seed=6)
    storage.put("locked", chunked(data, 256 * 1024))
    head = s3.head_object(Bucket=bucket, Key="locked")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    expected = start.replace(microsecond=0) + timedelta(days=1)
    assert head["ObjectLockRetainUntilDate"] == expected
    assert read_all(storage.open("locked")) == data
    assert _uploads(s3, bucket) == []


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(1_000, id="single"),
        pytest.param(MULTIPART_SIZE, id="multipart"),
    ],
)
def test_s3_object_lock_on_a_bucket_without_it_is_refused(aws_env: S3Server, size: int) -> None:
    """object_lock on a bucket without Object Lock raises PolicyInvalid and stores nothing."""
    region = REGIONS[0]
    bucket = aws_env.make_bucket(region)
    s3 = aws_env.client("s3", region)
    storage = _s3_storage(
        aws_env, bucket, region, object_lock=ObjectLock(mode="governance", days=1)
    )
    with pytest.raises(PolicyInvalid, match="object lock"):
        storage.put("locked", chunked(payload(size), MiB))
    assert _uploads(s3, bucket) == []
    assert s3.list_objects_v2(Bucket=bucket).get("Contents", []) == []


def test_s3_object_lock_refuses_to_delete_a_locked_object(aws_env: S3Server) -> None:
    """Deleting an object still under retention raises DrbotError naming the date; it stays."""
    region = REGIONS[0]
    bucket = aws_env.make_bucket(region, object_lock=True)
    storage = _s3_storage(
        aws_env, bucket, region, object_lock=ObjectLock(mode="governance", days=1)
    )
    storage.put("locked", [b"keep me"])
    with pytest.raises(DrbotError, match="object lock until"):
        storage.delete("locked")
    assert read_all(storage.open("locked")) == b"keep me"


def _versions(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    listing = s3.list_object_versions(Bucket=bucket, Prefix=key)
    entries: list[dict[str, Any]] = [
        *listing.get("Versions", []),
        *listing.get("DeleteMarkers", []),
    ]
    return [entry for entry in entries if entry["Key"] == key]


@pytest.mark.parametrize("region", REGIONS)
def test_s3_put_if_is_never_locked_and_leaves_no_old_versions(
    aws_env: S3Server, region: str
) -> None:
    """In an object-locked (so versioned) bucket, put_if objects carry no retention and each
    conditional replace deletes the version it replaced: one version remains."""
    bucket = aws_env.make_bucket(region, object_lock=True)
    s3 = aws_env.client("s3", region)
    storage = _s3_storage(
        aws_env, bucket, region, "pre", object_lock=ObjectLock(mode="governance", days=1)
    )
    tag = storage.put_if("p/lease.json", b"v0", expected=None)
    for i in range(1, 6):
        tag = storage.put_if("p/lease.json", f"v{i}".encode(), expected=tag)
    head = s3.head_object(Bucket=bucket, Key="pre/p/lease.json")
    assert head.get("ObjectLockMode") is None
    versions = _versions(s3, bucket, "pre/p/lease.json")
    assert [(v["IsLatest"], v["ETag"]) for v in versions] == [(True, tag)]
    other = _s3_storage(aws_env, bucket, region, "pre")  # another daemon: reads, then replaces
    _data, seen = other.read_tagged("p/lease.json")
    other.put_if("p/lease.json", b"taken", expected=seen)
    assert len(_versions(s3, bucket, "pre/p/lease.json")) == 1
    storage.delete("p/lease.json")  # every version goes: nothing was locked
    assert _versions(s3, bucket, "pre/p/lease.json") == []


def test_s3_put_if_in_an_unversioned_bucket(aws_env: S3Server) -> None:
    """Without versioning there is nothing to clean up; conditions hold all the same."""
    region = REGIONS[0]
    bucket = aws_env.make_bucket(region)
    storage = _s3_storage(aws_env, bucket, region)
    tag = storage.put_if("k", b"a", expected=None)
    tag = storage.put_if("k", b"b", expected=tag)
    with pytest.raises(PreconditionFailed):
        storage.put_if("k", b"c", expected='"0123456789abcdef0123456789abcdef"')
    assert storage.read_tagged("k") == (b"b", tag)


# --- open_storage --------------------------------------------------------------------------


def test_open_storage_file_url_is_local(tmp_path: Path) -> None:
    storage = open_storage("here", tmp_path.as_uri())
    assert isinstance(storage, LocalStorage)
    assert storage.name == "here"
    assert storage.root == tmp_path
    assert storage.url == tmp_path.as_uri()
    assert storage.region is None


def test_open_storage_file_url_with_localhost_and_escapes(tmp_path: Path) -> None:
    storage = open_storage("here", f"file://localhost{tmp_path}/with%20space")
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "with space"


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        ("s3://bucket/p", "p"),
        ("s3://bucket/p/q/", "p/q"),
        ("s3://bucket", ""),
        ("s3://bucket/", ""),
    ],
)
def test_open_storage_s3_url(url: str, prefix: str) -> None:
    storage = open_storage("remote", url, region="eu-west-1", endpoint_url="http://127.0.0.1:1")
    assert isinstance(storage, S3Storage)
    assert storage.name == "remote"
    assert storage.bucket == "bucket"
    assert storage.prefix == prefix
    assert storage.region == "eu-west-1"
    assert storage.url == (f"s3://bucket/{prefix}" if prefix else "s3://bucket")


def test_open_storage_s3_passes_object_lock() -> None:
    lock = ObjectLock(mode="compliance", days=30)
    storage = open_storage("remote", "s3://b/p", region="us-east-1", object_lock=lock)
    assert isinstance(storage, S3Storage)
    assert storage.object_lock == lock


@pytest.mark.parametrize(
    ("url", "region", "lock"),
    [
        pytest.param("file:relative/dir", None, None, id="relative-file-path"),
        pytest.param("file://host/abs", None, None, id="file-with-host"),
        pytest.param("/abs/dir", None, None, id="no-scheme"),
        pytest.param("relative/dir", None, None, id="bare-relative"),
        pytest.param("ftp://host/dir", "us-east-1", None, id="unknown-scheme"),
        pytest.param("gs://bucket/p", "us-east-1", None, id="other-cloud"),
        pytest.param("s3://bucket/p", None, None, id="s3-without-region"),
        pytest.param("s3://bucket/p", "", None, id="s3-empty-region"),
        pytest.param("s3:///p", "us-east-1", None, id="s3-without-bucket"),
        pytest.param(
            "file:///abs/dir", None, ObjectLock(mode="governance", days=1), id="local-object-lock"
        ),
    ],
)
def test_open_storage_refuses_bad_urls(
    url: str, region: str | None, lock: ObjectLock | None
) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        open_storage("bad", url, region=region, object_lock=lock)
    assert "bad" in str(caught.value)
