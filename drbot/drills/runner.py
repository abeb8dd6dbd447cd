"""The drill: restore a policy's backup into a sandbox, check it, and measure RTO and RPO.

`run_drill` never raises for what happens to the drill itself: a restore that fails, a check
that fails, a target that is missed all end up in the returned `DrillReport` (with the drbot
error that says why, and its exit code), so the caller can always keep the evidence. It raises
only for what comes before a drill exists (an unknown destination, no backup to drill).

Phases (their durations are in the report): `provision` (the sandbox), `fetch` (physical: base
backup unpacked and every WAL file fetched and checked), `restore` (logical: streamed from the
destination into the server), `start` (server start and, for physical, WAL replay up to
promotion), `checks`. RTO is the wall time from drill start to the end of the checks; RPO is the
age, at drill start, of the newest point the drilled destination could restore to.
"""

from __future__ import annotations

import random
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog

from drbot import __version__
from drbot.catalog import BackupEntry, CatalogScan, scan_catalog
from drbot.clock import SystemClock
from drbot.drills import checks as chk
from drbot.drills import mongo as mongo_drill
from drbot.drills.physical import (
    SERVER_OPTIONS,
    Inputs,
    log_tail,
    restore_physical,
    wal_replay_check,
)
from drbot.drills.plan import (
    CheckResult,
    pick_destination,
    pick_logical_backup,
    pick_time,
    target_checks,
)
from drbot.drills.sandbox import Sandbox, Session
from drbot.engines.mongodb.position import ts_datetime
from drbot.engines.postgres.engine import PostgresEngine, uri_field
from drbot.errors import (
    DrbotError,
    DrillFailed,
    Interrupted,
    NoRestorePoint,
    SandboxUnavailable,
)
from drbot.ops.mongo_restore import MongoRestorePlan
from drbot.ops.pitr import PitrPlan, Target, plan_pitr, read_archive
from drbot.ops.restore import execute_restore, plan_restore
from drbot.ops.walstore import KeyCache
from drbot.pipeline.keys import KeyProvider
from drbot.policy.schema import Policy, RandomWithin
from drbot.storage.base import Storage
from drbot.storage.layout import new_backup_id

log = structlog.get_logger(__name__)

SANDBOX_SUPERUSER = "postgres"
"""The superuser of a cluster drbot initialises in the sandbox for a logical restore."""


