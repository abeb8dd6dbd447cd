"""drbot audit: check and read the tamper-evident audit trail."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from drbot.audit.event import EventFormatError, iter_events, parse_line
from drbot.audit.evidence import PolicyFacts, build_evidence, event_time
from drbot.audit.render import to_csv, to_html
from drbot.audit.ship import (
    Anchor,
    anchor_from_json,
    check_anchors,
    fetch_anchors,
    fetch_shipped,
    ship_trail,
)
from drbot.audit.trail import (
    PUBLIC_NAME,
    TRAIL_NAME,
    load_public_key,
    load_signing_key,
    public_key_text,
)
from drbot.audit.verify import TrailProblem, TrailReport, verify_trail
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
from drbot.errors import (
    DrbotError,
    IntegrityFailure,
    PartialFailure,
    StorageUnavailable,
    UsageError,
)
from drbot.settings import Settings
from drbot.storage.base import Storage


@click.group("audit")
def command() -> None:
    """Check and read the audit trail: every backup, verify and restore, signed and chained."""


def _trail_file(settings: Settings, trail: Path | None) -> Path:
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
    if from_destination is None and trail is not None and trail.suffix == ".json":
        report, where = _verify_export(trail, public_key)
    elif from_destination is None:
        path = _trail_file(load_settings(policies_dir), trail)
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
    path = _trail_file(load_settings(policies_dir), trail)
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


def _unique_destinations(policies: list[Any]) -> list[Storage]:
    """Every destination of `policies`, once per URL (policies may share a bucket)."""
    seen: dict[str, Storage] = {}
    for policy in policies:
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
    result = ship_trail(
        trail.directory, _unique_destinations(load_policies(settings)), key, SystemClock()
    )
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


def _parse_day(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"not a date: {text!r}", hint="use YYYY-MM-DD or an ISO 8601 time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@command.command("export")
@click.option("--since", required=True, help="Start of the period (YYYY-MM-DD or ISO time, UTC).")
@click.option("--until", required=True, help="End of the period, exclusive.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "csv", "html"]),
    default="json",
    show_default=True,
    help="json: the full evidence and the chain to verify it; csv: events; html: a report.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--policy", "policy_name", help="Only this policy (default: every policy).")
@click.option("--trail", type=click.Path(path_type=Path), help="Trail file or directory.")
@policies_option
def export(
    since: str,
    until: str,
    fmt: str,
    out: Path,
    policy_name: str | None,
    trail: Path | None,
    policies_dir: Path | None,
) -> None:
    """Write the evidence for a period: backups, restores, failures, and a verdict per control.

    Controls: backups on schedule, encryption in force, copies in two regions, immutability
    (object lock), restore tested within the RTO target; each marked met / not met with the
    audit events that show it. The JSON export carries the whole chain it was cut from and
    the public key, so an auditor can check it with `drbot audit verify --trail FILE`.
    A trail that does not verify is not exported (exit 13).

    \b
    Examples:
      drbot audit export --since 2026-10-01 --until 2026-11-01 --format html --out q4.html
      drbot audit export --since 2026-10-01 --until 2026-11-01 --policy shop --out shop.json
    """
    settings = load_settings(policies_dir)
    path = _trail_file(settings, trail)
    key = load_public_key(path.parent / PUBLIC_NAME)
    # Policies first (reading them may append policy events), then the anchors, then the
    # trail: a shipment landing meanwhile can only add events past the anchors read.
    policies = [find_policy(settings, policy_name)] if policy_name else load_policies(settings)
    facts = [
        PolicyFacts(p.name, full_schedule=p.schedule.full, rto=p.targets.rto) for p in policies
    ]
    anchors, unavailable = _anchors_of(policies, key)
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    report = verify_trail(whole, key)
    check_anchors(report, [a for _, a in anchors], key)
    if not report.ok or report.head is None:
        why = report.problems[0].message if report.problems else "the trail is empty"
        raise IntegrityFailure(f"not exporting from {path}: {why}")
    events = iter_events(whole)
    period = (_parse_day(since), _parse_day(until))
    doc = build_evidence(events, since=period[0], until=period[1], policies=facts)
    doc["chain"] = {
        "head": {"seq": report.head.seq, "hash": report.head.hash, "time": report.head.time},
        "public_key": public_key_text(key),
        "anchors": [{"destination": d, **asdict(a)} for d, a in anchors],
        "anchors_unavailable": unavailable,
        # The exact bytes: an event's hash covers its bytes, which text round trips can alter.
        "trail_base64": base64.b64encode(whole).decode(),
    }
    names = {f.name for f in facts}
    if fmt == "json":
        out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        rows = [
            e
            for e in events
            if e.policy in names or (e.policy is None and not policy_name)
            if period[0] <= event_time(e) < period[1]
        ]
        out.write_text(to_csv(rows))
    else:
        rto = {f.name: f.rto.total_seconds() if f.rto else None for f in facts}
        out.write_text(to_html(doc, rto))
    verdicts = [
        f"{name}: {sum(c['status'] == 'met' for c in pol['controls'].values())}/"
        f"{len(pol['controls'])} controls met"
        for name, pol in doc["policies"].items()
    ]
    click.echo(f"Wrote {fmt} evidence to {out} ({'; '.join(verdicts)}).")


def _verify_export(path: Path, public_key: Path | None) -> tuple[TrailReport, str]:
    """Verify an evidence export: its chain, its anchors, that the chain ends at the stated
    head, and that every verdict in it is what the chain's events give."""
    try:
        doc = json.loads(path.read_text())
        chain = doc["chain"]
        data = base64.b64decode(chain["trail_base64"], validate=True)
        embedded = Ed25519PublicKey.from_public_bytes(bytes.fromhex(chain["public_key"]))
        head = (int(chain["head"]["seq"]), str(chain["head"]["hash"]))
        anchors = [
            anchor_from_json({k: v for k, v in a.items() if k != "destination"})
            for a in chain.get("anchors", [])
        ]
        period = (_parse_day(doc["period"]["since"]), _parse_day(doc["period"]["until"]))
        facts = [
            PolicyFacts(
                name,
                full_schedule=pol["facts"]["full_schedule"],
                rto=None
                if pol["facts"]["rto_s"] is None
                else timedelta(seconds=pol["facts"]["rto_s"]),
            )
            for name, pol in doc["policies"].items()
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not a drbot evidence export ({exc!r})") from None
    key = load_public_key(public_key) if public_key is not None else embedded
    if public_key is None:
        click.echo(
            "Note: using the public key inside the export; pass --public-key with a copy "
            "obtained independently to rule out a re-signed export. Anchors inside an export "
            "can be removed by whoever edits it: `drbot audit verify --from DESTINATION` checks "
            "against the ones in storage.",
            err=True,
        )
    report = verify_trail(data, key)
    check_anchors(report, anchors, key)
    if report.head is None or (report.head.seq, report.head.hash) != head:
        report.problems.append(
            TrailProblem(0, head[0], "head-mismatch", "the chain does not end at the stated head")
        )
    if report.ok:
        events = iter_events(data)
        again = build_evidence(events, since=period[0], until=period[1], policies=facts)
        for name, pol in again["policies"].items():
            if json.loads(json.dumps(pol)) != doc["policies"][name]:
                report.problems.append(
                    TrailProblem(
                        0,
                        None,
                        "evidence-edited",
                        f"the evidence for policy {name} is "
                        "not what the chain's events give (verdicts or records edited)",
                    )
                )
        for section in ("key_events", "daemon_events"):
            if json.loads(json.dumps(again[section])) != doc.get(section):
                report.problems.append(
                    TrailProblem(0, None, "evidence-edited", f"{section} differ from the chain")
                )
    return report, f"{path} (export)"


def _anchors_of(
    policies: list[Any], key: Ed25519PublicKey
) -> tuple[list[tuple[str, Anchor]], dict[str, str]]:
    """Every anchor in the policies' destinations (once per URL); unreachable ones named."""
    found: list[tuple[str, Anchor]] = []
    unavailable: dict[str, str] = {}
    for storage in _unique_destinations(policies):
        try:
            found += [(storage.name, a) for a in fetch_anchors(storage, key)]
        except DrbotError as exc:
            unavailable[storage.name] = exc.message
    return found, unavailable
