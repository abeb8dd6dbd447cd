"""One producer, many destinations: stream the same bytes into several `Storage.put` calls at once.

Each destination gets its own thread and a small bounded queue, so memory stays constant and a
slow destination slows the producer instead of filling memory. A destination that fails is dropped
(its upload aborted by its own `put`), the others carry on; the caller decides what a partial
success means. If the producer fails, every upload is aborted and nothing is left behind.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from drbot.errors import DrbotError, IntegrityFailure, StorageUnavailable
from drbot.pipeline.keys import KeyProvider, WrappedKey
from drbot.pipeline.stream import StreamEncryptor
from drbot.storage.base import PutResult, Storage

_END = object()
_QUEUE_FRAMES = 8


class _Aborted(Exception):
    """Raised inside a destination's chunk iterator so its put cleans up and stores nothing."""


@dataclass(frozen=True)
class Sent:
    """What was sent to one destination, as computed by drbot (not as reported by the store)."""

    destination: str
    key: str
    size_bytes: int
    sha256: str


class DestinationWriter:
    """Feeds one `Storage.put` running in its own thread."""

    def __init__(self, storage: Storage, key: str, first: bytes) -> None:
        self.storage = storage
        self.key = key
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_FRAMES)
        self._sha = hashlib.sha256()
        self._size = 0
        self.result: PutResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"put-{storage.name}", daemon=True)
        self._thread.start()
        self.send(first)

    def _chunks(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise _Aborted("producer failed") from item
            assert isinstance(item, bytes)
            yield item

    def _run(self) -> None:
        try:
            self.result = self.storage.put(self.key, self._chunks())
        except BaseException as exc:
            self.error = exc

    @property
    def failed(self) -> bool:
        return self.error is not None

    def _enqueue(self, item: object) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def send(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        self._sha.update(data)
        self._size += len(data)
        self._enqueue(data)

    def finish(self) -> Sent | None:
        """Close the stream and wait; the `Sent` record, or None if this destination failed."""
        self._enqueue(_END)
        self._thread.join()
        if self.error is not None:
            return None
        assert self.result is not None
        sent = Sent(self.storage.name, self.key, self._size, self._sha.hexdigest())
        if (self.result.size_bytes, self.result.sha256) != (sent.size_bytes, sent.sha256):
            self.error = IntegrityFailure(
                f"{self.storage.name}:{self.key}: the store reports {self.result.size_bytes} bytes "
                f"sha256 {self.result.sha256[:16]}, drbot sent {sent.size_bytes} bytes "
                f"sha256 {sent.sha256[:16]}"
            )
            return None
        return sent

    def abort(self, cause: BaseException) -> None:
        """Make the put fail and wait for it to clean up."""
        self._enqueue(cause)
        self._thread.join(timeout=60)

    def describe_error(self) -> str:
        if self.error is None:
            return ""
        if isinstance(self.error, DrbotError):
            return self.error.message
        return f"{self.error.__class__.__name__}: {self.error}"


def send_stream(
    writers: Sequence[DestinationWriter],
    enc: StreamEncryptor,
    chunks: Iterable[bytes],
    *,
    stop_producer: Callable[[], None] | None = None,
) -> None:
    """Encrypt `chunks` and send every frame, then the final one, to every writer.

    Raises `StorageUnavailable` as soon as every writer has failed. On any error (that one,
    the producer's, Ctrl-C), `stop_producer` runs first, then every upload is aborted so
    nothing is left behind, and the error propagates. Call `finish()` on each writer after.
    """
    try:
        for chunk in chunks:
            for frame in enc.update(chunk):
                for w in writers:
                    w.send(frame)
            if all(w.failed for w in writers):
                raise StorageUnavailable(
                    "every destination failed: "
                    + "; ".join(f"{w.storage.name}: {w.describe_error()}" for w in writers)
                )
        last = enc.finish()
        for w in writers:
            w.send(last)
    except BaseException as exc:
        if stop_producer is not None:
            stop_producer()
        for w in writers:
            w.abort(exc)
        raise


def new_data_key(
    keys: KeyProvider, storages: Sequence[Storage]
) -> tuple[bytes, dict[str, WrappedKey]]:
    """A fresh data key and its wrapping for each destination (one wrap per region)."""
    by_region: dict[str | None, WrappedKey] = {}
    data_key = b""
    for storage in storages:
        if storage.region in by_region:
            continue
        if not data_key:
            data_key, wrapped = keys.generate(storage.region)
        else:
            wrapped = keys.wrap(data_key, storage.region)
        by_region[storage.region] = wrapped
    return data_key, {s.name: by_region[s.region] for s in storages}


def read_back(storage: Storage, sent: Sent) -> str | None:
    """Read an object back; None if it matches what was sent, else what is wrong."""
    try:
        sha = hashlib.sha256()
        size = 0
        for chunk in storage.open(sent.key):
            sha.update(chunk)
            size += len(chunk)
    except DrbotError as exc:
        return f"read-back of {sent.key} failed: {exc}"
    if (size, sha.hexdigest()) != (sent.size_bytes, sent.sha256):
        return (
            f"read-back of {sent.key}: {size} bytes sha256 {sha.hexdigest()[:16]}, "
            f"expected {sent.size_bytes} bytes sha256 {sent.sha256[:16]}"
        )
    return None
