"""The daemon's Prometheus metrics (prometheus-client), in a registry of its own.

Names follow Prometheus conventions: base units (seconds, bytes), `_total` for counters,
`_timestamp_seconds` for points in time. Labels are bounded: policy names, job kinds
(full, verify, prune, drill, wal), and exit-code names for failures.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from drbot import __version__


class DaemonMetrics:
    """Every metric the daemon exports; one instance per daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Info("drbot", "drbot's version", registry=r).info({"version": __version__})
        self.policies = Gauge("drbot_policies", "policies loaded", registry=r)
        self.lease_held = Gauge(
            "drbot_lease_held",
            "1 if this daemon holds the policy's lease (and acts for it), else 0",
            ["policy"],
            registry=r,
        )
        self.last_success = Gauge(
            "drbot_job_last_success_timestamp_seconds",
            "when a job of this kind last ended successfully (Unix time)",
            ["policy", "job"],
            registry=r,
        )
        self.last_duration = Gauge(
            "drbot_job_last_duration_seconds",
            "how long the last run of this job took",
            ["policy", "job"],
            registry=r,
        )
        self.runs = Counter(
            "drbot_job_runs", "job runs by outcome", ["policy", "job", "outcome"], registry=r
        )
        self.failures = Counter(
            "drbot_job_failures",
            "failed job runs by kind of failure (the exit code's name)",
            ["policy", "job", "reason"],
            registry=r,
        )
        self.running = Gauge(
            "drbot_job_running", "1 while a job of this kind runs", ["policy", "job"], registry=r
        )
        self.skipped = Counter(
            "drbot_job_skipped",
            "scheduled runs not started (still running, or lease not held)",
            ["policy", "job", "reason"],
            registry=r,
        )
        self.backup_bytes = Gauge(
            "drbot_backup_last_stored_bytes",
            "bytes stored per destination by the last full backup",
            ["policy"],
            registry=r,
        )
        self.backup_source_bytes = Gauge(
            "drbot_backup_last_source_bytes",
            "bytes read from the source by the last full backup",
            ["policy"],
            registry=r,
        )
        self.rpo = Gauge(
            "drbot_rpo_seconds",
            "age of the newest restorable point (what a restore now would lose at most)",
            ["policy"],
            registry=r,
        )
        self.rpo_target = Gauge(
            "drbot_rpo_target_seconds", "the policy's RPO target", ["policy"], registry=r
        )
        self.rto_target = Gauge(
            "drbot_rto_target_seconds", "the policy's RTO target", ["policy"], registry=r
        )
        self.streamer_up = Gauge(
            "drbot_streamer_up",
            "1 while the WAL streamer runs and is connected to the source",
            ["policy"],
            registry=r,
        )
        self.streamer_restarts = Counter(
            "drbot_streamer_restarts",
            "times the WAL streamer was restarted",
            ["policy"],
            registry=r,
        )
        self.streamer_lag = Gauge(
            "drbot_streamer_lag_seconds",
            "time since the streamer last stored WAL or confirmed the archive current",
            ["policy"],
            registry=r,
        )
        self.streamer_lag_bytes = Gauge(
            "drbot_streamer_lag_bytes",
            "WAL the server has flushed that is not yet stored in every destination",
            ["policy"],
            registry=r,
        )
        self.drill_passed = Gauge(
            "drbot_drill_last_passed", "1 if the last drill passed, else 0", ["policy"], registry=r
        )
        self.drill_rto = Gauge(
            "drbot_drill_last_rto_seconds", "RTO measured by the last drill", ["policy"], registry=r
        )
        self.drill_rpo = Gauge(
            "drbot_drill_last_rpo_seconds", "RPO measured by the last drill", ["policy"], registry=r
        )
        self.drill_time = Gauge(
            "drbot_drill_last_timestamp_seconds",
            "when the last drill ended (Unix time)",
            ["policy"],
            registry=r,
        )
        self.destination_up = Gauge(
            "drbot_destination_up",
            "1 if the destination answered the last reachability check",
            ["policy", "destination"],
            registry=r,
        )
        self.alerts = Counter(
            "drbot_alerts", "alerts sent", ["policy", "kind", "state"], registry=r
        )

    def forget(self, policy: str) -> None:
        """Drop every series of a policy that is no longer loaded (after SIGHUP)."""
        for metric in (
            self.lease_held,
            self.backup_bytes,
            self.backup_source_bytes,
            self.rpo,
            self.rpo_target,
            self.rto_target,
            self.streamer_up,
            self.streamer_lag,
            self.streamer_lag_bytes,
            self.drill_passed,
            self.drill_rto,
            self.drill_rpo,
            self.drill_time,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(policy)
