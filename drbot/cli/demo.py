"""drbot demo: a whole backup → verify → restore → compare cycle on a throwaway local database."""

from __future__ import annotations

import os
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import click

from drbot.audit.ship import check_anchors, fetch_shipped, ship_trail
from drbot.audit.trail import FileAuditTrail, load_signing_key
from drbot.audit.verify import verify_trail
from drbot.catalog import scan_catalog
from drbot.cli.common import human_bytes, load_settings
from drbot.clock import SystemClock
from drbot.errors import IntegrityFailure
from drbot.ops.audit_events import (
    record_backup,
    record_restore_completed,
    record_restore_planned,
    record_verify,
)
from drbot.ops.backup import BackupResult, BackupSettings, run_backup
from drbot.ops.lock import policy_lock
from drbot.ops.restore import execute_restore, plan_restore
from drbot.ops.verify import run_verify
from drbot.pipeline.filekey import FileKeyProvider, generate_key_file
from drbot.policy.load import load_policy
from drbot.storage.open import open_storage

if TYPE_CHECKING:
    from drbot.engines.postgres.localserver import LocalPostgres
    from drbot.policy.schema import Policy
    from drbot.storage.base import Storage

_POLICY = """\
# Written by `drbot demo`: the demo's policy, valid like any other.
version: 1
name: demo
source:
  kind: postgresql
  mode: logical                 # pg_dump of the listed databases
  uri: ${{DRBOT_DEMO_DB_URI}}   # the demo's throwaway server; set by `drbot demo`
  databases: [shop]
encryption:
  key: file:{key}
compression:
  level: 3
destinations:
  - name: primary
    url: file://{root}/destinations/primary
  - name: replica
    url: file://{root}/destinations/replica
targets:
  rpo: 24h
  rto: 30m
"""


def _step(n: int, text: str) -> None:
    click.secho(f"[{n}/8] {text}", bold=True)


@click.command("demo")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("drbot-demo"),
    show_default=True,
    help="Where the demo keeps its key, policy and the two destinations.",
)
@click.option(
    "--tour",
    is_flag=True,
    help="Instead of the daemon: one backup, verify, restore, drill and audit check, in order "
    "(a few seconds), then stop.",
)
@click.option(
    "--stop-after",
    type=click.FloatRange(min=1),
    default=None,
    help="Stop the daemon demo after this many seconds [default: run until Ctrl-C].",
)
def command(workdir: Path, tour: bool, stop_after: float | None) -> None:
    """Run the daemon on a throwaway PostgreSQL under a steady write load, until Ctrl-C.

    Starts a private PostgreSQL server (from the machine's PostgreSQL binaries) with a sample
    shop database and a writer adding rows every half second, generates a key, writes a
    policy with one-minute schedules and two local-directory destinations (standing for two
    regions), and runs `drbot daemon` on it. Within about three minutes you see a full backup,
    WAL streaming, a retention pass and a passing drill; the metrics URL and commands to look
    around are printed at the start. Ctrl-C stops everything cleanly. The key, policy,
    destinations and audit trail stay in --dir. Rerunning starts afresh.

    With --tour: one encrypted backup into both destinations, verify, restore into a second
    database and compare table by table, a drill and an audit check, then stop.

    \b
    Examples:
      drbot demo                         the daemon, until Ctrl-C
      drbot demo --tour --dir /tmp/drbot-demo
    """
    if not tour:
        from drbot.cli.demo_daemon import run_daemon_demo

        run_daemon_demo(workdir.resolve(), stop_after)
        return
    from drbot.engines.postgres.localserver import LocalPostgres

    load_settings(None)
    root = workdir.resolve()
    if root.exists():
        shutil.rmtree(root)
    for sub in ("policies", "destinations/primary", "destinations/replica"):
        (root / sub).mkdir(parents=True)
    key_path = root / "demo.key"
    t_start = time.monotonic()

    _step(1, "Starting a throwaway PostgreSQL with sample data")
    server = LocalPostgres()
    server.start()
    try:
        server.create_database("shop")
        sql = resources.files("drbot.demo").joinpath("sample.sql").read_text()
        server.execute("shop", sql)
        source_uri = server.uri("shop")
        click.echo(f"      server {server.uri('postgres')} (stopped at the end)")

        _step(2, "Generating a key and writing the demo policy")
        trail = FileAuditTrail(root / "audit", SystemClock())
        key_id = generate_key_file(key_path)
        trail.record("key.generated", subject={"key_id": key_id}, details={"path": str(key_path)})
        policy_path = root / "policies" / "demo.yaml"
        policy_path.write_text(_POLICY.format(key=key_path, root=root))
        policy = load_policy(policy_path, {**os.environ, "DRBOT_DEMO_DB_URI": source_uri})
        click.echo(f"      key {key_id} in {key_path}; policy {policy_path}")

        storages = [open_storage(d.name, d.url) for d in policy.destinations]
        keys = FileKeyProvider(key_path)

        result = _backup_and_verify(policy, source_uri, storages, keys, trail, root)
        _restore_and_compare(server, policy.name, storages, keys, trail)
        _drill(policy, storages, keys, trail, root)
        _check_audit_trail(trail, storages)
    finally:
        server.stop()
        server.remove()

    _print_where(root, key_path, policy_path, result.backup_id, time.monotonic() - t_start)


