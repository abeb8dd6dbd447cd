"""A physical restore inside a sandbox: base backup and WAL fetched on the host, then the
sandbox's server replays and promotes on a private socket.

Promotion is read from the server itself (recovery.signal gone while it runs), never from a
login, so a role problem cannot pass for slow recovery. A time target with no commit after it
in the archive is replayed to where the first attempt ran out, but only when a streamer
heartbeat proves the archive was complete at that moment (the rule `drbot restore` follows).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import structlog

from drbot.catalog import CatalogScan
from drbot.drills import checks as chk
from drbot.drills.plan import CheckResult
from drbot.drills.sandbox import Session
from drbot.engines.postgres.wal import format_lsn, parse_lsn, parse_segment_name
from drbot.errors import DrillFailed, IntegrityFailure, NoRestorePoint
from drbot.ops.pitr import PitrPlan, Target
from drbot.ops.pitr_exec import BEFORE_TARGET, TargetBeyondWal, execute_pitr, redo_done_at
from drbot.ops.walstore import KeyCache
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

SERVER_OPTIONS = (
    "-c listen_addresses='' -c ssl=off -c archive_mode=off -c logging_collector=off "
    "-c shared_buffers=128MB -c hot_standby=on -c shared_preload_libraries='' "
    "-c unix_socket_group='' -c max_logical_replication_workers=0"
)
"""Sandbox overrides of the source's settings: no TCP, no archiving into the real archive, no
subscription reaching a real publisher, nothing the image may lack."""

_DAMAGE = ("PANIC", "invalid", "checksum", "could not read", "incorrect", "corrupt")

Phase = Callable[[str], AbstractContextManager[None]]


@dataclass(frozen=True)
class Replayed:
    plan: PitrPlan
    """The plan carried out (after a replay-everything retry, its target is an LSN)."""
    restore_point: datetime | None
    replay_lsn: int | None
    replayed_all: bool = False


@dataclass(frozen=True)
class Inputs:
    """What a physical drill restore reads from and runs in."""

    session: Session
    scan: CatalogScan
    storage: Storage
    keys: KeyCache
    bin_dir: Path
    """The host's client tools (pg_verifybackup)."""
    user: str
    """A role of the restored cluster to read the replay position as."""
    timeout_s: float
    phase: Phase


def restore_physical(job: Inputs, plan: PitrPlan) -> Replayed:
    """Restore `plan` into the sandbox and promote it; see the module docstring.

    Raises `IntegrityFailure` (a damaged base backup or WAL, or a server that fails recovery
    with signs of damage), `NoRestorePoint` (the archive cannot reach the target), `DrillFailed`
    (the server failed otherwise, or outlasted the timeout), `SandboxUnavailable`, and what
    `execute_pitr` raises.
    """
    try:
        return _attempt(job, plan)
    except TargetBeyondWal as exc:
        t, confirmed = plan.target, plan.confirmed_until
        if t.kind != "time" or t.time is None or confirmed is None or t.time > confirmed:
            raise NoRestorePoint(
                f"no commit after {t.describe()} is in the archive, and nothing proves the "
                "archive held all WAL up to that moment (no streamer heartbeat after it)"
            ) from exc
        replay = Target("lsn", lsn=exc.redo_done) if exc.redo_done else Target("latest")
        log.info("drill.target_after_last_commit", target=t.describe(), replay=replay.describe())
        _wipe(job.session)
        done = _attempt(job, dataclasses.replace(plan, target=replay))
        return dataclasses.replace(done, replayed_all=True)


def _attempt(job: Inputs, plan: PitrPlan) -> Replayed:
    session = job.session
    work = session.workdir
    data, sock, logs = work / "data", work / "sock", work / "log"
    with job.phase("fetch"):
        storages = {job.storage.name: job.storage}
        result = execute_pitr(plan, job.scan, storages, job.keys, data, bin_dir=job.bin_dir)
    with job.phase("start"):
        for d in (sock, logs):
            d.mkdir(mode=0o700)
        hba = work / "hba.conf"
        hba.write_text("local all all trust\n")
        hba.chmod(0o644)
        conf = data / "postgresql.conf"
        if not conf.exists():
            # The source keeps its configuration outside the data directory (Debian's
            # /etc/postgresql): defaults serve a drill, which only reads the data.
            conf.write_text("# written by drbot for a drill: the source's was not in the backup\n")
        assert result.spool is not None  # execute_pitr without start always spools
        session.give(data, result.spool, logs)
        session.give_socket_dir(sock)
        logfile = logs / "server.log"
        options = f"-p {chk.PORT} -k {sock} -c hba_file={hba} {SERVER_OPTIONS}"
        started = session.run(
            ["pg_ctl", "-D", str(data), "-l", str(logfile), "-o", options, "-W", "start"]
        )
        if started.returncode != 0:
            raise DrillFailed(
                f"the restored server did not start: {started.stderr.strip()}\n"
                f"{log_tail(session, logfile)}"
            )
        _wait_promoted(session, data, logfile, time.monotonic() + job.timeout_s)
        point, lsn = _replay_position(sock, job.user)
    return Replayed(plan, point, lsn)


