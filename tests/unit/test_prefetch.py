"""prefetch: overlap a producer with its consumer, and stop it promptly when the consumer quits."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from drbot.pipeline.prefetch import prefetch

pytestmark = pytest.mark.unit


def test_items_and_errors_arrive_in_order() -> None:
    def source() -> Iterator[int]:
        yield from range(100)
        raise RuntimeError("dump failed")

    got: list[int] = []
    with pytest.raises(RuntimeError, match="dump failed"):
        got.extend(prefetch(source(), depth=2))
    assert got == list(range(100))


def test_closing_early_cancels_a_producer_blocked_inside_its_source() -> None:
    """A dump that writes nothing (waiting on a lock) must not make stopping a backup hang."""
    unblock = threading.Event()
    closed = threading.Event()

    def source() -> Iterator[bytes]:
        try:
            yield b"first"
            unblock.wait(timeout=30)  # like os.read on a silent pg_dump
            yield b"never consumed"
        finally:
            closed.set()

    stream = prefetch(source(), cancel=unblock.set)
    assert next(stream) == b"first"
    time.sleep(0.1)  # let the producer block
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 5
    assert unblock.is_set()
    assert closed.wait(timeout=5)


def test_cancel_is_not_called_when_the_source_finished() -> None:
    calls: list[int] = []
    assert list(prefetch(iter([1, 2, 3]), cancel=lambda: calls.append(1))) == [1, 2, 3]
    assert calls == []


@pytest.mark.timeout(30)
def test_closed_from_its_own_producer_thread_it_does_not_wait_for_itself() -> None:
    """A garbage collection can finalize the generator in the producer's thread: closing must
    not spin waiting for the thread it runs in."""
    holder: list[Iterator[int]] = []
    closed_in: list[str] = []
    received = threading.Event()

    def source() -> Iterator[int]:
        yield 1
        assert received.wait(10)  # the consumer's generator is suspended, not running
        gen = holder[0]
        assert hasattr(gen, "close")
        gen.close()  # from the producer thread, as a collection there would
        closed_in.append(threading.current_thread().name)
        yield 2

    gen = prefetch(source(), depth=1)
    holder.append(gen)
    assert next(gen) == 1
    received.set()
    deadline = time.monotonic() + 10
    while not closed_in and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closed_in == ["prefetch"]
    assert list(gen) == []  # closed: nothing more


@pytest.mark.timeout(30)
def test_an_interrupt_does_not_wait_for_a_producer_stuck_in_its_source() -> None:
    """Ctrl-C during a stalled read: the consumer gets KeyboardInterrupt within about a second
    (not after the storage's read timeout); the producer stops and closes its source once the
    read returns."""
    stalled = threading.Event()
    release = threading.Event()
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield 1
            stalled.set()
            release.wait(20)  # a read that hangs
            yield 2
        finally:
            closed.set()

    def interrupt() -> None:
        stalled.wait(10)
        time.sleep(0.1)  # the consumer is waiting in the queue by now
        os.kill(os.getpid(), signal.SIGINT)

    gen = prefetch(source(), depth=1)
    assert next(gen) == 1
    threading.Thread(target=interrupt, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        next(gen)
    assert time.monotonic() - started < 5
    assert not closed.is_set()  # still inside its read
    release.set()
    assert closed.wait(10)
