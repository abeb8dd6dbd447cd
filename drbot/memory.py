"""Keep drbot's resident memory at what it uses, not at what it once used (glibc malloc).

glibc serves allocations above its mmap threshold (128 KiB at first) with mmap, and returns them
to the system when freed; but each time such a block is freed it raises the threshold to that
block's size, up to 32 MiB. After the first S3 part (8 MiB) is freed, every later part comes from
the heap instead, where freed parts and the frames around them fragment it and stay resident.
A fixed threshold stops that adjustment: blocks of 4 MiB and more (S3 parts, zstd's job
buffers) are always mapped and always returned. Measured on a 1.6 GiB database: the peak RSS of
a logical backup to S3 went from 218 to 188 MiB. Smaller blocks (1 MiB frames and chunks, many
thousands a second) stay on the heap, where mapping each would cost page faults.

Fixing the mmap threshold also fixes glibc's trim threshold, at its first value of 128 KiB: each
time a 1 MiB chunk at the top of the heap was freed, the heap was trimmed and the next chunk
faulted its pages in again (a logical backup of 1.6 GiB: 670,000 page faults and 3.2 s of system
time). Trimming only past 8 MiB free: 50,000 faults and 1.8 s, at the same peak RSS.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 8 << 20


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (MMAP_THRESHOLD, TRIM_THRESHOLD); False where malloc
    is not glibc's."""
    try:
        # The process's own symbols, as drbot.durable reaches libc: find_library("c") would
        # run ldconfig in a subprocess at every drbot start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