def _wait_promoted(session: Session, data: Path, logfile: Path, deadline: float) -> None:
    begun = time.monotonic()
    seen_running = False
    while True:
        status = session.run(["pg_ctl", "-D", str(data), "status"])
        if status.returncode == 0:
            seen_running = True
            # The server removes recovery.signal when archive recovery is over (promotion).
            if session.run(["test", "-e", str(data / "recovery.signal")]).returncode == 1:
                return
        elif status.returncode == 3:
            # pg_ctl -W returns before the postmaster writes its pid file: "not running"
            # means stopped once it ran, once its log says why, or after a grace time.
            tail = log_tail(session, logfile)
            if seen_running or "FATAL" in tail or time.monotonic() - begun > 60:
                raise _failure(session, logfile, tail)
        if time.monotonic() > deadline:
            raise DrillFailed(
                "the restored server was still recovering when the drill's timeout "
                f"(drill.timeout) ran out:\n{log_tail(session, logfile)}"
            )
        time.sleep(0.3)


def _failure(session: Session, logfile: Path, tail: str) -> Exception:
    if BEFORE_TARGET in tail:
        return TargetBeyondWal(
            f"the WAL ends before the drill's restore point; the server said:\n{tail}",
            redo_done=redo_done_at(log_tail(session, logfile, 400)),
        )
    if any(word in tail for word in _DAMAGE):
        return IntegrityFailure(f"the restored server failed during recovery:\n{tail}")
    return DrillFailed(
        "the restored server stopped during recovery, with no sign of damaged data (look at "
        f"drill.memory, the image, the source's settings):\n{tail}"
    )


def _replay_position(sock: Path, user: str) -> tuple[datetime | None, int | None]:
    """The last replayed commit's time and the last replayed WAL position."""
    info = chk.conninfo(sock, user, "template1")
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(info, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn()::text"
                ).fetchone()
            break
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise DrillFailed(
                    f"the restored server was promoted, but drbot cannot log in as {user!r}: "
                    f"{str(exc).strip()}",
                    hint="the user in source.uri must exist in the cluster and may connect to "
                    "template1",
                ) from exc
            time.sleep(0.3)
    if row is None:
        return None, None
    point = row[0] if isinstance(row[0], datetime) else None
    return point, parse_lsn(row[1]) if row[1] else None


def _wipe(session: Session) -> None:
    """Stop the server and remove what the failed attempt left, for a second attempt."""
    work = session.workdir
    session.run(["pg_ctl", "-D", str(work / "data"), "-m", "immediate", "-w", "stop"])
    leftovers = [work / "data", work / ".data.drbot-wal", work / "sock", work / "log"]
    session.run(["rm", "-rf", *map(str, leftovers)], root=True)


def log_tail(session: Session, logfile: Path, lines: int = 20) -> str:
    done = session.run(["tail", "-n", str(lines), str(logfile)])
    return done.stdout.strip() or "(no server log)"


def wal_replay_check(replayed: Replayed) -> CheckResult:
    """Recovery consumed the WAL the plan fetched: it reached at least the start of the last
    planned file (the end of the base backup when there is none), and stopped no later than
    a time target."""
    plan = replayed.plan
    minimum = plan.stop_lsn
    if plan.target.kind == "latest" and plan.wal:
        seg = parse_segment_name(plan.wal[-1].name, plan.segment_size)
        if seg is not None:
            minimum = max(minimum, seg.start_lsn(plan.segment_size))
    elif plan.target.kind == "lsn" and plan.target.lsn is not None:
        minimum = max(minimum, plan.target.lsn)
    lsn, point = replayed.replay_lsn, replayed.restore_point
    reached = format_lsn(lsn) if lsn is not None else "an unknown position"
    when = f", last commit {point.isoformat()}" if point else ", no commit after the base backup"
    detail = (
        f"replayed {len(plan.wal)} WAL file(s) to {reached}{when}; the plan needs at least "
        f"{format_lsn(minimum)}"
    )
    if replayed.replayed_all:
        detail += "; no commit after the target was archived, so everything was replayed"
    passed = lsn is not None and lsn >= minimum
    t = plan.target
    if replayed.replayed_all is False and t.kind == "time" and t.time and point and point > t.time:
        passed = False
        detail += f"; but it replayed past the target {t.time.isoformat()}"
    return CheckResult("wal_replay", passed, detail)
