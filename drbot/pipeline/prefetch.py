"""Run an iterator in a background thread so its stage overlaps with the consumer's."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable
from typing import TypeVar

T = TypeVar("T")
_END = object()
# How long an interrupted consumer waits for the producer to stop before leaving it behind.
_INTERRUPTED_WAIT_S = 1.0


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(
    source: Iterable[T], *, depth: int = 4, cancel: Callable[[], None] | None = None
) -> Generator[T, None, None]:
    """Yield `source`'s items, produced by a thread that stays at most `depth` items ahead.

    Exceptions from `source` are re-raised in the consumer. If the consumer stops early (closes
    this generator or raises), the producer thread stops and closes `source`, so a dump process
    behind it is killed rather than left running. A producer blocked inside `source` (a dump
    waiting on a lock, writing nothing) cannot see that; `cancel` is called first to unblock
    it (e.g. by killing the dump process).

    The consumer waits for the producer to stop, except when it is interrupted (Ctrl-C,
    SIGTERM) while waiting for an item: then it waits at most a second, so a producer stuck in
    a stalled read (up to the storage's read timeout) does not hold up the cleanup behind the
    interrupt; the producer, a daemon thread, stops and closes `source` once the read returns.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        it = iter(source)
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as exc:
            q.put(_Failure(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    ended = False  # the producer reported its end (or failure): nothing to cancel
    interrupted = False
    try:
        while True:
            try:
                item = q.get()
            except BaseException:  # KeyboardInterrupt or SystemExit, from a signal handler
                interrupted = True
                raise
            if item is _END:
                ended = True
                return
            if isinstance(item, _Failure):
                ended = True
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        if cancel is not None and not ended:
            cancel()
        # Closed from the producer itself (a garbage collection that ran there): it cannot
        # wait for itself, and it stops as soon as it returns to its loop.
        if thread is not threading.current_thread():
            deadline = time.monotonic() + _INTERRUPTED_WAIT_S if interrupted else math.inf
            while thread.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.1)
