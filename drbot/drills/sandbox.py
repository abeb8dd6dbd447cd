"""The `Sandbox` protocol: a throwaway place to run a restored database, always cleaned up.

A sandbox gives drbot a work directory whose path is the same inside the sandbox and on the
host (a bind mount for docker), so drbot can unpack data there on the host while the database
server, running inside, sees the same paths in its settings. drbot talks to that server only
through a unix socket in that directory: a docker sandbox has no network at all.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from drbot.procs import pid_alive

WORKDIR_PREFIX = "drbot-drill-"
OWNER_FILE = ".drbot-sandbox"
"""In a work directory: the pid of the drbot process that owns it (for the sweep)."""


class Session(Protocol):
    """A provisioned sandbox.

    `run` executes a command inside the sandbox as the database's OS user (`root=True`: as
    root in a container; as drbot's own user in the process sandbox) and returns its result
    without raising for a non-zero exit; it raises `SandboxUnavailable` when the sandbox itself
    is gone. `give` hands paths under `workdir` to the database user so the server may use them.
    `give_socket_dir` makes a directory the server's, enterable by drbot's group and nobody
    else, for the server's unix socket (which trusts every connection).
    """

    kind: str
    workdir: Path
    description: str
    """What runs the server: the image (docker) or the binaries' directory (process)."""

    def run(
        self, argv: Sequence[str], *, root: bool = False
    ) -> subprocess.CompletedProcess[str]: ...

    def give(self, *paths: Path) -> None: ...

    def give_socket_dir(self, path: Path) -> None: ...


class Sandbox(Protocol):
    """A kind of sandbox.

    `provision` yields a `Session` for one drill and removes everything it made when the block
    ends, however it ends (including KeyboardInterrupt); it raises `SandboxUnavailable` when it
    cannot provide one (no Docker engine, image missing and pulling not allowed, no binaries).
    `sweep` removes what crashed drills of this kind left behind and returns how many it removed.
    """

    kind: str

    def provision(self, *, policy: str, major: int) -> AbstractContextManager[Session]: ...

    def sweep(self) -> int: ...


def make_workdir() -> Path:
    """A fresh work directory in the temp dir, short enough for a unix socket path.

    Mode 0711: the database user inside the sandbox (another uid) must traverse it; what it
    holds is protected by the 0700 directories inside.
    """
    path = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    os.chmod(path, 0o711)  # noqa: S103 - traversal only; contents are 0700
    (path / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return path


def owner_alive(workdir: Path) -> bool:
    """Whether the drbot process that made `workdir` still runs (unknown owner: assume so)."""
    try:
        pid = int((workdir / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return True
    return pid_alive(pid)


def completed(
    argv: Sequence[str], code: int, out: object, err: object
) -> subprocess.CompletedProcess[str]:
    """A CompletedProcess from what an exec API returned (bytes, or None for no output)."""

    def text(data: object) -> str:
        return data.decode(errors="replace") if isinstance(data, bytes) else ""

    return subprocess.CompletedProcess(list(argv), code, text(out), text(err))
