"""The daemon: every policy's schedules, streamer, lease, checks and alerts, until stopped.

Wiring only. Each job is the drbot command a person would run (`drbot.daemon.jobs`), so what a
job does is decided there, once. What lives here is when and whether jobs run:

- A policy is acted on only while this daemon holds its lease (`drbot.ops.lease`, in the
  primary destination). Without it, scheduled runs are skipped and no streamer runs; the
  daemon keeps trying and takes over when the holder stops renewing.
- Scheduled jobs (APScheduler): `full` (then `prune` when the backup succeeded), `drill`,
  `verify`. One run of a job at a time; a fire while it still runs is skipped. A run missed
  while no daemon held the policy (down, or the lease elsewhere) runs once when the lease is
  taken, unless the next regular run is close anyway; a full backup that never ran here runs
  at once, so a new sidecar does not leave a database unprotected until the first cron time.
- `incremental: continuous` runs a supervised `drbot wal stream` (PostgreSQL, physical) or
  `drbot changes stream` (MongoDB).
- Every `check_interval`: the newest restorable point (`drbot list --json`: RPO) and whether
  each destination answers; alerts for RPO over target and a streamer down.
- Every `audit_ship_interval`, and once more when stopping: `drbot audit ship`, so the trail's
  head is anchored in every destination (daemon-wide, whether or not a lease is held: each
  daemon ships its own trail).
- SIGTERM: no new runs; running jobs get `grace_period` to finish, then SIGINT (they clean up
  and exit), then SIGKILL; streamers stop at once (shipping their unfinished segment); leases
  are released; exit 0. SIGINT (Ctrl-C) does the same without the grace period. SIGHUP
  reloads policies, keeping the old ones if the new ones are invalid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from drbot.audit.trail import FileAuditTrail
from drbot.clock import Clock, SystemClock
from drbot.daemon.alerts import Alert, AlertBook, Condition, Notifier
from drbot.daemon.http import HealthServer
from drbot.daemon.jobs import JobProcess, JobResult, child_env, drbot_command, exit_name
from drbot.daemon.metrics import DaemonMetrics
from drbot.daemon.streamer import SupervisedStreamer
from drbot.errors import DrbotError, PolicyInvalid
from drbot.ops.lease import Lease
from drbot.policy import Policy
from drbot.policy.cron import schedule_trigger
from drbot.policy.schema import Alerts
from drbot.settings import Settings
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

AUDIT_SHIP = "audit-ship"
"""The daemon-wide job's name (metrics label `job`, with `policy` empty)."""
FINAL_SHIP_TIMEOUT_S = 30.0
"""How long the last shipment at stop may take before it is abandoned (the next start ships)."""
INTERRUPTED_EXITS = (130, -2, -15)
"""How a job ends when the daemon interrupts it: drbot's exit 130, or killed by SIGINT/SIGTERM."""
STREAMER_DOWN_ALERT_S = 120.0
"""A streamer not connected this long is alerted on (reconnects take seconds)."""
CATCH_UP_MARGIN = 0.25
"""A missed run is caught up unless the next regular run is within this part of a period."""


@dataclass
class PolicyRuntime:
    """What the daemon keeps per policy."""

    policy: Policy
    lease: Lease
    primary: Storage
    storages: list[Storage]
    streamer: SupervisedStreamer | None = None
    running: dict[str, JobProcess] = field(default_factory=dict)
    guards: dict[str, threading.Lock] = field(default_factory=dict)
    writer: threading.Lock = field(default_factory=threading.Lock)
    held: bool = False
    retiring: bool = False
    """Removed or replaced by a reload: its jobs' interruptions are ours, not failures."""
    destinations_ok: dict[str, bool] = field(default_factory=dict)
    rpo_s: float | None = None
    next_check: float = 0.0
    next_lease_tick: float = 0.0
    checking: bool = False
    archived_at: datetime | None = None
    lease_error_since: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    beat: float = field(default_factory=time.monotonic)

    def guard(self, kind: str) -> threading.Lock:
        return self.guards.setdefault(kind, threading.Lock())


@dataclass(frozen=True)
class DaemonOptions:
    """What tests and the demo may tune; defaults are production values."""

    streamer_down_alert_s: float = STREAMER_DOWN_ALERT_S


