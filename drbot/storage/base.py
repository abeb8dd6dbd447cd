"""The Storage protocol: what every destination kind must do, and what callers may rely on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as listed or stat'ed."""

    key: str
    size_bytes: int
    modified_at: datetime


@dataclass(frozen=True)
class PutResult:
    """What was stored: size and SHA-256 (hex) of exactly the bytes written."""

    key: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ObjectLock:
    """Write-once retention applied to every object a destination stores."""

    mode: Literal["governance", "compliance"]
    days: int


class Storage(Protocol):
    """A place objects are stored under string keys ('/'-separated, no leading '/').

    Contract (checked by tests/contract/test_storage.py against every implementation):

    - `put` streams: memory does not grow with the object's size. The object becomes visible
      under `key` only once every chunk is stored; if `chunks` raises, or the store fails, no
      object (and no partial upload) is left under `key` and the error propagates. An existing
      object at `key` is replaced.
    - `open` yields the object's bytes (optionally a range) in order; `ObjectNotFound` if absent.
    - `stat` returns size and time; `ObjectNotFound` if absent.
    - `list` yields every object whose key starts with `prefix`, sorted by key; it never yields
      objects of an unfinished `put`.
    - `delete` removes an object; deleting a missing object is not an error.
    - `abort_incomplete` removes leftovers of interrupted puts under `prefix` (multipart uploads,
      temp files) and returns how many it removed.
    - `read_tagged` returns a whole (small) object with an opaque version tag; `ObjectNotFound`
      if absent. Equal tags mean equal bytes; the tag changes whenever the bytes do.
    - `put_if` is a conditional write of a small object: it stores `data` at `key` only if the
      current tag equals `expected` (`None`: only if no object exists), and returns the new tag;
      otherwise it raises `PreconditionFailed` and changes nothing. Among `put_if` writers of
      one key exactly one of several racing on the same tag wins (no lost update), and a reader
      sees the old bytes or the new ones, never a mix. Objects so written are listed like any
      other and are never object-locked (they must stay rewritable). Mixing a plain `put` with
      `put_if` on one key is not serialized; only `put_if` writers are.
    - Failures to reach the destination raise `StorageUnavailable` (retryable) after the
      implementation's own retries. Nothing else from the underlying library escapes.
    """

    name: str
    """The destination's name from the policy (used in messages, manifests and metrics)."""

    url: str
    """Where it is, for people: s3://bucket/prefix or file:///path."""

    region: str | None
    """Region of the destination, used to pick the region's key (KMS); None for local."""

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult: ...

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...

    def abort_incomplete(self, prefix: str) -> int: ...

    def read_tagged(self, key: str) -> tuple[bytes, str]: ...

    def put_if(self, key: str, data: bytes, *, expected: str | None) -> str: ...