@dataclass
class DrillReport:
    """Everything a drill found; `to_record()` is the evidence stored and signed."""

    drill_id: str
    policy: str
    mode: str
    sandbox: str
    destination: str
    started_at: datetime
    pick: str
    image: str | None = None
    backup_id: str | None = None
    target: str | None = None
    restore_point: datetime | None = None
    rpo_s: float | None = None
    rto_s: float | None = None
    rto_target_s: float | None = None
    rpo_target_s: float | None = None
    checks: list[CheckResult] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    finished_at: datetime | None = None
    error: DrbotError | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error.exit_code
        return 0 if self.passed else DrillFailed.exit_code

    def failure(self) -> DrbotError | None:
        """The error the drill ends with: its own, or DrillFailed naming what failed."""
        if self.error is not None:
            return self.error
        failed = [c for c in self.checks if not c.passed]
        if not failed:
            return None
        return DrillFailed(
            "drill failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
            hint="runbooks/dr-drill.md says what to do, in order",
        )

    def to_record(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {
            "drill_id": self.drill_id,
            "policy": self.policy,
            "mode": self.mode,
            "sandbox": self.sandbox,
            "image": self.image,
            "destination": self.destination,
            "pick": self.pick,
            "backup_id": self.backup_id,
            "target": self.target,
            "restore_point": iso(self.restore_point),
            "rto_s": _round(self.rto_s),
            "rpo_s": _round(self.rpo_s),
            "targets": {"rto_s": self.rto_target_s, "rpo_s": self.rpo_target_s},
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "passed": self.passed,
            "error": None
            if self.error is None
            else {"message": self.error.message, "exit_code": self.error.exit_code},
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "host": socket.gethostname(),
            "drbot_version": __version__,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


@dataclass(frozen=True)
class DrillContext:
    """What a drill needs from outside: the policy, its destinations and key, a sandbox."""

    policy: Policy
    storages: Sequence[Storage]
    keys: KeyProvider
    sandbox: Sandbox
    bin_dir: Path | None
    """The host's PostgreSQL client tools (pg_restore, pg_verifybackup); None for MongoDB."""


def run_drill(
    ctx: DrillContext,
    *,
    at: datetime | None = None,
    from_destination: str | None = None,
    last_destination: str | None = None,
    rng: random.Random | None = None,
    progress: Callable[[str], None] | None = None,
) -> DrillReport:
    """Run one drill; see the module docstring for what is raised and what is reported."""
    say = progress or (lambda _msg: None)
    policy = ctx.policy
    t0 = time.monotonic()
    started = datetime.now(UTC)
    dest = pick_destination(
        [d.name for d in policy.destinations],
        policy.drill.from_,
        from_destination,
        last_destination,
    )
    storage = next(s for s in ctx.storages if s.name == dest)
    pick = _pick_label(policy, at)
    report = DrillReport(
        drill_id=new_backup_id(started),
        policy=policy.name,
        mode=str(policy.source.mode or "logical"),
        sandbox=ctx.sandbox.kind,
        destination=dest,
        started_at=started,
        pick=pick,
        rto_target_s=_secs(policy.targets.rto),
        rpo_target_s=_secs(policy.targets.rpo),
    )
    log.info("drill.started", policy=policy.name, destination=dest, drill_id=report.drill_id)
    try:
        with _phase(report, "plan"):
            say(f"Reading the catalog of {dest}")
            chosen = _choose(ctx, report, storage, started, at, rng)
        t_prov = time.monotonic()
        say(f"Provisioning a {ctx.sandbox.kind} sandbox")
        cleanup_from: float | None = None
        try:
            with ctx.sandbox.provision(policy=policy.name, major=chosen.major) as session:
                report.phases["provision"] = time.monotonic() - t_prov
                report.image = session.description
                if chosen.mongo is not None:
                    _restore_mongo(report, session, chosen, storage, say)
                else:
                    login, dbs = _restore(ctx, report, session, chosen, storage, say)
                    with _phase(report, "checks"):
                        say("Checking the restored data")
                        _run_checks(report, session, policy, login, dbs)
                report.rto_s = time.monotonic() - t0
                report.checks += target_checks(
                    rto_s=report.rto_s,
                    rpo_s=report.rpo_s,
                    rto_target=policy.targets.rto,
                    rpo_target=policy.targets.rpo,
                )
                cleanup_from = time.monotonic()
        finally:
            if cleanup_from is not None:
                report.phases["cleanup"] = time.monotonic() - cleanup_from
    except DrbotError as exc:
        report.error = exc
    except KeyboardInterrupt:
        report.error = Interrupted("the drill was interrupted; its sandbox was removed")
    report.finished_at = datetime.now(UTC)
    log.info(
        "drill.completed" if report.passed else "drill.failed",
        policy=policy.name,
        drill_id=report.drill_id,
        destination=dest,
        rto_s=_round(report.rto_s),
        rpo_s=_round(report.rpo_s),
        error=report.error.message if report.error else None,
    )
    return report


@contextmanager
def _phase(report: DrillReport, name: str) -> Iterator[None]:
    t = time.monotonic()
    try:
        yield
    finally:
        report.phases[name] = report.phases.get(name, 0.0) + time.monotonic() - t


def _secs(d: Any) -> float | None:
    return None if d is None else float(d.total_seconds())


def _pick_label(policy: Policy, at: datetime | None) -> str:
    if at is not None:
        return f"at {at.isoformat()}"
    pick = policy.drill.pick
    if isinstance(pick, RandomWithin):
        return f"random within {int(pick.random_within.total_seconds())}s"
    return "latest"


def _random_within(policy: Policy) -> RandomWithin | None:
    pick = policy.drill.pick
    return pick if isinstance(pick, RandomWithin) else None


def _major(scan: CatalogScan, backup_id: str) -> int:
    entry = scan.find(backup_id)
    m = re.match(r"\s*(\d+)", entry.manifest.source_version if entry else "")
    return int(m.group(1)) if m else 0


def _source_user(policy: Policy) -> str:
    return uri_field(policy.source.uri, "user", "postgres")


def _source_db(policy: Policy) -> str:
    return uri_field(policy.source.uri, "dbname", "postgres")


@dataclass(frozen=True)
class _Chosen:
    scan: CatalogScan
    keys: KeyCache
    major: int
    pitr: PitrPlan | None = None
    entry: BackupEntry | None = None
    mongo: MongoRestorePlan | None = None


def _choose(
    ctx: DrillContext,
    report: DrillReport,
    storage: Storage,
    started: datetime,
    at: datetime | None,
    rng: random.Random | None,
) -> _Chosen:
    """Pick the backup and restore point; fills in the report's backup, target and RPO."""
    policy = ctx.policy
    scan = scan_catalog(policy.name, [storage], ctx.keys)
    if storage.name in scan.unreachable:
        raise scan.unreachable[storage.name]
    keys = KeyCache(ctx.keys)
    if policy.source.kind == "mongodb":
        every = policy.source.databases is None
        mplan = mongo_drill.plan(
            scan,
            storage,
            policy=policy.name,
            at=at or _random_at(policy, scan, started, rng),
            every_database=every,
            keys=keys,
        )
        report.backup_id = mplan.backup_id
        report.target = (
            "latest" if mplan.target_time is None else ts_datetime(mplan.target_time).isoformat()
        )
        latest = mongo_drill.plan(
            scan, storage, policy=policy.name, at=None, every_database=every, keys=keys
        )
        report.rpo_s = max(0.0, (started - ts_datetime(latest.reach)).total_seconds())
        return _Chosen(scan, keys, _major(scan, mplan.backup_id), mongo=mplan)
    if policy.source.mode == "physical":
        pitr, newest = _plan_physical(policy, scan, storage, keys, started, at, rng)
        report.backup_id, report.target = pitr.backup_id, pitr.target.describe()
        chosen = _Chosen(scan, keys, _major(scan, pitr.backup_id), pitr=pitr)
    else:
        entry = _plan_logical(policy, scan, storage.name, started, at, rng)
        report.backup_id, report.target = entry.backup_id, report.pick
        newest = max(b.manifest.started_at for b in scan.backups)
        chosen = _Chosen(scan, keys, _major(scan, entry.backup_id), entry=entry)
    report.rpo_s = max(0.0, (started - newest).total_seconds()) if newest else None
    return chosen


def _restore(
    ctx: DrillContext,
    report: DrillReport,
    session: Session,
    chosen: _Chosen,
    storage: Storage,
    say: Callable[[str], None],
) -> tuple[str, list[str] | None]:
    """Restore into the sandbox; the role to log in as, and the databases restored (None: the
    whole cluster, physical)."""
    if chosen.pitr is not None:
        say(f"Fetching base backup {chosen.pitr.backup_id} and {len(chosen.pitr.wal)} WAL file(s)")
        user = _source_user(ctx.policy)
        assert ctx.bin_dir is not None  # PostgreSQL policies always have their tools found
        job = Inputs(
            session=session,
            scan=chosen.scan,
            storage=storage,
            keys=chosen.keys,
            bin_dir=ctx.bin_dir,
            user=user,
            timeout_s=ctx.policy.drill.timeout.total_seconds(),
            phase=lambda name: _phase(report, name),
        )
        replayed = restore_physical(job, chosen.pitr)
        report.restore_point = replayed.restore_point
        report.checks.append(
            CheckResult(
                "base_backup",
                True,
                "every file matched PostgreSQL's backup_manifest, whose SHA-256 matched drbot's "
                "manifest (pg_verifybackup)",
            )
        )
        report.checks.append(wal_replay_check(replayed))
        return user, None
    assert chosen.entry is not None
    dbs = _logical(ctx, report, session, chosen.entry, chosen.scan, storage, say)
    report.restore_point = chosen.entry.manifest.started_at
    return SANDBOX_SUPERUSER, dbs


def _restore_mongo(
    report: DrillReport,
    session: Session,
    chosen: _Chosen,
    storage: Storage,
    say: Callable[[str], None],
) -> None:
    """Restore a MongoDB policy's backup (and slices) into a mongod in the sandbox."""
    mplan = chosen.mongo
    assert mplan is not None
    with ExitStack() as stack:
        with _phase(report, "start"):
            say("Starting an empty mongod")
            server = stack.enter_context(mongo_drill.sandbox_server(session))
        with _phase(report, "restore"):
            say(f"Restoring backup {mplan.backup_id} and {len(mplan.slices)} slice(s)")
            result = mongo_drill.restore(server, mplan, chosen.scan, storage, chosen.keys)
        report.restore_point = result.reached_at
        with _phase(report, "checks"):
            report.checks += mongo_drill.checks(mplan, result)


def _random_at(
    policy: Policy, scan: CatalogScan, now: datetime, rng: random.Random | None
) -> datetime | None:
    """A random moment to drill when the policy picks `random_within` (None: latest)."""
    within = _random_within(policy)
    if within is None or not scan.backups:
        return None
    earliest = min(b.manifest.completed_at for b in scan.backups)
    at = pick_time(now, earliest, now, within.random_within, rng or random.SystemRandom())
    return None if at >= now else at


# -- planning (reads the catalog; the choices themselves are pure, in drills.plan) ---------------


def _plan_logical(
    policy: Policy,
    scan: CatalogScan,
    dest: str,
    now: datetime,
    at: datetime | None,
    rng: random.Random | None,
) -> BackupEntry:
    backups = [b for b in scan.backups if dest in b.destinations]
    if not backups:
        raise NoRestorePoint(
            f"destination {dest} holds no complete backup of policy {policy.name} to drill",
            hint=f"drbot backup --policy {policy.name}",
        )
    within = _random_within(policy)
    if at is None and within is not None:
        at = pick_time(
            now,
            backups[0].manifest.started_at,
            backups[-1].manifest.started_at,
            within.random_within,
            rng or random.SystemRandom(),
        )
    return pick_logical_backup(backups, at)


def _plan_physical(
    policy: Policy,
    scan: CatalogScan,
    storage: Storage,
    keys: KeyCache,
    now: datetime,
    at: datetime | None,
    rng: random.Random | None,
) -> tuple[PitrPlan, datetime | None]:
    """The PITR plan to drill and the newest point the destination can restore to."""
    wal, histories = read_archive(policy.name, [storage], scan, keys)

    def plan(target: Target) -> PitrPlan:
        return plan_pitr(
            scan, wal, histories, policy=policy.name, target=target, from_destination=storage.name
        )

    latest = plan(Target("latest"))
    points = [t for t in (latest.window_end, latest.confirmed_until) if t is not None]
    newest = max(points) if points else None
    within = _random_within(policy)
    if at is None and within is not None and newest is not None:
        earliest = min(b.manifest.completed_at for b in scan.backups)
        at = pick_time(now, earliest, newest, within.random_within, rng or random.SystemRandom())
        if at >= newest:
            at = None
    return (latest if at is None else plan(Target("time", time=at))), newest


# -- restoring into the sandbox ----------------------------------------------------------------


def _logical(
    ctx: DrillContext,
    report: DrillReport,
    session: Session,
    entry: BackupEntry,
    scan: CatalogScan,
    storage: Storage,
    say: Callable[[str], None],
) -> list[str]:
    work = session.workdir
    data, sock, logs = work / "data", work / "sock", work / "log"
    with _phase(report, "start"):
        say("Starting an empty server")
        for d in (data, sock, logs):
            d.mkdir(mode=0o700)
        session.give(data, logs)
        session.give_socket_dir(sock)
        init = session.run(
            [
                "initdb",
                "-D",
                str(data),
                "-U",
                SANDBOX_SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        if init.returncode != 0:
            raise SandboxUnavailable(f"initdb failed in the sandbox: {init.stderr.strip()}")
        logfile = logs / "server.log"
        started = session.run(
            [
                "pg_ctl",
                "-D",
                str(data),
                "-l",
                str(logfile),
                "-o",
                f"-p {chk.PORT} -k {sock} {SERVER_OPTIONS}",
                "-w",
                "-t",
                "120",
                "start",
            ]
        )
        if started.returncode != 0:
            raise SandboxUnavailable(
                f"the sandbox server did not start: {started.stderr.strip()}\n"
                f"{log_tail(session, logfile)}"
            )
    dbs = [a.database for a in entry.manifest.artifacts if a.kind == "pg_dump" and a.database]
    has_globals = any(a.kind == "pg_globals" for a in entry.manifest.artifacts)
    with _phase(report, "restore"):
        for index, db in enumerate(dbs):
            say(f"Restoring database {db} of backup {entry.backup_id}")
            uri = chk.conninfo(sock, SANDBOX_SUPERUSER, db)
            plan = plan_restore(
                scan,
                policy=ctx.policy.name,
                target=f"{session.kind} sandbox/{db}",
                target_state="missing",
                backup_id=entry.backup_id,
                from_destination=storage.name,
                database=db,
                with_globals=has_globals and index == 0,
            )
            engine = PostgresEngine(uri, None, bin_dir=ctx.policy.source.bin_dir)
            result = execute_restore(
                plan, scan, {storage.name: storage}, engine, uri, SystemClock()
            )
            report.checks.append(
                chk.fingerprint_check(db, result.fingerprint_checked, result.mismatches)
            )
    return dbs


def _run_checks(
    report: DrillReport,
    session: Session,
    policy: Policy,
    login: str,
    dbs: list[str] | None,
) -> None:
    sock = session.workdir / "sock"
    default_db = _source_db(policy)
    try:
        superuser = chk.find_superuser(sock, login, default_db if dbs is None else dbs[0])
        all_dbs = chk.databases(sock, superuser, "template1") if dbs is None else dbs
    except psycopg.Error as exc:
        report.checks.append(
            CheckResult("connect", False, f"cannot query the restored server: {exc}")
        )
        return
    report.checks.append(chk.amcheck(sock, superuser, all_dbs))
    if policy.drill.checks:
        checker = chk.check_role(sock, superuser, default_db if dbs is None else dbs[0])
        report.checks += chk.custom_checks(sock, checker, policy.drill.checks, default_db)
