"""drbot audit: check and read the tamper-evident audit trail."""

from __future__ import annotations

from pathlib import Path

import click

from drbot.audit.event import EventFormatError, parse_line
from drbot.audit.ship import check_anchors, fetch_shipped, ship_trail
from drbot.audit.trail import PUBLIC_NAME, TRAIL_NAME, load_public_key, load_signing_key
from drbot.audit.verify import verify_trail
from drbot.cli import build
from drbot.cli.common import (
    audit_trail,
    find_policy,
    json_option,
    load_policies,
    load_settings,
    policies_option,
    print_json,
)
from drbot.clock import SystemClock
from drbot.errors import IntegrityFailure, PartialFailure, StorageUnavailable, UsageError
from drbot.settings import Settings
from drbot.storage.base import Storage


@click.group("audit")
def command() -> None:
    """Check and read the audit trail: every backup, verify and restore, signed and chained."""


def _trail_file(policies_dir: Path | None, trail: Path | None) -> Path:
    settings = load_settings(policies_dir)
    path = trail or settings.audit_directory / TRAIL_NAME
    if path.is_dir():
        path = path / TRAIL_NAME
    if not path.is_file():
        raise UsageError(
            f"no audit trail at {path}",
            hint="pass --trail FILE, or set DRBOT_AUDIT_DIR to where drbot writes it",
        )
    return path


@command.command("verify")
@click.option(
    "--trail",
    type=click.Path(path_type=Path),
    help="Trail file or directory (default: $DRBOT_AUDIT_DIR, else <state dir>/audit).",
)
@click.option(
    "--public-key",
    "public_key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The audit public key to trust (default: audit.pub next to the trail). An auditor "
    "should pass a copy obtained independently: the one beside the trail can be replaced too.",
)
@click.option(
    "--from",
    "from_destination",
    help="Verify the copy shipped to this destination (segments joined) and its anchors, "
    "instead of the local file.",
)
@click.option("--policy", "policy_name", help="The policy whose destination --from names.")
@policies_option
@json_option
def verify(
    trail: Path | None,
    public_key: Path | None,
    from_destination: str | None,
    policy_name: str | None,
    policies_dir: Path | None,
    as_json: bool,
) -> None:
    """Check every signature, hash and link of the trail; exit 13 naming the first bad event.

    Detects events that were edited, removed, inserted, duplicated or reordered, and lines
    that are not events. A torn last line (a crash while appending) is reported but is not a
    failure: the trail verifies up to the last whole event.

    \b
    Examples:
      drbot audit verify
      drbot audit verify --trail /evidence/trail.jsonl --public-key /evidence/audit.pub
      drbot audit verify --from replica --public-key /evidence/audit.pub
    """
    if from_destination is None:
        path = _trail_file(policies_dir, trail)
        key = load_public_key(public_key or path.parent / PUBLIC_NAME)
        report = verify_trail(path.read_bytes(), key)
        where = str(path)
    else:
        settings = load_settings(policies_dir)
        key = load_public_key(public_key or settings.audit_directory / PUBLIC_NAME)
        storage = _destination(settings, from_destination, policy_name)
        data, anchors = fetch_shipped(storage, key)
        report = verify_trail(data, key)
        check_anchors(report, anchors, key)
        where = f"{storage.name} ({storage.url}, {len(anchors)} anchor(s))"
    if as_json:
        print_json(
            {
                "trail": where,
                "ok": report.ok,
                "events": report.events,
                "head": None
                if report.head is None
                else {"seq": report.head.seq, "hash": report.head.hash, "time": report.head.time},
                "torn_tail": report.torn_tail,
                "problems": [
                    {"line": p.line, "seq": p.seq, "kind": p.kind, "message": p.message}
                    for p in report.problems
                ],
            }
        )
    else:
        head = report.head
        click.echo(
            f"{where}: {report.events} event(s)"
            + (f", head {head.seq} {head.hash[:16]}… at {head.time}" if head else "")
        )
        if report.torn_tail:
            click.echo(f"Note: {report.torn_tail}")
    if report.problems:
        first = report.problems[0]
        raise IntegrityFailure(
            f"audit trail {where} fails verification: {first.kind}: {first.message}"
            + (f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""),
            hint="compare with a copy of the trail shipped to a destination",
        )
    if not as_json:
        click.echo("OK: every event is signed, unchanged and in order.")


@command.command("show")
@click.option("--trail", type=click.Path(path_type=Path), help="Trail file or directory.")
@click.option("--policy", "policy_name", help="Only events of this policy.")
@click.option("--last", type=click.IntRange(min=1), default=20, show_default=True)
@policies_option
@json_option
def show(
    trail: Path | None,
    policy_name: str | None,
    last: int,
    policies_dir: Path | None,
    as_json: bool,
) -> None:
    """Print the last events of the trail (run `drbot audit verify` to check them).

    \b
    Examples:
      drbot audit show --last 50
      drbot audit show --policy shop --json
    """
    path = _trail_file(policies_dir, trail)
    events = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            event = parse_line(raw)
        except EventFormatError:
            continue
        if policy_name is None or event.policy == policy_name:
            events.append(event)
    events = events[-last:]
    if as_json:
        print_json([event.body() | {"hash": event.hash} for event in events])
        return
    for e in events:
        subject = " ".join(f"{k}={v}" for k, v in sorted(e.subject.items()))
        click.echo(
            f"{e.seq:>6} {e.time[:19]} {e.action:<24} {e.outcome:<8} "
            f"{e.policy or '-':<12} {subject}  ({e.actor})"
        )


def _destination(settings: Settings, name: str, policy_name: str | None) -> Storage:
    policies = [find_policy(settings, policy_name)] if policy_name else load_policies(settings)
    for policy in policies:
        for storage in build.build_storages(policy):
            if storage.name == name:
                return storage
    raise UsageError(
        f"no policy has a destination named {name!r}", hint="see drbot policy validate"
    )


def _all_destinations(settings: Settings) -> list[Storage]:
    """Every destination of every policy, once per URL."""
    seen: dict[str, Storage] = {}
    for policy in load_policies(settings):
        for storage in build.build_storages(policy):
            seen.setdefault(storage.url, storage)
    return list(seen.values())


@command.command("ship")
@policies_option
@json_option
def ship(policies_dir: Path | None, as_json: bool) -> None:
    """Copy new audit events to every destination and anchor the trail's head there.

    Each run stores the events not yet shipped as one sealed segment (object-locked where the
    destination has object lock) and a signed anchor of the newest event, so cutting or rolling
    back the trail later is detectable from storage alone. The daemon runs this on a schedule.

    \b
    Example:
      drbot audit ship
    """
    settings = load_settings(policies_dir)
    trail = audit_trail(settings)
    trail.record("audit.shipping", outcome="info")  # makes sure the trail and key exist
    key = load_signing_key(trail.key_path, create=False)
    result = ship_trail(trail.directory, _all_destinations(settings), key, SystemClock())
    if as_json:
        print_json(
            {
                "anchored_seq": result.anchored_seq,
                "shipped_bytes": result.shipped_bytes,
                "failed": result.failed,
            }
        )
    else:
        for name, sent in result.shipped_bytes.items():
            click.echo(f"{name}: {sent} new byte(s), anchored at event {result.anchored_seq}")
    if result.failed:
        failures = "; ".join(f"{d}: {why}" for d, why in result.failed.items())
        if not result.shipped_bytes:
            raise StorageUnavailable(f"the audit trail reached no destination: {failures}")
        raise PartialFailure(f"the audit trail was not shipped to: {failures}")