def _backup_and_verify(
    policy: Policy,
    source_uri: str,
    storages: list[Storage],
    keys: FileKeyProvider,
    trail: FileAuditTrail,
    root: Path,
) -> BackupResult:
    from drbot.engines.postgres.engine import PostgresEngine

    engine = PostgresEngine(source_uri, ["shop"])
    _step(3, "Backing up (pg_dump → zstd → AES-256-GCM → both destinations, read once)")
    settings = BackupSettings(policy=policy.name, engine_name="postgresql")
    with policy_lock(root / "state", policy.name):
        result = run_backup(settings, engine, storages, keys, SystemClock())
    record_backup(trail, policy.name, result, "full")
    stored = max(result.stored_bytes.values())
    click.echo(
        f"      backup {result.backup_id}: {human_bytes(result.plaintext_bytes)} dumped, "
        f"{human_bytes(stored)} stored in {', '.join(result.destinations_ok)}"
    )

    _step(4, "Verifying every stored object in every destination")
    report = run_verify(policy.name, storages, keys)
    record_verify(trail, policy.name, report)
    if not report.ok:
        raise IntegrityFailure(f"verify found problems: {report.findings}")
    click.echo(
        f"      {report.checked_objects} objects, every frame authenticated, SHA-256 matches"
    )

    return result


def _restore_and_compare(
    server: LocalPostgres,
    policy_name: str,
    storages: list[Storage],
    keys: FileKeyProvider,
    trail: FileAuditTrail,
) -> None:
    from drbot.engines.postgres.engine import PostgresEngine

    _step(5, "Restoring into a second database, shop_restored (from the replica)")
    target_uri = server.uri("shop_restored")
    target = PostgresEngine(target_uri, None)
    scan = scan_catalog(policy_name, storages, keys)
    plan = plan_restore(
        scan,
        policy=policy_name,
        target=target_uri,
        target_state="empty" if target.target_is_empty(target_uri) else "not-empty",
        from_destination="replica",
    )
    record_restore_planned(trail, plan, dry_run=False)
    restored = execute_restore(
        plan, scan, {s.name: s for s in storages}, target, target_uri, SystemClock()
    )
    record_restore_completed(trail, plan, restored)
    click.echo(f"      restored in {restored.duration_s:.1f}s")

    _step(6, "Comparing restored data with the backup's fingerprint")
    if restored.mismatches:
        raise IntegrityFailure(f"restored data differs: {restored.mismatches}")
    assert plan.expected is not None
    for name, t in sorted(plan.expected.tables.items()):
        click.echo(f"      {name:<20} {t.rows:>7} rows  checksum {t.checksum[:12]}…  match")


def _drill(
    policy: Policy,
    storages: list[Storage],
    keys: FileKeyProvider,
    trail: FileAuditTrail,
    root: Path,
) -> None:
    from drbot.drills.evidence import keep_evidence
    from drbot.drills.process_sandbox import ProcessSandbox
    from drbot.drills.runner import DrillContext, run_drill
    from drbot.engines.postgres.localserver import find_bin_dir

    _step(7, "Drilling: restore into a throwaway sandbox, check, measure RTO and RPO")
    # The process sandbox needs no Docker; `drbot drill` uses a no-network container by default.
    bin_dir = find_bin_dir(None, "postgres")
    report = run_drill(
        DrillContext(policy, storages, keys, ProcessSandbox(bin_dir), bin_dir),
        from_destination="primary",
    )
    _envelope, stored = keep_evidence(
        report, load_signing_key(trail.key_path), trail, root / "state", storages
    )
    failure = report.failure()
    if failure is not None:
        raise failure
    for check in report.checks:
        click.echo(f"      {check.name:<20} ok  {check.detail}")
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items())
    click.echo(
        f"      RTO {report.rto_s:.1f}s ({phases}); RPO {report.rpo_s:.1f}s; signed record "
        f"stored in {', '.join(stored.destinations)}"
    )


def _check_audit_trail(trail: FileAuditTrail, storages: list[Storage]) -> None:
    _step(8, "Shipping the signed audit trail to both destinations and verifying it from there")
    key = load_signing_key(trail.key_path)
    shipped = ship_trail(trail.directory, storages, key, SystemClock())
    if shipped.failed:
        raise IntegrityFailure(f"audit trail not shipped: {shipped.failed}")
    for storage in storages:
        data, anchors = fetch_shipped(storage, key.public_key())
        report = verify_trail(data, key.public_key())
        check_anchors(report, anchors, key.public_key())
        if not report.ok:
            raise IntegrityFailure(f"audit trail in {storage.name}: {report.problems[0].message}")
    click.echo(
        f"      {shipped.anchored_seq} events, each signed and chained; anchored in "
        f"{', '.join(s.name for s in storages)}; `drbot audit verify` passes"
    )


def _print_where(
    root: Path, key_path: Path, policy_path: Path, backup_id: str, elapsed_s: float
) -> None:
    click.echo("")
    click.secho(f"Demo complete in {elapsed_s:.1f}s. Where things are:", bold=True)
    click.echo(f"  key           {key_path}   (mode 0600; without it the backups are unreadable)")
    click.echo(f"  policy        {policy_path}")
    click.echo(f"  destinations  {root}/destinations/primary and …/replica")
    click.echo(f"  backup        {backup_id} (manifest.json + encrypted artifacts)")
    click.echo(f"  audit trail   {root}/audit/trail.jsonl (public key audit.pub beside it)")
    click.echo("Try:")
    click.echo(f"  DRBOT_DEMO_DB_URI=postgresql://unused drbot list --policies {root}/policies")
    click.echo(
        f"  DRBOT_DEMO_DB_URI=postgresql://unused drbot verify --policies {root}/policies "
        "--policy demo"
    )
    click.echo(f"  drbot audit verify --trail {root}/audit")
    click.echo(f"  drbot audit show --trail {root}/audit")
    click.echo(
        f"  DRBOT_DEMO_DB_URI=postgresql://unused DRBOT_STATE_DIR={root}/state "
        f"DRBOT_AUDIT_DIR={root}/audit drbot drill history --policies {root}/policies "
        "--policy demo"
    )