class Daemon:
    """One daemon process; `run()` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        policies: list[Policy],
        *,
        build_storages: Callable[[Policy], list[Storage]],
        load: Callable[[], list[Policy]],
        env: Mapping[str, str],
        clock: Clock | None = None,
        options: DaemonOptions | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.options = options or DaemonOptions()
        self._build_storages = build_storages
        self._load = load
        # Jobs' own info lines (each WAL segment, each artifact) would drown the daemon's
        # one summary per job; they log warnings and errors unless debugging.
        child_level = "debug" if settings.log_level == "debug" else "warning"
        self._env = child_env(env, policies=settings.policies, log_level=child_level)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.metrics = DaemonMetrics()
        self.trail = FileAuditTrail(
            settings.audit_directory, self.clock, key_path=settings.audit_key
        )
        self.state_dir = settings.state_dir / "daemon"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.alerts = AlertBook(self.clock, state_file=self.state_dir / "alerts.json")
        self.runtimes: dict[str, PolicyRuntime] = {}
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max(8, 4 * len(policies) + 4))},
            # Overlaps are decided (and counted) by the daemon's own per-job guard, so
            # APScheduler may start a second instance that then skips.
            job_defaults={"coalesce": True, "max_instances": 3, "misfire_grace_time": 300},
        )
        self.scheduler.add_listener(self._on_missed, EVENT_JOB_MISSED)
        # APScheduler's own lines are plain text; what matters is logged here, structured.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        self._stop = threading.Event()
        self._runs_lock = threading.Lock()
        # Held while deciding to start a job and registering it, and while shutdown begins:
        # no job starts unseen by the shutdown.
        self._jobs_lock = threading.Lock()
        self._outbox: queue.Queue[tuple[Alert, Alerts]] = queue.Queue()
        self._ship_guard = threading.Lock()
        self._shipper: JobProcess | None = None
        self._pending: set[Condition] = set()
        self._alert_lock = threading.Lock()
        self._running = False
        self._beat = time.monotonic()
        self._graceful = True
        self._reload = threading.Event()
        self._stopping = False
        self.started_at = self.clock.now()
        self.http = HealthServer(
            settings.http, self.metrics.registry, live=self._live, ready=self._ready
        )
        problems: list[str] = []
        for policy in policies:
            try:
                self._add_policy(policy)
            except Exception as exc:
                problems.append(f"{policy.name}: {exc.__class__.__name__}: {exc}")
        if problems:
            raise PolicyInvalid(
                "cannot set up " + "; ".join(problems),
                hint="`drbot policy validate` checks the files; a destination's URL or "
                "endpoint may be malformed",
            )
        self.metrics.policies.set(len(self.runtimes))

    # -- lifecycle -------------------------------------------------------------------------

    def install_signals(self) -> None:
        """SIGTERM: graceful stop; SIGINT: stop now; SIGHUP: reload (main thread only)."""

        def on_term(signum: int, frame: FrameType | None) -> None:
            self.request_stop(graceful=True)

        def on_int(signum: int, frame: FrameType | None) -> None:
            self.request_stop(graceful=False)

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGHUP, on_hup)

    def request_stop(self, *, graceful: bool) -> None:
        if self._stop.is_set():
            self._graceful = False  # a second signal: stop now
        self._graceful = self._graceful and graceful
        self._stop.set()

    def run(self) -> int:
        self.http.start()
        self.scheduler.add_job(
            self._ship_audit,
            "interval",
            seconds=self.settings.audit_ship_interval,
            # Soon after start too: what happened while no daemon ran gets anchored.
            next_run_time=self.clock.now() + timedelta(seconds=10),
            id=AUDIT_SHIP,
            name="audit ship",
        )
        self.scheduler.start()
        self._record(
            "daemon.started",
            None,
            details={
                "holder": self.holder,
                "policies": sorted(self.runtimes),
                "http": self.http.address,
            },
        )
        log.info(
            "daemon.started",
            policies=sorted(self.runtimes),
            http=self.http.address,
            holder=self.holder,
        )
        self._running = True
        threading.Thread(target=self._send_alerts, name="drbot-alerts", daemon=True).start()
        for rt in list(self.runtimes.values()):
            self._start_loop(rt)
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                self._watchdog()
                self._stop.wait(1.0)
        finally:
            self._shutdown()
        return 0

    def _start_loop(self, rt: PolicyRuntime) -> None:
        rt.thread = threading.Thread(
            target=self._policy_loop, args=(rt,), name=f"drbot-{rt.policy.name}", daemon=True
        )
        rt.thread.start()

    def _watchdog(self) -> None:
        """Stop acting for a policy the moment its lease is no longer valid, even while its own
        thread is stuck in a storage call: jobs may not outlive the lease."""
        for rt in list(self.runtimes.values()):
            if rt.held and not rt.lease.valid():
                for process in list(rt.running.values()):
                    if process.running():
                        log.warning(
                            "job.aborting",
                            policy=rt.policy.name,
                            job=process.kind,
                            reason="lease expired",
                        )
                        process.interrupt()
                if rt.streamer is not None and rt.streamer.process is not None:
                    rt.streamer.process.interrupt()

    def _shutdown(self) -> None:
        with self._jobs_lock:
            self._stopping = True
        graceful = self._graceful
        for rt in self.runtimes.values():
            rt.stop.set()
        log.info("daemon.stopping", graceful=graceful, grace_period_s=self.settings.grace_period)
        deadline = time.monotonic() + (self.settings.grace_period if graceful else 0.0)
        self.scheduler.shutdown(wait=False)
        # Streamers never finish by themselves: they stop at once, shipping what they hold.
        for rt in self.runtimes.values():
            if rt.streamer is not None:
                rt.streamer.begin_stop()
        while (
            self._running_jobs()
            and time.monotonic() < deadline
            and not (graceful and self._graceful is False)
        ):
            time.sleep(0.2)
        self._abort_all(self._all_jobs())
        for rt in self.runtimes.values():
            if rt.streamer is not None:
                rt.streamer.finish_stop()
            if rt.thread is not None:
                rt.thread.join(timeout=5)
        for rt in self.runtimes.values():
            if rt.held:
                rt.lease.release()
                self.metrics.lease_held.labels(rt.policy.name).set(0)
        self._record("daemon.stopped", None, details={"graceful": graceful})
        if graceful and self._graceful:
            # Anchor the trail as it ends, daemon.stopped included; a Ctrl-C skips this.
            self._ship_audit(final=True)
        self.http.stop()
        log.info("daemon.stopped", graceful=graceful)

    def _all_jobs(self) -> list[JobProcess]:
        jobs = [p for rt in self.runtimes.values() for p in rt.running.values()]
        return jobs + ([self._shipper] if self._shipper is not None else [])

    def _running_jobs(self) -> list[JobProcess]:
        return [p for p in self._all_jobs() if p.running()]

    def _abort_all(self, processes: list[JobProcess], timeout: float = 30.0) -> None:
        """Interrupt every running job at once (each cleans up), then kill what is left after
        `timeout` seconds."""
        running = [p for p in processes if p.running()]
        for process in running:
            log.warning("job.aborting", policy=process.policy, job=process.kind, pid=process.pid)
            process.interrupt()
        deadline = time.monotonic() + timeout
        for process in running:
            if process.wait(max(0.0, deadline - time.monotonic())) is None:
                log.error("job.killed", policy=process.policy, job=process.kind, pid=process.pid)
                process.kill()

    # -- policies ----------------------------------------------------------------------------

    def _add_policy(self, policy: Policy) -> None:
        self._register(self._build_runtime(policy))

    def _build_runtime(self, policy: Policy) -> PolicyRuntime:
        """Everything for one policy, nothing started yet (raises if a destination cannot be
        set up, e.g. a malformed endpoint)."""
        storages = self._build_storages(policy)
        rt = PolicyRuntime(
            policy=policy,
            lease=Lease(
                storages[0],
                policy.name,
                ttl_s=self.settings.lease_ttl,
                clock=self.clock,
                holder=self.holder,
            ),
            primary=storages[0],
            storages=storages,
        )
        if policy.schedule.incremental == "continuous":
            streams = {"postgresql": ["wal", "stream"], "mongodb": ["changes", "stream"]}
            if policy.source.kind == "mongodb" or policy.source.mode == "physical":
                argv = streams[policy.source.kind]
                rt.streamer = SupervisedStreamer(
                    policy.name,
                    lambda: self._process(
                        argv[0],
                        policy.name,
                        argv,
                        extra=["--status-file", str(self._status_file(policy.name))],
                    ),
                    self._status_file(policy.name),
                    on_exit=lambda result: self._streamer_exited(policy.name, result),
                )
            else:
                log.warning(
                    "daemon.incremental_unsupported",
                    policy=policy.name,
                    reason=f"continuous incrementals of {policy.source.kind} are not built yet",
                )
        elif policy.schedule.incremental is not None and policy.source.kind != "mongodb":
            log.warning(
                "daemon.incremental_unsupported",
                policy=policy.name,
                reason="scheduled (cron) incrementals of PostgreSQL are not built yet; "
                "use 'continuous'",
            )
        return rt

    def _register(self, rt: PolicyRuntime) -> None:
        policy = rt.policy
        self.runtimes[policy.name] = rt
        m = self.metrics
        m.lease_held.labels(policy.name).set(0)
        m.streamer_up.labels(policy.name).set(0)
        if policy.targets.rpo is not None:
            m.rpo_target.labels(policy.name).set(policy.targets.rpo.total_seconds())
        if policy.targets.rto is not None:
            m.rto_target.labels(policy.name).set(policy.targets.rto.total_seconds())
        self._schedule(rt)
        if self._running:
            self._start_loop(rt)

    def _schedule(self, rt: PolicyRuntime) -> None:
        name = rt.policy.name
        runs = self._read_runs(name)
        for kind, expr in self._jobs(rt.policy).items():
            last = runs.get(kind)
            # `@every` counts from the last run (as the catch-up rule does), not from whenever
            # this daemon happened to start.
            start = datetime.fromisoformat(last) if last else self.clock.now()
            self.scheduler.add_job(
                self._run_scheduled,
                schedule_trigger(expr, start=start),
                args=(name, kind),
                id=f"{name}:{kind}",
                name=f"{kind} of {name}",
                replace_existing=True,
            )

    @staticmethod
    def _jobs(policy: Policy) -> dict[str, str]:
        jobs = {
            "full": policy.schedule.full,
            "drill": policy.schedule.drill,
            "verify": policy.schedule.verify,
        }
        incremental = policy.schedule.incremental
        if policy.source.kind == "mongodb" and incremental not in (None, "continuous"):
            # A cron incremental: catch the change stream up to now, then stop.
            jobs["incremental"] = incremental
        return {kind: expr for kind, expr in jobs.items() if expr is not None}

    def _unschedule(self, rt: PolicyRuntime) -> None:
        for kind in ("full", "drill", "verify", "incremental"):
            for suffix in ("", ":catch-up"):
                with contextlib.suppress(JobLookupError):
                    self.scheduler.remove_job(f"{rt.policy.name}:{kind}{suffix}")

    def _remove_policy(self, name: str) -> None:
        """A policy no longer in the files: stop its jobs and streamer, let go of its lease."""
        rt = self.runtimes.pop(name)
        rt.retiring = True
        rt.stop.set()
        self._unschedule(rt)
        if rt.streamer is not None:
            rt.streamer.begin_stop()
        self._abort_all(list(rt.running.values()))
        if rt.streamer is not None:
            rt.streamer.finish_stop()
        if rt.thread is not None:
            rt.thread.join(timeout=5)
        if rt.held:
            rt.lease.release()
        self.metrics.forget(name)

    def _update_policy(self, rt: PolicyRuntime, fresh: PolicyRuntime) -> None:
        """A changed file for a running policy: new settings for the next runs, while running
        jobs finish undisturbed (they read the file as it was when they started)."""
        rt.policy = fresh.policy
        rt.storages = fresh.storages
        self._unschedule(rt)
        self._schedule(rt)
        if rt.streamer is not None:
            if fresh.streamer is None:
                rt.streamer.stop()
                rt.streamer = None
            else:
                rt.streamer.restart()  # picks up the new text; a clean stop, not a failure
        elif fresh.streamer is not None:
            rt.streamer = fresh.streamer
        m = self.metrics
        for gauge, target in ((m.rpo_target, rt.policy.targets.rpo),
                              (m.rto_target, rt.policy.targets.rto)):  # fmt: skip
            if target is not None:
                gauge.labels(rt.policy.name).set(target.total_seconds())

    def reload(self) -> None:
        """Re-read the policies; keep the running ones if anything about the new set is wrong.

        Everything new is built before anything old is touched, so a refused reload changes
        nothing. A changed policy keeps its lease and its running jobs; one whose primary
        destination moved starts afresh (its lease lives there).
        """
        try:
            policies = self._load()
            fresh = {p.name: self._build_runtime(p) for p in policies}
        except Exception as exc:
            message = (
                exc.message if isinstance(exc, DrbotError) else f"{exc.__class__.__name__}: {exc}"
            )
            log.error("daemon.reload_refused", problems=message.splitlines())
            self._record(
                "daemon.reload_refused", None, outcome="failed", details={"error": message}
            )
            return
        for name in list(self.runtimes):
            rt = self.runtimes[name]
            if name not in fresh or fresh[name].primary.url != rt.primary.url:
                self._remove_policy(name)
            elif fresh[name].policy.source_sha256 != rt.policy.source_sha256:
                self._update_policy(rt, fresh[name])
        for name, new in fresh.items():
            if name not in self.runtimes:
                self._register(new)
        self.metrics.policies.set(len(self.runtimes))
        log.info("daemon.reloaded", policies=sorted(self.runtimes))

    # -- the loop: leases, streamers, checks -------------------------------------------------

    def _policy_loop(self, rt: PolicyRuntime) -> None:
        """One thread per policy: its lease, its streamer, its checks. A storage call that
        hangs here holds up this policy only (and the watchdog stops its jobs if the lease
        runs out meanwhile)."""
        while not rt.stop.is_set():
            rt.beat = time.monotonic()
            try:
                self._policy_tick(rt)
            except Exception:  # a bug must not end supervision of the policy
                log.exception("daemon.loop_error", policy=rt.policy.name)
            rt.stop.wait(1.0)

    def _policy_tick(self, rt: PolicyRuntime) -> None:
        now = time.monotonic()
        if now >= rt.next_lease_tick:
            rt.next_lease_tick = now + self.settings.lease_ttl / 4
            self._tick_lease(rt)
        if rt.streamer is not None:
            self._supervise(rt)
        if now >= rt.next_check and rt.held and not rt.checking:
            rt.next_check = now + self.settings.check_interval
            rt.checking = True
            threading.Thread(
                target=self._check,
                args=(rt,),
                name=f"drbot-check-{rt.policy.name}",
                daemon=True,
            ).start()

    def _tick_lease(self, rt: PolicyRuntime) -> None:
        state = rt.lease.tick()
        held = state.held and rt.lease.valid()
        self._lease_reachable(rt)
        if held == rt.held:
            return
        rt.held = held
        name = rt.policy.name
        self.metrics.lease_held.labels(name).set(1 if held else 0)
        if held:
            self._record("lease.acquired", name, details={"holder": self.holder})
            self._catch_up(rt)
        else:
            self._record("lease.lost", name, outcome="failed", details={"holder": state.holder})
            # Another daemon may act for this policy now: stop everything of ours at once.
            if rt.streamer is not None:
                rt.streamer.begin_stop()
            self._abort_all(list(rt.running.values()))
            if rt.streamer is not None:
                rt.streamer.finish_stop()

    def _lease_reachable(self, rt: PolicyRuntime) -> None:
        """Alert when the lease has been unreadable for two TTLs: then no daemon acts for the
        policy at all, and nothing else would say so."""
        if rt.lease.last_error is None:
            rt.lease_error_since = None
        elif rt.lease_error_since is None:
            rt.lease_error_since = time.monotonic()
        down = 0.0 if rt.lease_error_since is None else time.monotonic() - rt.lease_error_since
        failing = down >= 2 * self.settings.lease_ttl
        if failing or rt.lease_error_since is None:
            self._alert(
                rt,
                "lease_unreachable",
                failing=failing,
                summary=f"{rt.policy.name}: the lease in destination {rt.primary.name} cannot "
                f"be read ({rt.lease.last_error}); no daemon backs up this policy"
                if failing
                else f"{rt.policy.name}: the lease is reachable again",
                details={"destination": rt.primary.name, "error": rt.lease.last_error},
            )

    def _supervise(self, rt: PolicyRuntime) -> None:
        assert rt.streamer is not None
        streamer = rt.streamer
        before = streamer.restarts
        streamer.poll(enabled=rt.held and rt.lease.valid() and not self._stopping)
        name = rt.policy.name
        if streamer.restarts > before:
            self.metrics.streamer_restarts.labels(name).inc()
        connected = streamer.connected()
        self.metrics.streamer_up.labels(name).set(1 if connected else 0)
        status = streamer.status()
        if status is not None:
            if status.get("archived_at"):
                rt.archived_at = datetime.fromisoformat(status["archived_at"])
            self.metrics.streamer_lag_bytes.labels(name).set(int(status.get("lag_bytes", 0)))
        if rt.archived_at is not None and rt.held:
            # Kept growing while the streamer is down: a frozen lag would hide the outage.
            lag = (self.clock.now() - rt.archived_at).total_seconds()
            self.metrics.streamer_lag.labels(name).set(max(0.0, lag))
        if rt.held:
            down = streamer.down_for()
            self._alert(
                rt,
                "streamer_down",
                failing=down >= self.options.streamer_down_alert_s,
                summary=f"{name}: WAL streamer not connected for {down:.0f}s"
                if down
                else f"{name}: WAL streamer connected again",
                details={"down_s": round(down, 1), "restarts": streamer.restarts},
            )

    def _streamer_exited(self, name: str, result: JobResult) -> None:
        if not self._stopping and result.exit_code not in (0, 130, -2, -15):
            self.metrics.failures.labels(name, "wal", result.outcome).inc()

    def _check(self, rt: PolicyRuntime) -> None:
        try:
            self._measure(rt)
        except Exception:
            log.exception("daemon.check_failed", policy=rt.policy.name)
        finally:
            rt.checking = False

    def _measure(self, rt: PolicyRuntime) -> None:
        """The RPO (newest restorable point) and whether each destination answers."""
        name = rt.policy.name
        for storage in rt.storages:
            ok = True
            try:
                next(iter(storage.list(f"{name}/backups/")), None)
            except DrbotError as exc:
                ok = False
                log.warning(
                    "destination.unreachable",
                    policy=name,
                    destination=storage.name,
                    error=exc.message,
                )
            rt.destinations_ok[storage.name] = ok
            self.metrics.destination_up.labels(name, storage.name).set(1 if ok else 0)
        result = self._process("list", name, ["list"], json_out=True).start().wait()
        if result is None or not result.ok or not isinstance(result.output, list):
            return
        newest = newest_restore_point(result.output)
        now = self.clock.now()
        rt.rpo_s = (now - newest).total_seconds() if newest else None
        target = rt.policy.targets.rpo
        if rt.rpo_s is not None:
            self.metrics.rpo.labels(name).set(max(0.0, rt.rpo_s))
        # While a full backup runs, the RPO is about to change: judge it afterwards (a new
        # daemon would otherwise alert at once, while its first backup is under way) -- but
        # not for longer than the target itself, or a hung backup would silence the alert.
        full = rt.running.get("full")
        judging = full is None or full.age_s() > (target.total_seconds() if target else 0)
        if target is not None and judging:
            over = rt.rpo_s is None or rt.rpo_s > target.total_seconds()
            state = (
                "there is no restorable backup"
                if rt.rpo_s is None
                else f"the newest restorable point is {rt.rpo_s:.0f}s old"
            )
            self._alert(
                rt,
                "rpo",
                failing=over,
                summary=f"{name}: {state}, over the RPO target of {target.total_seconds():.0f}s"
                if over
                else f"{name}: RPO back within target ({state})",
                details={"rpo_s": rt.rpo_s, "target_s": target.total_seconds()},
            )

    # -- jobs ------------------------------------------------------------------------------

    def _status_file(self, policy: str) -> Path:
        return self.state_dir / f"{policy}.wal-status.json"

    def _process(
        self,
        kind: str,
        policy: str,
        command: list[str],
        *,
        extra: list[str] | None = None,
        json_out: bool = False,
    ) -> JobProcess:
        args = [*command, "--policy", policy, *(extra or []), *(["--json"] if json_out else [])]
        return JobProcess(kind, policy, drbot_command(args), self.clock, env=self._env)

    def _on_missed(self, event: JobExecutionEvent) -> None:
        name, _, kind = str(event.job_id).partition(":")
        self.metrics.skipped.labels(name, kind.split(":")[0], "missed").inc()
        log.warning("job.missed", policy=name, job=kind, scheduled_at=event.scheduled_run_time)

    def _run_scheduled(self, name: str, kind: str) -> None:
        try:
            self._run_scheduled_job(name, kind)
        except Exception as exc:  # a bug here must not silence the schedule: log and alert
            log.exception("job.crashed", policy=name, job=kind)
            rt = self.runtimes.get(name)
            if rt is not None:
                self._alert(
                    rt,
                    f"job_failed:{kind}",
                    failing=True,
                    summary=f"{name}: {kind} could not be run: {exc.__class__.__name__}: {exc}",
                    details={"job": kind},
                )

    def _run_scheduled_job(self, name: str, kind: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None or self._stopping:
            return
        if not (rt.held and rt.lease.valid()):
            self.metrics.skipped.labels(name, kind, "lease_not_held").inc()
            log.info("job.skipped", policy=name, job=kind, reason="lease not held")
            return
        guard = rt.guard(kind)
        if not guard.acquire(blocking=False):
            self.metrics.skipped.labels(name, kind, "still_running").inc()
            log.warning("job.skipped", policy=name, job=kind, reason="previous run still running")
            return
        try:
            result: JobResult | None
            if kind == "full":
                with rt.writer:
                    result = self._run(rt, "full", ["backup"])
                    if result is not None and result.ok:
                        rt.next_check = 0.0  # the RPO just changed: measure it now
                        self._run(rt, "prune", ["prune"], extra=["--yes"])
            elif kind == "drill":
                result = self._run(rt, "drill", ["drill"])
            elif kind == "incremental":
                result = self._run(rt, "incremental", ["changes", "stream"], extra=["--once"])
                if result is not None and result.ok:
                    rt.next_check = 0.0  # the RPO just changed: measure it now
            else:
                sample = str(rt.policy.schedule.verify_sample)
                result = self._run(rt, "verify", ["verify"], extra=["--sample", sample])
            if result is not None and not self._ours(rt, result):
                # A run we interrupted (shutdown, lease lost, reload) does not count as done:
                # the catch-up after a restart or takeover runs it again.
                self._note_run(name, kind)
        finally:
            guard.release()

    def _ours(self, rt: PolicyRuntime, result: JobResult) -> bool:
        """Whether the run ended because the daemon stopped it (not a failure of the job)."""
        return result.exit_code in INTERRUPTED_EXITS and (
            self._stopping or rt.retiring or not rt.held or not rt.lease.valid()
        )

    def _run(
        self, rt: PolicyRuntime, kind: str, command: list[str], *, extra: list[str] | None = None
    ) -> JobResult | None:
        """Run one job to its end; None if it was not started (stopping, lease gone)."""
        name = rt.policy.name
        process = self._process(kind, name, command, extra=extra, json_out=True)
        with self._jobs_lock:
            # Decided and registered under the lock the shutdown takes: never a job it misses.
            if self._stopping or rt.retiring or not (rt.held and rt.lease.valid()):
                return None
            rt.running[kind] = process
            process.start()
        self.metrics.running.labels(name, kind).set(1)
        try:
            result = process.wait()
            assert result is not None
        finally:
            rt.running.pop(kind, None)
            self.metrics.running.labels(name, kind).set(0)
        self._account(rt, result)
        return result

    def _account(self, rt: PolicyRuntime, result: JobResult) -> None:
        """Metrics, the job's summary line, and alerts for one finished run."""
        name, kind, m = rt.policy.name, result.kind, self.metrics
        m.runs.labels(name, kind, result.outcome).inc()
        m.last_duration.labels(name, kind).set(result.duration_s)
        out = result.output if isinstance(result.output, dict) else {}
        summary: dict[str, Any] = {
            "policy": name,
            "job": kind,
            "outcome": result.outcome,
            "exit_code": result.exit_code,
            "duration_s": round(result.duration_s, 2),
        }
        if result.ok or (kind == "full" and result.exit_code == 3):
            m.last_success.labels(name, kind).set(self.clock.now().timestamp())
        if kind == "full" and out:
            stored = out.get("stored_bytes") or {}
            summary.update(
                backup_id=out.get("id"),
                source_bytes=out.get("size_bytes"),
                stored_bytes=max(stored.values(), default=0),
            )
            m.backup_source_bytes.labels(name).set(out.get("size_bytes") or 0)
            m.backup_bytes.labels(name).set(max(stored.values(), default=0))
        if kind == "drill" and out:
            passed = bool(out.get("passed"))
            summary.update(passed=passed, rto_s=out.get("rto_s"), rpo_s=out.get("rpo_s"))
            m.drill_passed.labels(name).set(1 if passed else 0)
            m.drill_time.labels(name).set(self.clock.now().timestamp())
            if out.get("rto_s") is not None:
                m.drill_rto.labels(name).set(out["rto_s"])
            if out.get("rpo_s") is not None:
                m.drill_rpo.labels(name).set(out["rpo_s"])
        if kind == "prune" and out:
            summary.update(
                deleted=len(out.get("deleted") or [])
                if isinstance(out.get("deleted"), list)
                else out.get("deleted")
            )
        if kind == "verify" and out:
            summary.update(
                checked_objects=out.get("checked_objects"),
                problems=len(out.get("problems") or []),
            )
        if self._ours(rt, result):
            # Stopped by us (shutdown, lease lost, reload): neither a failure nor a recovery.
            log.warning("job.interrupted", **summary)
            return
        if result.ok:
            log.info("job.completed", **summary)
        else:
            m.failures.labels(name, kind, result.outcome).inc()
            log.error("job.failed", error=result.error, **summary)
        condition = "drill_failed" if kind == "drill" else f"job_failed:{kind}"
        what = {"full": "full backup", "prune": "retention (prune)"}.get(kind, kind)
        self._alert(
            rt,
            condition,
            failing=not result.ok,
            summary=f"{name}: {what} failed (exit {result.exit_code}, "
            f"{exit_name(result.exit_code)}): {result.error or 'see the daemon log'}"
            if not result.ok
            else f"{name}: {what} succeeded again",
            details=summary,
        )

    # -- the audit trail ---------------------------------------------------------------------

    def _ship_audit(self, *, final: bool = False) -> None:
        """Run `drbot audit ship` (one at a time); failures are counted, logged and alerted
        daemon-wide (the global webhook / e-mail), recovery too."""
        # The last shipment waits a little for a regular one the shutdown just interrupted.
        acquired = (
            self._ship_guard.acquire(timeout=10.0) if final else self._ship_guard.acquire(False)
        )
        if not acquired:
            self.metrics.skipped.labels("", AUDIT_SHIP, "still_running").inc()
            return
        try:
            process = JobProcess(
                AUDIT_SHIP,
                "",
                drbot_command(["audit", "ship", "--json"]),
                self.clock,
                env=self._env,
            )
            with self._jobs_lock:
                if self._stopping and not final:
                    return
                self._shipper = process
                process.start()
            self.metrics.running.labels("", AUDIT_SHIP).set(1)
            try:
                result = process.wait(FINAL_SHIP_TIMEOUT_S if final else None)
                if result is None:  # only when final: stopping must not hang on a bucket
                    process.interrupt()
                    result = process.wait(5.0)
                    if result is None:
                        process.kill()
                        result = process.wait()
                    assert result is not None
            finally:
                self._shipper = None
                self.metrics.running.labels("", AUDIT_SHIP).set(0)
            self._account_ship(result)
        finally:
            self._ship_guard.release()

    def _account_ship(self, result: JobResult) -> None:
        m = self.metrics
        m.runs.labels("", AUDIT_SHIP, result.outcome).inc()
        m.last_duration.labels("", AUDIT_SHIP).set(result.duration_s)
        out = result.output if isinstance(result.output, dict) else {}
        summary: dict[str, Any] = {
            "job": AUDIT_SHIP,
            "outcome": result.outcome,
            "exit_code": result.exit_code,
            "duration_s": round(result.duration_s, 2),
            "shipped_bytes": out.get("shipped_bytes"),
        }
        if self._stopping and result.exit_code in INTERRUPTED_EXITS:
            log.warning("job.interrupted", **summary)  # by the shutdown: not a failure
            return
        if result.ok:
            m.last_success.labels("", AUDIT_SHIP).set(self.clock.now().timestamp())
            log.info("job.completed", **summary)
        else:
            m.failures.labels("", AUDIT_SHIP, result.outcome).inc()
            log.error("job.failed", error=result.error, **summary)
        self._alert(
            None,
            "audit_ship_failed",
            failing=not result.ok,
            summary=f"the audit trail could not be shipped (exit {result.exit_code}, "
            f"{exit_name(result.exit_code)}): {result.error or 'see the daemon log'}"
            if not result.ok
            else "the audit trail is shipped again",
            details=summary,
        )

    # -- missed runs -------------------------------------------------------------------------

    def _runs_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.runs.json"

    def _read_runs(self, name: str) -> dict[str, str]:
        try:
            data = json.loads(self._runs_file(name).read_text())
            return {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _note_run(self, name: str, kind: str) -> None:
        # Jobs of one policy start from several threads at once: one writer at a time.
        with self._runs_lock:
            runs = self._read_runs(name)
            runs[kind] = self.clock.now().isoformat()
            path = self._runs_file(name)
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(runs, indent=1, sort_keys=True))
                tmp.replace(path)
            except OSError as exc:
                # Only catch-up after a restart depends on it: run the job regardless.
                log.warning("daemon.state_unwritable", path=str(path), error=str(exc))

    def _catch_up(self, rt: PolicyRuntime) -> None:
        """Run once, now, what was missed while this daemon did not act for the policy."""
        runs = self._read_runs(rt.policy.name)
        now = self.clock.now()
        for kind, expr in self._jobs(rt.policy).items():
            last = runs.get(kind)
            if missed_run(expr, datetime.fromisoformat(last) if last else None, now, kind=kind):
                log.info("job.catch_up", policy=rt.policy.name, job=kind, last_run=last)
                self.scheduler.add_job(
                    self._run_scheduled,
                    args=(rt.policy.name, kind),
                    id=f"{rt.policy.name}:{kind}:catch-up",
                    replace_existing=True,
                )

    # -- alerts, audit, probes ---------------------------------------------------------------

    def _alert(
        self,
        rt: PolicyRuntime | None,
        kind: str,
        *,
        failing: bool,
        summary: str,
        details: dict[str, Any],
    ) -> None:
        """Observe a condition of `rt`'s policy (None: daemon-wide, sent to the global
        webhook/e-mail only) and queue the alert it calls for, if any."""
        routes = rt.policy.alerts if rt is not None else Alerts()
        condition = Condition(rt.policy.name if rt is not None else "", kind)
        with self._alert_lock:
            if condition in self._pending:
                return  # one delivery of this condition is already on its way
            alert = self.alerts.observe(
                condition,
                failing,
                summary=summary,
                details=details,
                interval=routes.interval,
            )
            if alert is None:
                return
            self._pending.add(condition)
        # Delivered from one thread of its own: a webhook that hangs delays alerts, not jobs.
        self._outbox.put((alert, routes))

    def _send_alerts(self) -> None:
        while True:
            alert, routes = self._outbox.get()
            try:
                if Notifier(routes, self.settings).send(alert):
                    self.alerts.sent(alert)
                    labels = (alert.condition.policy, alert.condition.kind, alert.state)
                    self.metrics.alerts.labels(*labels).inc()
            except Exception:
                log.exception("alert.send_crashed", policy=alert.condition.policy)
            finally:
                with self._alert_lock:
                    self._pending.discard(alert.condition)

    def _record(
        self,
        action: str,
        policy: str | None,
        *,
        outcome: str = "ok",
        details: dict[str, Any] | None = None,
    ) -> None:
        try:
            self.trail.record(
                action,
                policy=policy,
                subject={"host": socket.gethostname(), "pid": os.getpid()},
                outcome=outcome,
                details=details or {},
            )
        except DrbotError as exc:
            log.error("audit.record_failed", action=action, error=exc.message)

    def _live(self) -> tuple[bool, dict[str, Any]]:
        # The main loop beats every second; a minute without means it is stuck.
        beat_age = time.monotonic() - self._beat
        alive = (self.scheduler.running and beat_age < 60) or self._stopping
        return alive, {
            "uptime_s": round((self.clock.now() - self.started_at).total_seconds()),
            "loop_beat_age_s": round(beat_age, 1),
        }

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        problems: list[str] = []
        policies: dict[str, Any] = {}
        for name, rt in sorted(self.runtimes.items()):
            down = [d for d, ok in rt.destinations_ok.items() if not ok]
            problems += [f"{name}: destination {d} unreachable" for d in down]
            streaming = None
            if rt.streamer is not None and rt.held:
                streaming = rt.streamer.connected()
                if not streaming:
                    problems.append(f"{name}: WAL streamer not connected")
            if rt.lease.last_error is not None:
                problems.append(f"{name}: lease unreachable: {rt.lease.last_error}")
            policies[name] = {
                "lease": "held" if rt.held else "waiting",
                "lease_error": rt.lease.last_error,
                "destinations": rt.destinations_ok,
                "streamer_connected": streaming,
                "rpo_s": None if rt.rpo_s is None else round(rt.rpo_s, 1),
                "running": sorted(rt.running),
            }
        if not self.runtimes:
            problems.append("no policies loaded")
        if self._stopping:
            problems.append("stopping")
        return not problems, {"problems": problems, "policies": policies}


