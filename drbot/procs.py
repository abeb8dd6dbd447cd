"""Facts about local processes, for code that must not touch another process's work."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

DIE_WITH_ENV = "DRBOT_DIE_WITH"
"""Set by the daemon for its jobs: the pid whose death must end the job (see `die_with`)."""
_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with(parent: int) -> bool:
    """Ask Linux to send this process SIGTERM when `parent` (its parent) dies, even by SIGKILL.

    Returns False when `parent` is already gone (the caller should exit), True otherwise,
    including where the request is not supported (not Linux). Done in the child itself rather
    than in a preexec_fn, which is not safe in a threaded parent like the daemon.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            return True
    # The parent may have died before the request: then nobody would ever send the signal.
    return os.getppid() == parent
