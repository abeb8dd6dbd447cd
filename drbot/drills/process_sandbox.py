"""The process sandbox: the host's own PostgreSQL binaries in a temp directory.

For hosts without Docker. The server listens only on a unix socket in the work directory (no
TCP), runs as drbot's own user, or, when drbot is root, as the `postgres` OS user (PostgreSQL
refuses to run as root). Cleanup stops any server still running from the work directory and
removes it; the sweep does the same for work directories whose drbot process is gone.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import structlog

from drbot.drills.sandbox import WORKDIR_PREFIX, Sandbox, Session, make_workdir, owner_alive
from drbot.errors import SandboxUnavailable

log = structlog.get_logger(__name__)

ROOT_RUNS_AS = "postgres"


class ProcessSession:
    kind = "process"

    def __init__(self, bin_dir: Path, workdir: Path, run_as: str | None) -> None:
        self.bin_dir = bin_dir
        self.workdir = workdir
        self.run_as = run_as
        self.description = str(bin_dir)

    def run(self, argv: Sequence[str], *, root: bool = False) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        tool = self.bin_dir / cmd[0]
        if "/" not in cmd[0] and tool.exists():
            cmd[0] = str(tool)
        if self.run_as is not None and not root:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    def give(self, *paths: Path) -> None:
        if self.run_as is None:
            return
        pw = pwd.getpwnam(self.run_as)
        for path in paths:
            os.chown(path, pw.pw_uid, pw.pw_gid)
            for root, dirs, files in os.walk(path):
                for name in (*dirs, *files):
                    os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)

    def give_socket_dir(self, path: Path) -> None:
        if self.run_as is not None:
            os.chown(path, pwd.getpwnam(self.run_as).pw_uid, os.getgid())
        os.chmod(path, 0o750)  # noqa: S103 - drbot's group only, to reach the socket


class ProcessSandbox:
    kind = "process"

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir

    def binaries_for(self, major: int) -> Path:
        """The server binaries of `major` (the configured ones, else Debian's layout)."""
        found: list[str] = []
        for candidate in (self.bin_dir, Path(f"/usr/lib/postgresql/{major}/bin")):
            version = _server_major(candidate)
            if version is not None and (major in (version, 0)):
                return candidate
            if version is not None:
                found.append(f"{candidate} has PostgreSQL {version}")
        raise SandboxUnavailable(
            f"the backup is of PostgreSQL {major}, and this host has no server binaries of that "
            f"version ({'; '.join(found) or 'none found'})",
            hint=f"install postgresql-{major}, set source.bin_dir, or use the docker sandbox",
        )

    @contextmanager
    def provision(self, *, policy: str, major: int) -> Iterator[Session]:
        bin_dir = self.binaries_for(major)
        run_as = _run_as()
        workdir = make_workdir()
        log.info("drill.sandbox_started", sandbox="process", policy=policy, workdir=str(workdir))
        try:
            yield ProcessSession(bin_dir, workdir, run_as)
        finally:
            _remove(workdir, self.bin_dir, run_as)

    def sweep(self) -> int:
        removed = 0
        for workdir in Path(tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
            if workdir.is_dir() and not owner_alive(workdir):
                _remove(workdir, self.bin_dir, _run_as())
                removed += 1
        if removed:
            log.warning("drill.sandbox_swept", sandbox="process", removed=removed)
        return removed


_: type[Sandbox] = ProcessSandbox


class MongoProcessSandbox:
    """The process sandbox for MongoDB policies: the host's `mongod` in a temp directory,
    listening on 127.0.0.1 (a free port) and a unix socket there, as drbot's own user."""

    kind = "process"

    def __init__(self, bin_dir: Path | None) -> None:
        self.bin_dir = bin_dir

    def binaries(self) -> Path:
        candidates = [self.bin_dir] if self.bin_dir is not None else []
        found = shutil.which("mongod")
        if found:
            candidates.append(Path(found).parent)
        for candidate in candidates:
            if (candidate / "mongod").exists():
                return candidate
        raise SandboxUnavailable(
            "the process sandbox needs the mongod program, and this host has none "
            f"({'not in ' + str(self.bin_dir) if self.bin_dir else 'not on PATH'})",
            hint="install MongoDB's server, set source.bin_dir to its directory, or use the "
            "docker sandbox (drill.image, e.g. mongo:7)",
        )

    @contextmanager
    def provision(self, *, policy: str, major: int) -> Iterator[Session]:
        bin_dir = self.binaries()
        workdir = make_workdir()
        log.info("drill.sandbox_started", sandbox="process", policy=policy, workdir=str(workdir))
        try:
            yield ProcessSession(bin_dir, workdir, None)
        finally:
            _remove_mongo(workdir)

    def sweep(self) -> int:
        removed = 0
        for workdir in Path(tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
            if workdir.is_dir() and not owner_alive(workdir) and any(workdir.glob("*/mongod.lock")):
                _remove_mongo(workdir)
                removed += 1
        return removed


_m: type[Sandbox] = MongoProcessSandbox


def _remove_mongo(workdir: Path) -> None:
    """Stop a mongod still running from `workdir` (by the pid in its lock file), remove it."""
    for lock in workdir.glob("*/mongod.lock"):
        try:
            pid = int(lock.read_text().strip() or "0")
        except (OSError, ValueError):
            continue
        if pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(workdir, ignore_errors=True)
    if workdir.exists():
        log.warning("drill.workdir_left", workdir=str(workdir))


def _server_major(bin_dir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"\) (\d+)", out)
    return int(m.group(1)) if m else None


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(ROOT_RUNS_AS)
    except KeyError:
        raise SandboxUnavailable(
            f"drbot runs as root and PostgreSQL refuses to; there is no {ROOT_RUNS_AS!r} user "
            "to run the sandbox server as",
            hint=f"create the {ROOT_RUNS_AS} user, run drbot as another user, or use the "
            "docker sandbox",
        ) from None
    return ROOT_RUNS_AS


def _remove(workdir: Path, bin_dir: Path, run_as: str | None) -> None:
    """Stop every server running from a data directory in `workdir`, then remove it all."""
    for pidfile in workdir.glob("*/postmaster.pid"):
        cmd = [str(bin_dir / "pg_ctl"), "-D", str(pidfile.parent), "-m", "immediate", "-w"]
        cmd.append("stop")
        if run_as is not None:
            cmd = ["runuser", "-u", run_as, "--", *cmd]
        subprocess.run(cmd, capture_output=True, check=False)
    shutil.rmtree(workdir, ignore_errors=True)
    if workdir.exists():
        log.warning("drill.workdir_left", workdir=str(workdir))
