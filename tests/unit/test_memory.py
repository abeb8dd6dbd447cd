"""glibc's thresholds: freed large buffers go back to the system, 1 MiB chunks reuse pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

_PROGRAM = """
import sys
from drbot.memory import tune_malloc
if sys.argv[1] == "fixed" and not tune_malloc():
    print("no-glibc")
    raise SystemExit
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
def touched(size):
    b = bytearray(size)
    b[::4096] = b"x" * len(b[::4096])
    return b
big = touched(8 << 20)
del big  # glibc now serves blocks up to 8 MiB from the heap, unless the threshold is fixed
keep, blocks = [], []
for _ in range(20):
    blocks.append(touched(6 << 20))  # like S3 parts
    keep.append(bytearray(64 << 10))  # small and long-lived, between them
peak = rss()
del blocks
print(peak - rss())
"""


def _run(program: str, mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", program, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_large_freed_buffers_leave_the_resident_set() -> None:
    fixed = _run(_PROGRAM, "fixed")
    if fixed == "no-glibc":
        pytest.skip("malloc is not glibc's")
    assert int(fixed) >= 100  # 120 MiB of parts freed, nearly all of it returned
    # Without the fix the same program keeps them resident: the test can tell the difference.
    assert int(_run(_PROGRAM, "default")) < 20


_CHURN = """
import ctypes, resource, sys
from drbot.memory import MMAP_THRESHOLD, tune_malloc
if sys.argv[1] == "fixed":
    if not tune_malloc():
        print("no-glibc")
        raise SystemExit
else:  # the mmap threshold alone, as drbot set it before
    ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)
import threading
def touched(size):
    b = bytearray(size)
    b[::4096] = b"x" * len(b[::4096])
    return b
def churn():
    # 1 MiB chunks read, used and freed, as a backup's pipeline threads do. In a thread, they
    # come from a heap of the thread's own, which starts empty: no holes left by start-up.
    for _ in range(100):
        chunks = [touched(1 << 20) for _ in range(3)]
        del chunks
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
worker = threading.Thread(target=churn)
worker.start()
worker.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_chunks_keep_their_pages() -> None:
    fixed = _run(_CHURN, "fixed")
    if fixed == "no-glibc":
        pytest.skip("malloc is not glibc's")
    mmap_only = int(_run(_CHURN, "mmap-only"))
    assert mmap_only > 100 * 3 * 200  # each chunk faulted in again: the test can tell
    assert int(fixed) < mmap_only // 20
