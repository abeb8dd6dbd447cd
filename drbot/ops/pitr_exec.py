"""Carry out a point-in-time restore plan (`plan_pitr`) into a directory, optionally starting it.

With `start`, recovery runs on a private configuration: no TCP listener and a trust-only
pg_hba on a unix socket in a 0700 directory, so nobody can use the half-recovered database and
drbot can watch it. Once the server is promoted, drbot reads the last replayed commit time,
removes the recovery settings and restarts it with the cluster's own pg_hba on 127.0.0.1:PORT,
and leaves it running. If recovery fails (a damaged WAL file, a target the WAL does not reach),
the server is stopped and the directory removed: no promoted server from a bad restore is left.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import structlog

from drbot.catalog import CatalogScan
from drbot.durable import sync_dir, sync_tree
from drbot.engines.postgres.localserver import free_port
from drbot.engines.postgres.wal import parse_lsn
from drbot.errors import (
    DatabaseError,
    DrbotError,
    IntegrityFailure,
    KeyProblem,
    NoRestorePoint,
    StorageUnavailable,
    UsageError,
)
from drbot.ops.pitr import (
    PitrPlan,
    SpoolFiller,
    Target,
    ensure_empty_target,
    recovery_settings,
    unpack_base,
    verify_base,
    write_recovery,
)
from drbot.ops.walfetch import write_inventory
from drbot.ops.walstore import KeyCache
from drbot.procs import pid_alive
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

_REDO_DONE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
BEFORE_TARGET = "before configured recovery target was reached"
"""What PostgreSQL logs when recovery used up the WAL without reaching its target."""
_RESET_AFTER = (
    "restore_command",
    "recovery_target_timeline",
    "recovery_target_action",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_inclusive",
)


class TargetBeyondWal(NoRestorePoint):
    """Recovery used up the WAL without finding a commit after the target time."""

    def __init__(self, message: str, *, redo_done: int | None = None) -> None:
        super().__init__(message)
        self.redo_done = redo_done


def redo_done_at(server_log: str) -> int | None:
    """Where the last recovery in `server_log` ran out of WAL ("redo done at X/Y"), if said."""
    done = _REDO_DONE.findall(server_log)
    return parse_lsn(done[-1]) if done else None


@dataclass(frozen=True)
class PitrResult:
    data_dir: Path
    source: str
    elapsed_s: float
    started: bool
    port: int | None = None
    restore_point: datetime | None = None
    timeline: int | None = None
    spool: Path | None = None
    run_as: str | None = None
    replayed_all: bool = False
    """A time target after the archive's last commit: everything was replayed instead."""


@dataclass(frozen=True)
class StartOptions:
    port: int | None = None
    run_as: str | None = None
    db_user: str = "postgres"
    """A role that exists in the restored cluster (the policy's source user), for checks."""


def resolve_run_as(target_dir: Path, run_as: str | None) -> str | None:
    """The OS user the server will run as when drbot is root (None when drbot is not root)."""
    if os.geteuid() != 0:
        if run_as is not None and run_as != pwd.getpwuid(os.geteuid()).pw_name:
            raise UsageError("--run-as needs drbot to run as root")
        return None
    if run_as is None:
        probe = target_dir if target_dir.exists() else target_dir.parent
        run_as = pwd.getpwuid(probe.stat().st_uid).pw_name
    try:
        user = pwd.getpwnam(run_as)
    except KeyError:
        raise UsageError(f"--run-as: there is no user {run_as!r}") from None
    if user.pw_uid == 0:
        raise UsageError(
            f"{target_dir} would make PostgreSQL run as root, which it refuses",
            hint="pass --run-as USER (e.g. --run-as postgres), or restore into a directory "
            "that user owns",
        )
    # The server and its restore_command run as that user: it must reach the directory.
    reach = subprocess.run(
        ["runuser", "-u", run_as, "--", "test", "-x", str(target_dir.parent)],
        capture_output=True,
        check=False,
    )
    if reach.returncode != 0:
        raise UsageError(
            f"the server would run as {run_as}, who cannot reach {target_dir.parent}",
            hint=f"let {run_as} traverse every directory on that path (chmod o+x), or "
            "restore somewhere it can reach",
        )
    return run_as


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


