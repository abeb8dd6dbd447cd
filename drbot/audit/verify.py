"""Check a trail: every signature, every hash, the chain, and sequence continuity.

Pure: it takes the trail's bytes and a public key, and says what is wrong and where, naming
the first bad event. What it can tell apart:

- edited: an event's content no longer matches its hash (or its signature does not verify);
- missing: sequence numbers jump (events removed);
- reordered / duplicated / inserted: a sequence number repeats or goes back, or an event's
  `prev` is not the hash of the event before it;
- damaged: a line that is not an event, unless it was a crash's torn line that the next append
  recorded with an `audit.torn_line` event (offset and SHA-256 match);
- a torn last line (a crash while appending) is reported but is not a failure: the trail
  verifies up to the last whole event.

Cutting events off the end cannot be seen from the trail alone; anchors in storage do that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from drbot.audit.event import GENESIS, AuditEvent, EventFormatError, parse_line, signature_ok


@dataclass(frozen=True)
class TrailProblem:
    """One thing wrong, at a 1-based line of the trail."""

    line: int
    seq: int | None
    kind: str  # edited | bad-signature | missing | reordered | chain-broken | damaged
    message: str


@dataclass
class TrailReport:
    events: int = 0
    head: AuditEvent | None = None
    problems: list[TrailProblem] = field(default_factory=list)
    torn_tail: str | None = None  # description of an incomplete last line, if any
    hashes: dict[int, str] = field(default_factory=dict)  # seq -> hash, to check anchors

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_trail(data: bytes, public: Ed25519PublicKey) -> TrailReport:
    """Verify a whole trail (`trail.jsonl` bytes) against the audit public key."""
    report = TrailReport()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty, a torn line, or an event lacking "\n"
    parsed = [_parse(raw) for raw in lines]
    if tail and isinstance(last := _parse(tail), AuditEvent):
        lines.append(tail)
        parsed.append(last)
        tail = b""
    # Where each sequence number occurs, to tell a reordering from a removal.
    lines_of: dict[int, list[int]] = {}
    for number, item in enumerate(parsed, start=1):
        if isinstance(item, AuditEvent):
            lines_of.setdefault(item.seq, []).append(number)
    expected_seq = 1
    expected_prev = GENESIS
    offset = 0
    unexplained: list[tuple[int, int, bytes]] = []  # (line, offset, bytes) of bad lines
    last_error = ""
    for number, (raw, event) in enumerate(zip(lines, parsed, strict=True), start=1):
        line_offset = offset
        offset += len(raw) + 1
        if isinstance(event, EventFormatError):
            unexplained.append((number, line_offset, raw))
            last_error = str(event)
            continue
        if unexplained:
            # Crash debris is explained by audit.torn_line events that follow it, in order.
            if _explains(event, unexplained[0]):
                unexplained.pop(0)
            else:
                for bad in unexplained:
                    _damaged(report, bad, f"is not an event ({last_error})")
                unexplained.clear()
        _check(report, public, number, event, (expected_seq, expected_prev), lines_of)
        report.events += 1
        report.head = event
        report.hashes.setdefault(event.seq, event.hash)
        expected_seq = event.seq + 1
        expected_prev = event.hash
    for bad in unexplained:
        _damaged(report, bad, "is not an event and nothing after it records why")
    if tail:
        report.torn_tail = (
            f"line {len(lines) + 1} is incomplete ({len(tail)} bytes): a crash while appending; "
            f"the trail verifies up to event {report.head.seq if report.head else 0}"
        )
    return report


def _explains(event: AuditEvent, bad: tuple[int, int, bytes]) -> bool:
    _, offset, raw = bad
    return (
        event.action == "audit.torn_line"
        and event.subject.get("offset") == offset
        and event.details.get("sha256") == hashlib.sha256(raw).hexdigest()
        and event.details.get("bytes") == len(raw)
    )


def _damaged(report: TrailReport, bad: tuple[int, int, bytes], why: str) -> None:
    number, offset, _ = bad
    report.problems.append(
        TrailProblem(number, None, "damaged", f"line {number} (byte {offset}) {why}")
    )


def _check(
    report: TrailReport,
    public: Ed25519PublicKey,
    number: int,
    event: AuditEvent,
    expected: tuple[int, str],
    lines_of: dict[int, list[int]],
) -> None:
    expected_seq, expected_prev = expected

    def problem(kind: str, message: str) -> None:
        report.problems.append(
            TrailProblem(number, event.seq, kind, f"event {event.seq} (line {number}): {message}")
        )

    if event.computed_hash() != event.hash:
        problem("edited", f"{event.action} was changed after it was written (hash mismatch)")
    elif not signature_ok(event, public):
        problem("bad-signature", f"{event.action} is not signed by the audit key")
    if event.seq > expected_seq:
        later = [n for n in lines_of.get(expected_seq, []) if n > number]
        if later:
            problem("reordered", f"event {expected_seq} comes later, at line {later[0]}")
        else:
            problem("missing", f"events {expected_seq}..{event.seq - 1} are missing")
    elif event.seq < expected_seq:
        problem("reordered", f"sequence goes back from {expected_seq - 1} to {event.seq}")
    elif event.prev != expected_prev:
        problem("chain-broken", "does not follow the event before it (inserted or reordered)")


def _parse(raw: bytes) -> AuditEvent | EventFormatError:
    try:
        return parse_line(raw)
    except EventFormatError as exc:
        return exc
