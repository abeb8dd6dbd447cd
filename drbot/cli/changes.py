"""drbot changes: MongoDB change-stream incrementals."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    backup_after_gap,
    find_policy,
    json_option,
    load_settings,
    policies_option,
    print_json,
    recording_failure,
    stream_until_stopped,
)
from drbot.cli.wal import write_status_every
from drbot.errors import ChangeHistoryLost, UsageError


@click.group("changes")
def command() -> None:
    """MongoDB: follow the change stream and ship it in slices (the incrementals).

    \b
    Continuous incrementals (RPO of about source.partial_interval, 10 s by default):
      drbot changes stream --policy orders
    """


@command.command("stream")
@click.option("--policy", "policy_name", required=True, help="Policy whose changes to stream.")
@click.option(
    "--status-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Rewrite this JSON file every 2 s with position, connection state and when the "
    "destinations last held every change (the daemon reads it for /readyz and /metrics).",
)
@click.option(
    "--once",
    is_flag=True,
    help="Stop as soon as every change the server has is stored (a scheduled incremental; "
    "the daemon runs this for a cron schedule.incremental).",
)
@policies_option
@json_option
def stream(
    policy_name: str,
    status_file: Path | None,
    once: bool,
    policies_dir: Path | None,
    as_json: bool,
) -> None:
    """Follow the deployment's change stream into slices in every destination, until stopped.

    Every source.partial_interval the events gathered become one slice, stored and read back
    in every destination; each slice starts exactly where the previous one ended. It starts
    after the newest stored slice, or at the end of the newest full backup (take one first).
    If the server no longer holds the history to resume from, that gap is reported, recorded
    in the audit trail, and answered with a new full backup; streaming resumes from it. Stop
    with Ctrl-C or SIGTERM (what was gathered is shipped first). With --once it stops by itself
    when caught up.

    \b
    Examples:
      drbot changes stream --policy orders
      drbot changes stream --policy orders --once     catch up now, then exit 0
    """
    from drbot.engines.mongodb.engine import MongoEngine
    from drbot.ops.changestream import ChangeStreamer
    from drbot.ops.lock import policy_lock
    from drbot.ops.walstore import WalShipper

    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    if policy.source.kind != "mongodb":
        raise UsageError(
            f"policy {policy.name} is not a MongoDB policy; PostgreSQL streams WAL instead",
            hint=f"drbot wal stream --policy {policy.name}",
        )
    storages = build.build_storages(policy)
    keys = build.build_keys(policy)
    engine = build.build_engine(policy)
    assert isinstance(engine, MongoEngine)
    trail = audit_trail(settings)
    subject = {"source": "change stream"}

    def on_gap(gap: ChangeHistoryLost) -> None:
        trail.record(
            "changes.gap",
            policy=policy.name,
            subject=subject,
            outcome="failed",
            details={"error": gap.message},
        )
        click.echo(f"Error: {gap.message}; taking a new full backup now.", err=True)
        backup_after_gap(settings, policy, trail, engine, "change history gap")

    streamer = ChangeStreamer(
        policy.name,
        engine.client,
        policy.source.uri,
        storages,
        keys,
        WalShipper(policy.name, storages, keys, compression_level=policy.compression.level),
        interval_s=policy.source.partial_interval.total_seconds(),
        databases=policy.source.databases,
        on_gap=on_gap,
    )
    with recording_failure(trail, "changes.stream_failed", policy=policy.name, subject=subject):
        engine.topology()  # a standalone server is refused here, with the reason
    stop = threading.Event()
    if status_file is not None:
        write_status_every(status_file, streamer.state.as_json, stop)
    stream_until_stopped(
        trail,
        policy=policy.name,
        subject=subject,
        kind="changes",
        lock=policy_lock(settings.state_dir, f"{policy.name}.changes"),
        banner=f"Streaming changes of {policy.name} to "
        f"{', '.join(s.name for s in storages)} (Ctrl-C to stop)",
        run=lambda: streamer.run(stop, once=once),
        stopped=lambda: {
            "slices": streamer.state.slices_shipped,
            "events": streamer.state.events_shipped,
            "position": streamer.state.position,
        },
    )
    # Caught up (--once): say what was stored.
    summary = {"policy": policy.name, **streamer.state.as_json()}
    if as_json:
        print_json(summary)
    else:
        click.echo(
            f"Caught up: {streamer.state.slices_shipped} slice(s), "
            f"{streamer.state.events_shipped} change(s) stored; position "
            f"{streamer.state.position or 'unchanged'}"
        )