class _Runner:
    def __init__(self, bin_dir: Path, run_as: str | None) -> None:
        self.bin_dir = bin_dir
        self.run_as = run_as

    def argv(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", self.run_as, "--", *cmd] if self.run_as else cmd

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(tool, *args), capture_output=True, text=True, check=False)


def execute_pitr(
    plan: PitrPlan,
    scan: CatalogScan,
    storages: dict[str, Storage],
    keys: KeyCache,
    target_dir: Path,
    *,
    bin_dir: Path,
    start: StartOptions | None = None,
    run_as: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> PitrResult:
    """Restore `plan` into `target_dir` (new or empty); see the module docstring.

    Raises `UsageError` (target not empty), `IntegrityFailure` (no copy of the base backup
    checks out, a WAL file is damaged), `NoRestorePoint` (recovery ended before the target),
    `StorageUnavailable`, `KeyProblem`, `DatabaseError` (the server failed otherwise).
    """
    t0 = time.monotonic()
    target_dir = target_dir.absolute()
    ensure_empty_target(target_dir)
    staging = target_dir.parent / f".{target_dir.name}.drbot-staging"
    spool = target_dir.parent / f".{target_dir.name}.drbot-wal"
    shutil.rmtree(spool, ignore_errors=True)
    source, checked = unpack_base(plan, scan, storages, staging, progress)
    try:
        if not checked:
            verify_base(bin_dir, staging)
        if start is not None and not (staging / "postgresql.conf").exists():
            raise UsageError(
                "the base backup has no postgresql.conf: the source keeps its configuration "
                "outside the data directory (e.g. /etc/postgresql), so --start cannot run it",
                hint="restore without --start, then start it with that configuration",
            )
        spool.mkdir(mode=0o700)
        ordered = [storages[n] for n in plan.sources] + [
            s for n, s in storages.items() if n not in plan.sources
        ]
        filler = SpoolFiller(plan, ordered, keys, spool, wait=start is not None)
        reader = write_inventory(spool, filler.names)
        command = shlex.join(["sh", str(reader)])
        write_recovery(staging, recovery_settings(plan, f"{command} %f %p"))
        (staging / "log").mkdir(mode=0o700, exist_ok=True)
        if run_as is not None:
            _chown_tree(staging, run_as)
            _chown_tree(spool, run_as)
        sync_tree(staging)
        if target_dir.exists():
            target_dir.rmdir()
        staging.rename(target_dir)
        sync_dir(target_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)
        raise
    log.info("restore.unpacked", data_dir=str(target_dir), source=source, backup_id=plan.backup_id)
    if start is None:
        _fill_all(filler, target_dir, spool)
        return PitrResult(
            target_dir, source, time.monotonic() - t0, started=False, spool=spool, run_as=run_as
        )
    try:
        return _start_and_recover(
            plan, target_dir, spool, filler, source, start, bin_dir, run_as, t0
        )
    except TargetBeyondWal as exc:
        # PostgreSQL stops at the first commit after the target; with none in the archive it
        # fails even though all WAL up to the target may be there. Only when a heartbeat (the
        # server's own answer) proves the archive was complete at or after the target does
        # replaying all of it give the state at the target.
        t, confirmed = plan.target, plan.confirmed_until
        if t.kind != "time" or t.time is None:
            raise
        if confirmed is None or t.time > confirmed:
            raise NoRestorePoint(
                f"no commit after {t.describe()} is in the archive, and nothing proves the "
                "archive held all WAL up to that moment (no streamer heartbeat after it)",
                hint="restore --at the time of a commit you know, or --latest",
            ) from exc
        # Stop exactly where the first attempt ran out: the archive may have grown since.
        replay = Target("lsn", lsn=exc.redo_done) if exc.redo_done else Target("latest")
        log.warning(
            "restore.target_after_last_commit", target=t.describe(), replay=replay.describe()
        )
        again = execute_pitr(
            dataclasses.replace(plan, target=replay),
            scan,
            storages,
            keys,
            target_dir,
            bin_dir=bin_dir,
            start=start,
            run_as=run_as,
            progress=progress,
        )
        return dataclasses.replace(again, replayed_all=True, elapsed_s=time.monotonic() - t0)


def _wal_failure(filler: SpoolFiller, prefix: str) -> DrbotError:
    """The first WAL failure as drbot's error of the same kind (storage 15, key 12, else 13)."""
    name, why = next(iter(filler.failures.items()))
    cause = filler.errors.get(name)
    kind = (
        type(cause)
        if isinstance(cause, (StorageUnavailable, KeyProblem, IntegrityFailure))
        else IntegrityFailure
    )
    return kind(
        f"{prefix}WAL file {name} could not be used: {why}",
        hint="restore from another destination with --from, or to an earlier point",
    )


def _fill_all(filler: SpoolFiller, target_dir: Path, spool: Path) -> None:
    """Fetch every WAL file now (no server runs); on any failure remove what was written."""
    try:
        filler.run()
    except BaseException:
        filler.failures.setdefault("(interrupted)", "the restore was interrupted")
        raise
    finally:
        if filler.failures:
            # Without all its WAL the directory would recover to less than was asked.
            shutil.rmtree(target_dir, ignore_errors=True)
            shutil.rmtree(spool, ignore_errors=True)
    if filler.failures:
        raise _wal_failure(filler, "")


def _start_and_recover(
    plan: PitrPlan,
    data_dir: Path,
    spool: Path,
    filler: SpoolFiller,
    source: str,
    start: StartOptions,
    bin_dir: Path,
    run_as: str | None,
    t0: float,
) -> PitrResult:
    runner = _Runner(bin_dir, run_as)
    sockets = Path(tempfile.mkdtemp(prefix="drbot-restore-"))
    hba = sockets / "recovery_hba.conf"
    hba.write_text("local all all trust\n")
    if run_as is not None:
        _chown_tree(sockets, run_as)
    port = start.port or free_port()
    logfile = data_dir / "log" / "drbot-restore.log"
    thread = threading.Thread(target=filler.run, name="drbot-wal-spool", daemon=True)
    thread.start()
    promoted = False
    try:
        private = f"-p {port} -c listen_addresses='' -k {sockets} -c hba_file={hba}"
        # -W: recovery may take long; _wait_promoted watches it (and the spool) instead.
        proc = runner.run(
            "pg_ctl", "-D", str(data_dir), "-l", str(logfile), "-o", private, "-W", "start"
        )
        if proc.returncode != 0:
            raise DatabaseError(
                f"pg_ctl could not start the restored server: {proc.stderr.strip()}\n"
                f"{_log_tail(logfile)}"
            )
        uri = f"host={sockets} port={port} dbname=template1 user={start.db_user}"
        restore_point = _wait_promoted(uri, data_dir, logfile, filler)
        promoted = True
        timeline = _finish(runner, data_dir, logfile, port, sockets)
    except BaseException:
        filler.stop.set()
        runner.run("pg_ctl", "-D", str(data_dir), "-m", "immediate", "-w", "stop")
        if not promoted:
            shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
        raise
    finally:
        filler.stop.set()
        thread.join(timeout=30)
        shutil.rmtree(spool, ignore_errors=True)
    log.info(
        "restore.promoted",
        data_dir=str(data_dir),
        port=port,
        restore_point=restore_point.isoformat() if restore_point else None,
    )
    return PitrResult(
        data_dir,
        source,
        time.monotonic() - t0,
        started=True,
        port=port,
        restore_point=restore_point,
        timeline=timeline,
        run_as=run_as,
    )


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _log_tail(logfile: Path, lines: int = 15) -> str:
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _replay_timestamp(uri: str) -> datetime | None:
    """The last replayed commit's time, once the promoted server accepts connections."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(uri, autocommit=True, connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()
                return row[0] if row is not None and isinstance(row[0], datetime) else None
        except psycopg.Error as exc:
            if time.monotonic() > deadline:
                # Only the report suffers: the data is there.
                log.warning("restore.replay_time_unknown", error=str(exc))
                return None
            time.sleep(0.2)


def _wait_promoted(uri: str, data_dir: Path, logfile: Path, filler: SpoolFiller) -> datetime | None:
    last_report = started = time.monotonic()
    pid: int | None = None
    while True:
        # pg_ctl -W returns before the postmaster writes its pid file.
        pid = pid or _postmaster_pid(data_dir)
        starting = pid is None and time.monotonic() - started < 60
        if not starting and (pid is None or not pid_alive(pid)):
            time.sleep(0.3)  # let the log be written
            tail = _log_tail(logfile)
            if filler.failures:
                raise _wal_failure(filler, "recovery stopped: ")
            if BEFORE_TARGET in tail:
                raise TargetBeyondWal(
                    f"the WAL ends before the recovery target; the server said:\n{tail}",
                    redo_done=redo_done_at(_log_tail(logfile, 200)),
                )
            raise DatabaseError(f"the restored server stopped during recovery:\n{tail}")
        # The server removes recovery.signal when archive recovery is over (promotion).
        if pid is not None and not (data_dir / "recovery.signal").exists():
            return _replay_timestamp(uri)
        if time.monotonic() - last_report > 10:
            log.info("restore.recovering", data_dir=str(data_dir))
            last_report = time.monotonic()
        time.sleep(0.2)


def _drop_recovery_settings(path: Path) -> None:
    """Remove the recovery settings drbot appended (the server is stopped)."""
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.split("=", 1)[0].strip() not in _RESET_AFTER
    ]
    tmp = path.with_name(path.name + ".drbot-tmp")
    tmp.write_text("\n".join(keep) + "\n")
    shutil.copymode(path, tmp)
    stat = path.stat()
    os.chown(tmp, stat.st_uid, stat.st_gid)
    tmp.replace(path)


def _control_timeline(runner: _Runner, data_dir: Path) -> int | None:
    proc = runner.run("pg_controldata", str(data_dir))
    m = re.search(r"Latest checkpoint's TimeLineID:\s+(\d+)", proc.stdout)
    return int(m.group(1)) if m else None


def _finish(runner: _Runner, data_dir: Path, logfile: Path, port: int, sockets: Path) -> int | None:
    """Drop the recovery settings and restart with the cluster's own access rules; returns
    the new timeline. No SQL: the policy's role need not be a superuser."""
    stopped = runner.run("pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "-t", "300", "stop")
    if stopped.returncode != 0:
        raise DatabaseError(
            f"the restored server was promoted but did not stop for its restart: "
            f"{stopped.stderr.strip()}"
        )
    _drop_recovery_settings(data_dir / "postgresql.auto.conf")
    timeline = _control_timeline(runner, data_dir)
    public = f"-p {port} -c listen_addresses=127.0.0.1 -k {sockets}"
    proc = runner.run(
        "pg_ctl", "-D", str(data_dir), "-l", str(logfile), "-o", public, "-w", "-t", "120", "start"
    )
    if proc.returncode != 0:
        raise DatabaseError(
            f"the restored server was promoted but did not restart on port {port}:\n"
            f"{_log_tail(logfile)}"
        )
    os.chmod(sockets, 0o755)  # noqa: S103 - the socket directory, so local users can connect
    return timeline
