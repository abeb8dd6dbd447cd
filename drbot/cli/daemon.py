"""drbot daemon: run every policy's schedules, streamers, drills and checks until stopped."""

from __future__ import annotations

import os
from pathlib import Path

import click

from drbot import log as drbot_log
from drbot.cli import build
from drbot.cli.common import load_policies, load_settings, policies_option


@click.command("daemon")
@policies_option
@click.option(
    "--http",
    "http_address",
    default=None,
    help="host:port for /healthz, /readyz and /metrics [default: $DRBOT_HTTP or 127.0.0.1:9187].",
)
def command(policies_dir: Path | None, http_address: str | None) -> None:
    """Run the policies: scheduled backups, WAL streaming, retention, drills, checks.

    Every policy file must be valid, or the daemon does not start (exit 16, every problem
    named). For each policy it holds a lease in the policy's first destination, so that of
    several daemons given the same policy only one acts; the others wait and take over within
    DRBOT_LEASE_TTL seconds if it stops.

    \b
    Per policy:
      schedule.full          backup, then prune by the retention rules when it succeeded
      schedule.incremental   continuous: `drbot wal stream`, restarted with backoff if it exits
      schedule.drill         `drbot drill` (a restore into a sandbox, checked, RTO/RPO measured)
      schedule.verify        `drbot verify --sample N` (daily at 04:00 UTC by default)
    A full backup that never ran runs at start; a run missed while the daemon was down runs
    once when it comes back (never a burst).

    \b
    Watching it:
      curl -s http://127.0.0.1:9187/readyz     why it is (not) ready, per policy, as JSON
      curl -s http://127.0.0.1:9187/metrics    Prometheus metrics (drbot_rpo_seconds, ...)
    Alerts go to policy `alerts:` and DRBOT_ALERT_WEBHOOK / DRBOT_ALERT_EMAIL.

    \b
    Signals:
      SIGTERM   stop: running jobs get DRBOT_GRACE_PERIOD seconds (60) to finish, then are
                interrupted cleanly; nothing half-written is ever left looking complete
      SIGINT    (Ctrl-C) the same, without waiting
      SIGHUP    reload the policies; if any is invalid, keep running the old ones
    Logs are JSON lines on stderr when it is not a terminal (DRBOT_LOG_FORMAT).
    """
    from drbot.daemon.service import Daemon

    settings = load_settings(policies_dir)
    if "DRBOT_LOG_LEVEL" not in os.environ:
        # A daemon's log is its job summaries: info unless told otherwise.
        settings = settings.model_copy(update={"log_level": "info"})
        drbot_log.configure(settings.log_level, settings.log_format)
    if http_address is not None:
        settings = settings.model_copy(update={"http": http_address})
    policies = load_policies(settings)
    env = dict(os.environ)
    if policies_dir is not None:
        env["DRBOT_POLICIES"] = str(policies_dir)

    daemon = Daemon(
        settings,
        policies,
        build_storages=build.build_storages,
        load=lambda: load_policies(settings),
        env=env,
    )
    daemon.install_signals()
    click.echo(
        f"drbot daemon: {len(policies)} policies ({', '.join(p.name for p in policies)}); "
        f"metrics on http://{daemon.http.address}/metrics; SIGTERM or Ctrl-C stops it.",
        err=True,
    )
    raise SystemExit(daemon.run())
