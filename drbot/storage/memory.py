"""An in-memory destination: a real Storage implementation for tests and experiments.

It keeps the contract (atomic puts, sorted lists, ObjectNotFound) and can be told to fail, so
callers' failure handling is tested against the same interface the real backends implement.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from drbot.errors import ObjectNotFound, PreconditionFailed, StorageUnavailable
from drbot.storage.base import ObjectInfo, PutResult, Storage


class MemoryStorage:
    """Objects in a dict. `fail_puts_after` makes every put fail once that many bytes went in."""

    def __init__(self, name: str, *, region: str | None = None) -> None:
        self.name = name
        self.url = f"memory://{name}"
        self.region = region
        self.objects: dict[str, tuple[bytes, datetime]] = {}
        self.incomplete: set[str] = set()
        self.unreachable = False
        self.fail_puts_after: int | None = None
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.unreachable:
            raise StorageUnavailable(f"{self.url} is unreachable (simulated)")

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        self._check()
        buf = bytearray()
        with self._lock:
            self.incomplete.add(key)
        try:
            for chunk in chunks:
                buf += chunk
                if self.fail_puts_after is not None and len(buf) > self.fail_puts_after:
                    raise StorageUnavailable(f"{self.url}: put of {key} failed (simulated)")
        finally:
            with self._lock:
                self.incomplete.discard(key)
        data = bytes(buf)
        with self._lock:
            self.objects[key] = (data, datetime.now(UTC))
        return PutResult(key, len(data), hashlib.sha256(data).hexdigest())

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        self._check()
        try:
            data = self.objects[key][0]
        except KeyError:
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        end = len(data) if length is None else offset + length
        for i in range(offset, end, 1 << 20):
            yield data[i : min(end, i + (1 << 20))]

    def stat(self, key: str) -> ObjectInfo:
        self._check()
        try:
            data, at = self.objects[key]
        except KeyError:
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        return ObjectInfo(key, len(data), at)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._check()
        with self._lock:
            items = sorted((k, v) for k, v in self.objects.items() if k.startswith(prefix))
        for key, (data, at) in items:
            yield ObjectInfo(key, len(data), at)

    def delete(self, key: str) -> None:
        self._check()
        with self._lock:
            self.objects.pop(key, None)

    def abort_incomplete(self, prefix: str) -> int:
        self._check()
        return 0

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and its tag (SHA-256 hex of its bytes, as LocalStorage uses)."""
        self._check()
        with self._lock:
            found = self.objects.get(key)
        if found is None:
            raise ObjectNotFound(f"{self.url}/{key} does not exist")
        return found[0], hashlib.sha256(found[0]).hexdigest()

    def put_if(self, key: str, data: bytes, *, expected: str | None) -> str:
        """Store `data` if the object's tag is `expected` (None: if absent), under the lock."""
        self._check()
        data = bytes(data)
        with self._lock:
            found = self.objects.get(key)
            current = None if found is None else hashlib.sha256(found[0]).hexdigest()
            if current != expected:
                raise PreconditionFailed(
                    f"{self.url}/{key} changed: expected {expected or 'no object'}, "
                    f"found {current or 'no object'}"
                )
            self.objects[key] = (data, datetime.now(UTC))
        return hashlib.sha256(data).hexdigest()


_: type[Storage] = MemoryStorage
