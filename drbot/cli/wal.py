"""drbot wal: continuous WAL archiving (stream), archive_command (push), restore_command (fetch)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import click
import structlog

from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    backup_after_gap,
    find_policy,
    load_settings,
    policies_option,
    stream_until_stopped,
)
from drbot.errors import DrbotError, IntegrityFailure, StorageUnavailable, UsageError


@click.group("wal")
def command() -> None:
    """PostgreSQL WAL: stream it continuously, push or fetch one file.

    \b
    Continuous archiving (the usual way; RPO of seconds):
      drbot wal stream --policy shop
    As archive_command / restore_command, for setups that prefer them:
      archive_command = 'drbot wal push --policy shop %p'
      restore_command = 'drbot wal fetch --policy shop %f %p'
    """


@command.command("stream")
@click.option("--policy", "policy_name", required=True, help="Policy whose WAL to stream.")
@click.option(
    "--status-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Rewrite this JSON file every 2 s with positions, lag and connection state "
    "(the daemon reads it for /readyz and /metrics).",
)
@policies_option
def stream(policy_name: str, status_file: Path | None, policies_dir: Path | None) -> None:
    """Stream WAL through drbot's replication slot into every destination, until stopped.

    Each completed segment is stored and read back in every destination before the slot is
    allowed to advance, so the server keeps whatever drbot has not stored yet (watch its disk:
    set max_slot_wal_keep_size on the server to bound that). The unfinished segment is shipped
    every source.partial_interval (10s by default). Restarting resumes where the archive ends;
    a gap (slot dropped, WAL removed) is reported, recorded in the audit trail, and answered
    with a new full backup. Stop with Ctrl-C or SIGTERM (the unfinished segment is shipped
    first).
    """
    from drbot.engines.postgres.engine import PostgresEngine
    from drbot.engines.postgres.wal import format_lsn
    from drbot.ops.lock import policy_lock
    from drbot.ops.walstore import WalShipper
    from drbot.ops.walstream import Gap, StreamSettings, WalStreamer

    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    if policy.source.kind != "postgresql" or policy.source.mode != "physical":
        raise UsageError(
            f"policy {policy.name} is not a physical PostgreSQL policy; WAL streaming needs "
            "source.mode: physical"
        )
    storages = build.build_storages(policy)
    keys = build.build_keys(policy)
    engine = build.build_engine(policy)
    assert isinstance(engine, PostgresEngine)
    trail = audit_trail(settings)
    subject = {"slot": policy.wal_slot}
    stop = threading.Event()

    def on_gap(gap: Gap) -> None:
        trail.record(
            "wal.gap",
            policy=policy.name,
            subject={"slot": policy.wal_slot, "first_missing": gap.first_missing},
            outcome="failed",
            details={"resumed_at": gap.resumed_at, "error": gap.describe()},
        )
        click.echo(f"Error: {gap.describe()}; taking a new full backup now.", err=True)

        def backup() -> None:
            # In its own thread, so streaming goes on meanwhile; a failure is in the trail.
            with contextlib.suppress(DrbotError):
                backup_after_gap(settings, policy, trail, engine, "wal gap")

        threading.Thread(target=backup, name="drbot-gap-backup", daemon=True).start()

    shipper = WalShipper(
        policy.name,
        storages,
        keys,
        compression_level=policy.compression.level,
        compression_threads=0,
    )
    streamer = WalStreamer(
        StreamSettings(
            policy.name,
            policy.wal_slot,
            policy.source.partial_interval.total_seconds(),
        ),
        engine,
        shipper,
        on_gap=on_gap,
    )
    if status_file is not None:
        write_status_every(status_file, streamer.state.as_json, stop)
    stream_until_stopped(
        trail,
        policy=policy.name,
        subject=subject,
        kind="wal",
        lock=policy_lock(settings.state_dir, f"{policy.name}.wal"),
        banner=f"Streaming WAL of {policy.name} through slot {policy.wal_slot} to "
        f"{', '.join(s.name for s in storages)} (Ctrl-C to stop)",
        run=lambda: streamer.run(stop),
        stopped=lambda: {
            "segments": streamer.state.segments_shipped,
            "archived_lsn": format_lsn(streamer.state.archived_lsn),
        },
    )


def write_status_every(
    path: Path, state: Callable[[], dict[str, object]], stop: threading.Event
) -> None:
    """Rewrite `path` (atomically) with a streamer's `state()` every 2 s, in a daemon thread
    (the daemon reads it for /readyz and /metrics)."""
    import json
    from datetime import UTC, datetime

    def loop() -> None:
        while True:
            doc = {**state(), "pid": os.getpid(), "at": datetime.now(UTC)}
            tmp = path.with_name(path.name + ".tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(doc, default=str))
                tmp.replace(path)
            except OSError as exc:
                structlog.get_logger(__name__).warning(
                    "wal.status_unwritable", path=str(path), error=str(exc)
                )
            if stop.wait(2.0):
                return

    threading.Thread(target=loop, name="drbot-wal-status", daemon=True).start()


@command.command("fetch")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--policy", "policy_name", required=True, help="Policy whose archive to read.")
@click.option(
    "--from",
    "from_destination",
    default=None,
    help="Read only from this destination.",
)
@click.option(
    "--system-id", type=int, default=0, help="Refuse segments of another database system."
)
@policies_option
def fetch(
    name: str,
    dest: Path,
    policy_name: str,
    from_destination: str | None,
    system_id: int,
    policies_dir: Path | None,
) -> None:
    """Fetch WAL file NAME into DEST (PostgreSQL's %f and %p), decrypted and checked.

    Exit 1 when the archive has no such file (the normal end of recovery). Any other failure
    (damaged object, unreachable destinations, wrong key) exits 255 so that PostgreSQL stops
    recovery instead of taking it for the end of the archive and promoting too early.
    """
    from drbot.ops.walfetch import NotInArchive

    try:
        _fetch_from_archive(name, dest, policy_name, from_destination, system_id, policies_dir)
    except NotInArchive as exc:
        click.echo(f"drbot: {exc.message}", err=True)
        sys.exit(1)
    except DrbotError as exc:
        click.echo(f"drbot: Error: {exc.message}", err=True)
        sys.exit(255)
    except Exception as exc:
        click.echo(f"drbot: Error: {exc.__class__.__name__}: {exc}", err=True)
        sys.exit(255)


def _fetch_from_archive(
    name: str,
    dest: Path,
    policy_name: str,
    from_destination: str | None,
    system_id: int,
    policies_dir: Path | None,
) -> None:
    from drbot.ops.walfetch import fetch_wal_file
    from drbot.ops.walstore import KeyCache

    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    storages = build.only_destination(policy, build.build_storages(policy), from_destination)
    data = fetch_wal_file(
        policy.name, name, storages, KeyCache(build.build_keys(policy)), system_identifier=system_id
    )
    tmp = dest.with_name(f".{dest.name}.drbot-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


@command.command("push")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--policy", "policy_name", required=True, help="Policy whose archive to write.")
@policies_option
def push(path: Path, policy_name: str, policies_dir: Path | None) -> None:
    """Archive one WAL file (PostgreSQL's %p) in every destination, verified.

    For archive_command. Exit 0 only when every destination holds it. Pushing a file that is
    already archived with the same content succeeds (PostgreSQL retries after crashes); a
    different file under the same name is refused (exit 13).
    """
    from drbot.engines.postgres.wal import parse_history_file_name, parse_segment_name
    from drbot.ops.walfetch import NotInArchive, fetch_wal_file
    from drbot.ops.walstore import KeyCache, WalShipper
    from drbot.storage import layout

    settings = load_settings(policies_dir)
    policy = find_policy(settings, policy_name)
    name = path.name
    if parse_segment_name(name) is not None:
        key = layout.wal_segment_key(policy.name, name)
    elif parse_history_file_name(name) is not None:
        key = layout.wal_history_key(policy.name, name)
    elif name.endswith((".backup", ".partial")):
        # Backup history and partial files: recovery never needs them from drbot.
        click.echo(f"drbot: {name} is not needed for recovery; not archived", err=True)
        return
    else:
        raise UsageError(f"{name} is not a WAL file name (archive_command passes %p)")
    storages = build.build_storages(policy)
    keys = build.build_keys(policy)
    cache = KeyCache(keys)
    data = path.read_bytes()
    missing: list[str] = []
    for storage in storages:
        try:
            existing = fetch_wal_file(policy.name, name, [storage], cache, partial_ok=False)
        except NotInArchive:
            missing.append(storage.name)
            continue
        if existing != data:
            raise IntegrityFailure(
                f"{name} is already archived in {storage.name} with different content; "
                "refusing to overwrite it",
                hint="two servers may be archiving into one policy: give each its own policy",
            )
    if not missing:
        return
    shipper = WalShipper(policy.name, storages, keys, compression_level=policy.compression.level)
    failed = shipper.put(key, data, missing)
    if failed:
        raise StorageUnavailable(
            f"{name} could not be archived in: "
            + "; ".join(f"{d}: {why}" for d, why in failed.items())
        )
