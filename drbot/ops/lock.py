"""A per-policy lock on this host, so two drbot processes never back up one policy at once."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drbot.errors import LockHeld, UsageError


@contextmanager
def policy_lock(state_dir: Path, policy: str) -> Iterator[Path]:
    """Hold an exclusive lock for `policy` under `state_dir`; `LockHeld` if another process has it.

    The lock is an flock on a file, so it is released by the kernel if the holder dies.
    """
    path = state_dir / f"{policy}.lock"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UsageError(
            f"cannot create the lock file {path}: {exc.strerror or exc}",
            hint="set DRBOT_STATE_DIR to a directory drbot can write",
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(
                f"policy {policy!r} is locked by another drbot process (pid {holder})",
                hint=f"wait for it to finish; the lock is {path}",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)