def newest_restore_point(rows: list[Any]) -> datetime | None:
    """The newest moment any listed backup can be restored to (`drbot list --json` rows):
    the end of its WAL window for physical backups, its start for logical dumps (a dump is
    consistent as of the moment it began)."""
    newest: datetime | None = None
    for row in rows:
        if not isinstance(row, dict):
            continue
        window = row.get("restorable") or {}
        text = window.get("to_time") or (
            row.get("completed_at") if row.get("mode") == "physical" else row.get("started_at")
        )
        if not text:
            continue
        point = datetime.fromisoformat(str(text))
        newest = point if newest is None or point > newest else newest
    return newest


def missed_run(expr: str, last: datetime | None, now: datetime, *, kind: str) -> bool:
    """Whether a job on schedule `expr`, last run at `last`, should run once now (pure).

    Never run: only a full backup is taken at once (a new sidecar should not leave a database
    unprotected until the first cron time); drills and verifies wait for their schedule.
    Otherwise a run is due if the schedule fired since `last`, unless the next regular run
    comes within CATCH_UP_MARGIN of a period anyway (it will do the same work).
    """
    if last is None:
        return kind == "full"
    trigger = schedule_trigger(expr, start=last)

    def next_after(moment: datetime) -> datetime | None:
        # previous_fire_time=None: the first fire at or after `moment`, for cron and interval.
        fire: datetime | None = trigger.get_next_fire_time(None, moment)
        return fire

    due = next_after(last + timedelta(microseconds=1))
    if due is None or due > now:
        return False
    upcoming = next_after(now)
    after = next_after(due + timedelta(microseconds=1))
    if upcoming is None or after is None:
        return True
    period = (after - due).total_seconds()
    return (upcoming - now).total_seconds() > CATCH_UP_MARGIN * period
