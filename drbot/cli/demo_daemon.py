"""`drbot demo`: the daemon on a throwaway PostgreSQL with a steady write load, until Ctrl-C."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import click
import psycopg

from drbot import log as drbot_log
from drbot.audit.trail import FileAuditTrail
from drbot.cli import build
from drbot.clock import SystemClock
from drbot.engines.postgres.localserver import LocalPostgres, free_port
from drbot.pipeline.filekey import generate_key_file
from drbot.policy.load import load_policies
from drbot.settings import Settings

_POLICY = """\
# Written by `drbot demo`: the demo's policy, valid like any other. One-minute schedules so
# that everything happens within a few minutes; a real policy runs fulls daily or weekly.
version: 1
name: demo
source:
  kind: postgresql
  mode: physical                # base backups + continuous WAL: any moment can be restored
  uri: ${{DRBOT_DEMO_DB_URI}}   # the demo's throwaway server; set by `drbot demo`
  partial_interval: 5s          # ship the unfinished WAL segment every 5 s
schedule:
  full: "@every 1m"             # plus one at once: no full backup has run yet
  incremental: continuous       # WAL streaming, supervised by the daemon
  drill: "@every 1m"            # restore into a sandbox and check, each destination in turn
  verify: "@every 2m"           # read back a sample of stored backups
retention:
  keep_last: 2                  # from the third backup on, each backup prunes the oldest
encryption:
  key: file:{key}
destinations:                   # two directories standing for two regions
  - name: primary
    url: file://{root}/destinations/primary
  - name: replica
    url: file://{root}/destinations/replica
targets:
  rpo: 1m
  rto: 5m
drill:
  sandbox: process              # a private local server; `docker` needs no change but Docker
  checks:
    - name: writes-arrived
      database: shop
      sql: "select count(*) > 0 from demo_writes"
"""

_MILESTONES: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("full backup", "drbot_job_runs_total", {"job": "full", "outcome": "ok"}),
    ("WAL streaming", "drbot_streamer_up", {}),
    ("retention pass", "drbot_job_runs_total", {"job": "prune", "outcome": "ok"}),
    ("passing drill", "drbot_drill_last_passed", {}),
)


def _http_address() -> str:
    wanted = os.environ.get("DRBOT_HTTP", "127.0.0.1:9187")
    host, _, port = wanted.rpartition(":")
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
        except OSError:
            return f"127.0.0.1:{free_port()}"  # another daemon has 9187: the demo moves aside
    return wanted


def _writer(uri: str, stop: threading.Event) -> None:
    """The steady write load: a row every half second, so WAL keeps coming."""
    while not stop.is_set():
        try:
            with psycopg.connect(uri, autocommit=True) as conn:
                while not stop.wait(0.5):
                    conn.execute("insert into demo_writes (note) values ('demo write')")
        except psycopg.Error:
            stop.wait(1.0)


def _watch(value: Callable[[str, dict[str, str]], float | None], stop: threading.Event) -> None:
    """Print each milestone the first time the daemon's metrics show it."""
    started = time.monotonic()
    pending = list(_MILESTONES)
    while pending and not stop.wait(2.0):
        for milestone in list(pending):
            label, metric, labels = milestone
            if (value(metric, {"policy": "demo", **labels}) or 0) >= 1:
                pending.remove(milestone)
                click.secho(f"  ✓ {label} after {time.monotonic() - started:.0f}s", bold=True)
    if not pending:
        click.secho(
            "All four seen. The daemon keeps going (backups every minute, drills rotating over "
            "both destinations); Ctrl-C stops it.",
            bold=True,
        )


def run_daemon_demo(root: Path, stop_after: float | None) -> None:
    from drbot.daemon.service import Daemon

    if root.exists():
        shutil.rmtree(root)
    for sub in ("policies", "destinations/primary", "destinations/replica", "state", "audit"):
        (root / sub).mkdir(parents=True)
    server = LocalPostgres()
    server.start()
    stop_writes = threading.Event()
    try:
        server.create_database("shop")
        server.execute("shop", resources.files("drbot.demo").joinpath("sample.sql").read_text())
        server.execute(
            "shop",
            "create table demo_writes (id bigserial primary key, "
            "at timestamptz not null default now(), note text)",
        )
        writer = threading.Thread(
            target=_writer, args=(server.uri("shop"), stop_writes), daemon=True
        )
        writer.start()
        key_path = root / "demo.key"
        key_id = generate_key_file(key_path)
        (root / "policies" / "demo.yaml").write_text(_POLICY.format(key=key_path, root=root))
        env = {
            "DRBOT_DEMO_DB_URI": server.uri("postgres"),
            "DRBOT_POLICIES": str(root / "policies"),
            "DRBOT_STATE_DIR": str(root / "state"),
            "DRBOT_AUDIT_DIR": str(root / "audit"),
            "DRBOT_HTTP": _http_address(),
            "DRBOT_GRACE_PERIOD": "20",
            "DRBOT_LEASE_TTL": "15",
            "DRBOT_CHECK_INTERVAL": "10",
        }
        os.environ.update(env)
        settings = Settings()
        settings = settings.model_copy(
            update={"log_level": os.environ.get("DRBOT_LOG_LEVEL", "info")}
        )
        drbot_log.configure(settings.log_level, settings.log_format)
        FileAuditTrail(settings.audit_directory, SystemClock()).record(
            "key.generated", subject={"key_id": key_id}, details={"path": str(key_path)}
        )
        policies = load_policies(settings.policies, os.environ)
        daemon = Daemon(
            settings,
            policies,
            build_storages=build.build_storages,
            load=lambda: load_policies(settings.policies, os.environ),
            env=os.environ,
        )
        _banner(root, env, server, daemon.http.address)
        daemon.install_signals()
        if stop_after is not None:
            timer = threading.Timer(stop_after, lambda: daemon.request_stop(graceful=True))
            timer.daemon = True
            timer.start()
        threading.Thread(
            target=_watch,
            args=(daemon.metrics.registry.get_sample_value, stop_writes),
            daemon=True,
        ).start()
        daemon.run()
    finally:
        stop_writes.set()
        server.stop()
        server.remove()
    click.echo(f"Stopped. The key, policy, destinations and audit trail stay in {root}.")


def _banner(root: Path, env: dict[str, str], server: LocalPostgres, http: str) -> None:
    click.secho(
        "drbot demo: the daemon on a throwaway PostgreSQL (Ctrl-C stops everything)", bold=True
    )
    click.echo(f"  database      {server.uri('shop')} (a row written every 0.5 s)")
    click.echo(f"  policy        {root}/policies/demo.yaml (one-minute schedules)")
    click.echo(f"  destinations  {root}/destinations/primary and …/replica")
    click.echo(f"  metrics       http://{http}/metrics   readiness http://{http}/readyz")
    click.echo("Look around from another terminal:")
    exports = " ".join(f"{k}={v}" for k, v in env.items() if k != "DRBOT_HTTP")
    click.echo(f"  export {exports}")
    click.echo(f"  curl -s http://{http}/metrics | grep '^drbot_'")
    click.echo("  drbot list --policy demo            backups and the WAL window they restore to")
    click.echo("  drbot drill history --policy demo   signed drill records")
    click.echo("  drbot audit show --last 20          what the daemon did, signed and chained")
    click.echo("Expect within about three minutes:")
