"""What every command shares: settings, policy lookup, building the objects a policy names,
output helpers and progress display."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from drbot import log as drbot_log
from drbot.audit.trail import AuditSink, FileAuditTrail
from drbot.clock import SystemClock
from drbot.errors import DrbotError, Interrupted, PolicyInvalid, UsageError
from drbot.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

stderr = Console(stderr=True, highlight=False)


def policies_option(func: F) -> F:
    """--policies DIR on every command (default: $DRBOT_POLICIES or ./policies)."""
    return click.option(
        "--policies",
        "policies_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Directory of policy files [default: $DRBOT_POLICIES or ./policies].",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(func)


def load_settings(policies_dir: Path | None = None) -> Settings:
    """Settings from the environment; `--policies` wins over DRBOT_POLICIES."""
    settings = Settings()
    if policies_dir is not None:
        settings = settings.model_copy(update={"policies": policies_dir})
    drbot_log.configure(settings.log_level, settings.log_format)
    return settings


def load_policies(settings: Settings) -> list[Any]:
    from drbot.policy.load import load_policies as _load

    policies = _load(settings.policies, os.environ)
    note_policies(settings, policies)
    return policies


def note_policies(settings: Settings, policies: list[Any]) -> None:
    """Record `policy.loaded` for a policy seen for the first time, `policy.changed` when the
    text of its file differs from the last time (both with the file's SHA-256)."""
    seen_file = settings.audit_directory / "policies-seen.json"
    try:
        seen: dict[str, str] = json.loads(seen_file.read_text())
    except (OSError, ValueError):
        seen = {}
    changed = False
    for policy in policies:
        digest = policy.source_sha256
        if digest is None or seen.get(policy.name) == digest:
            continue
        try:
            audit_trail(settings).record(
                "policy.changed" if policy.name in seen else "policy.loaded",
                policy=policy.name,
                subject={"file": str(policy.source_file)},
                outcome="info",
                details={"sha256": digest, "previous_sha256": seen.get(policy.name)},
            )
        except DrbotError as exc:
            # Reading policies must work for people who cannot write the trail (an auditor
            # running `list`); commands that act record their own events and fail there.
            structlog.get_logger(__name__).warning("audit.record_failed", error=exc.message)
            return
        seen[policy.name] = digest
        changed = True
    if changed:
        tmp = seen_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen, indent=1, sort_keys=True))
        tmp.replace(seen_file)


def find_policy(settings: Settings, name: str) -> Any:
    """The policy called `name` in the policies directory; every policy file must be valid."""
    policies = load_policies(settings)
    for p in policies:
        if p.name == name:
            return p
    known = ", ".join(sorted(p.name for p in policies)) or "none"
    raise PolicyInvalid(
        f"no policy named {name!r} in {settings.policies} (policies: {known})",
        hint="--policies DIR points at another directory",
    )


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def confirm(question: str, *, yes: bool) -> None:
    """Ask before doing something with consequences; refuse when nobody can answer."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(
            "refusing to write without confirmation: standard input is not a terminal",
            hint="add --yes to confirm non-interactively",
        )
    if not click.confirm(question, default=False, err=True):
        raise click.exceptions.Abort()


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Callable[[str, int], None]]:
    """A callback (label, bytes so far) drawn as progress bars on a terminal; silent otherwise."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda _label, _n: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(label: str, n: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=None)
            bar.update(tasks[label], completed=n)

        yield update


def audit_trail(settings: Settings) -> FileAuditTrail:
    """The audit sink every command records into (see docs/audit.md)."""
    return FileAuditTrail(settings.audit_directory, SystemClock(), key_path=settings.audit_key)


def failure_details(exc: BaseException) -> dict[str, Any]:
    """What an audit event says about a failure: the message (redacted) and the exit code."""
    if isinstance(exc, DrbotError):
        return {"error": drbot_log.redact_text(exc.message), "exit_code": exc.exit_code}
    if isinstance(exc, KeyboardInterrupt):
        return {"error": "interrupted", "exit_code": Interrupted.exit_code}
    return {"error": drbot_log.redact_text(f"{exc.__class__.__name__}: {exc}"), "exit_code": 1}


@contextmanager
def recording_failure(
    trail: AuditSink,
    action: str,
    *,
    policy: str | None,
    subject: dict[str, Any],
    extra: Callable[[], dict[str, Any]] | None = None,
) -> Iterator[None]:
    """Record `action` (outcome failed, error and exit code, plus `extra()` read at failure
    time) if the block fails with a drbot error or is interrupted, then let it propagate."""
    try:
        yield
    except (DrbotError, KeyboardInterrupt) as exc:
        details = {**failure_details(exc), **(extra() if extra is not None else {})}
        trail.record(action, policy=policy, subject=subject, outcome="failed", details=details)
        raise


def stream_until_stopped(
    trail: AuditSink,
    *,
    policy: str,
    subject: dict[str, Any],
    kind: str,
    lock: AbstractContextManager[object],
    banner: str,
    run: Callable[[], None],
    stopped: Callable[[], dict[str, Any]],
) -> None:
    """Run a streamer (`kind` is `wal` or `changes`) until Ctrl-C or SIGTERM, or until `run`
    returns (it was asked to stop when caught up), in the audit trail as
    `<kind>.stream_started`, `<kind>.stream_stopped` (with `stopped()`'s details) or
    `<kind>.stream_failed`; an interrupt ends in KeyboardInterrupt (exit 130), as any."""
    interrupted = False
    with recording_failure(trail, f"{kind}.stream_failed", policy=policy, subject=subject), lock:
        trail.record(f"{kind}.stream_started", policy=policy, subject=subject, outcome="info")
        click.echo(banner, err=True)
        try:
            run()
        except KeyboardInterrupt:
            # The streamer shipped what it held while unwinding; a stop is not a failure.
            interrupted = True
    trail.record(
        f"{kind}.stream_stopped",
        policy=policy,
        subject=subject,
        outcome="info",
        details=stopped(),
    )
    if interrupted:
        raise KeyboardInterrupt


def backup_after_gap(
    settings: Settings, policy: Any, trail: AuditSink, engine: Any, reason: str
) -> None:
    """Take the full backup that answers a gap in the incrementals (WAL or change history),
    recorded in the audit trail as any backup; a failure is recorded as `backup.failed` with
    `reason`, and raised."""
    from drbot.cli import build
    from drbot.ops.audit_events import record_backup
    from drbot.ops.backup import run_backup
    from drbot.ops.lock import policy_lock

    storages, keys = build.build_storages(policy), build.build_keys(policy)
    try:
        with policy_lock(settings.state_dir, policy.name):
            result = run_backup(
                build.backup_settings(policy), engine, storages, keys, SystemClock()
            )
        record_backup(trail, policy.name, result, "full")
    except DrbotError as exc:
        trail.record(
            "backup.failed",
            policy=policy.name,
            subject={"reason": reason},
            outcome="failed",
            details={"error": exc.message, "exit_code": exc.exit_code},
        )
        raise
