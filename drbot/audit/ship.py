"""The trail in storage: sealed segments in every destination, and signed anchors of its head.

A segment is a byte range `[start, end)` of `trail.jsonl` ending on a line boundary, stored
verbatim, so the concatenated segments are the trail itself and verify exactly like it. After
each shipment an anchor (sequence number, hash and end offset of the head event, signed with
the audit key) is written next to them; where the destination has object lock, segments and
anchors are locked like backups. A trail cut short or rolled back after an anchor was written
no longer reaches that anchor, which `verify_shipped` reports even though every remaining
event is intact.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from drbot.audit.event import canonical
from drbot.audit.trail import TRAIL_NAME, public_key_text
from drbot.audit.verify import TrailProblem, TrailReport, verify_trail
from drbot.clock import Clock
from drbot.errors import DrbotError, IntegrityFailure
from drbot.storage import layout
from drbot.storage.base import Storage

SHIP_LOCK_NAME = "ship.lock"


def trail_id(public: Ed25519PublicKey) -> str:
    """Where a trail lives in a destination: the first 16 hex digits of its public key."""
    return public_key_text(public)[:16]


@dataclass(frozen=True)
class Anchor:
    """A signed statement: the trail reached event `seq` with `hash`, `end` bytes long."""

    trail: str
    seq: int
    hash: str
    end: int
    time: str
    sig: str = ""

    def body(self) -> bytes:
        data = asdict(self)
        del data["sig"]
        return canonical(data)

    def signed(self, key: Ed25519PrivateKey) -> Anchor:
        sig = base64.b64encode(key.sign(self.body())).decode()
        return Anchor(self.trail, self.seq, self.hash, self.end, self.time, sig)

    def signature_ok(self, public: Ed25519PublicKey) -> bool:
        try:
            public.verify(base64.b64decode(self.sig, validate=True), self.body())
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True

    def to_bytes(self) -> bytes:
        return canonical(asdict(self)) + b"\n"


@dataclass
class ShipResult:
    shipped_bytes: dict[str, int] = field(default_factory=dict)
    anchored_seq: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def ship_trail(
    directory: Path, storages: Sequence[Storage], key: Ed25519PrivateKey, clock: Clock
) -> ShipResult:
    """Send every whole event not yet in each destination, then anchor the head there.

    Raises IntegrityFailure if the local trail does not verify (a broken trail is not spread).
    A destination that fails, or already holds more or other bytes than the local trail (the
    local one was cut or replaced), is reported in `failed` and left untouched.
    """
    with _ship_lock(directory):
        return _ship(directory, storages, key, clock)


@contextmanager
def _ship_lock(directory: Path) -> Iterator[None]:
    """One shipment at a time per trail: two would both add a segment from the same offset."""
    try:
        fd = os.open(directory / SHIP_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise DrbotError(f"cannot lock {directory} for shipping: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ship(
    directory: Path, storages: Sequence[Storage], key: Ed25519PrivateKey, clock: Clock
) -> ShipResult:
    data = (directory / TRAIL_NAME).read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    public = key.public_key()
    report = verify_trail(whole, public)
    if not report.ok:
        first = report.problems[0]
        raise IntegrityFailure(f"the local audit trail fails verification ({first.message})")
    result = ShipResult()
    if report.head is None:
        return result
    tid = trail_id(public)
    anchor = Anchor(
        trail=tid,
        seq=report.head.seq,
        hash=report.head.hash,
        end=len(whole),
        time=clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    ).signed(key)
    for storage in storages:
        try:
            result.shipped_bytes[storage.name] = _ship_one(storage, tid, whole, anchor)
        except DrbotError as exc:
            result.failed[storage.name] = exc.message
    result.anchored_seq = anchor.seq
    return result


def _segments(storage: Storage, tid: str) -> list[tuple[int, int, str]]:
    found = []
    for info in storage.list(layout.audit_prefix(tid) + "segments/"):
        span = layout.parse_audit_segment_key(tid, info.key)
        if span is not None:
            found.append((span[0], span[1], info.key))
    return sorted(found)


def _ship_one(storage: Storage, tid: str, whole: bytes, anchor: Anchor) -> int:
    segments = _segments(storage, tid)
    shipped = segments[-1][1] if segments else 0
    where = f"{storage.name}:{layout.audit_prefix(tid)}"
    if shipped > len(whole):
        raise IntegrityFailure(
            f"{where} holds {shipped} bytes of this trail, the local trail only {len(whole)}: "
            "the local trail was cut or replaced"
        )
    if segments:
        start, end, key = segments[-1]
        if b"".join(storage.open(key)) != whole[start:end]:
            raise IntegrityFailure(f"{where}: the local trail no longer matches segment {key}")
    sent = 0
    if shipped < len(whole):
        storage.put(layout.audit_segment_key(tid, shipped, len(whole)), [whole[shipped:]])
        sent = len(whole) - shipped
    anchor_key = layout.audit_anchor_key(tid, anchor.seq)
    try:
        storage.stat(anchor_key)
    except DrbotError:
        storage.put(anchor_key, [anchor.to_bytes()])
    return sent


def fetch_shipped(storage: Storage, public: Ed25519PublicKey) -> tuple[bytes, list[Anchor]]:
    """The trail as shipped to `storage` (segments joined) and its anchors, unverified.

    Anchors are read first, so a shipment landing meanwhile can only add bytes past them,
    never an anchor past the bytes read. Raises IntegrityFailure if nothing was shipped there
    or the segments do not join up (one is missing or overlaps).
    """
    anchors = fetch_anchors(storage, public)
    tid = trail_id(public)
    segments = _segments(storage, tid)
    if not segments:
        raise IntegrityFailure(
            f"{storage.name}: holds no audit trail segments under {layout.audit_prefix(tid)}",
            hint="run `drbot audit ship` first; if it ran, the segments were deleted",
        )
    data = bytearray()
    for start, end, key in segments:
        if start != len(data):
            raise IntegrityFailure(
                f"{storage.name}:{key}: trail bytes {len(data)}..{start} are missing "
                "(a segment was deleted)"
            )
        chunk = b"".join(storage.open(key))
        if len(chunk) != end - start:
            raise IntegrityFailure(
                f"{storage.name}:{key}: {len(chunk)} bytes, expected {end - start}"
            )
        data += chunk
    return bytes(data), anchors


def fetch_anchors(storage: Storage, public: Ed25519PublicKey) -> list[Anchor]:
    """The trail's anchors in `storage`, by sequence number (signatures not yet checked).

    Raises IntegrityFailure for an object in the anchors folder that is not an anchor.
    """
    tid = trail_id(public)
    anchors = []
    for info in storage.list(layout.audit_prefix(tid) + "anchors/"):
        named = layout.parse_audit_anchor_key(tid, info.key)
        if named is None:
            continue
        raw = b"".join(storage.open(info.key))
        try:
            anchor = anchor_from_json(json.loads(raw))
        except (TypeError, ValueError, KeyError):
            raise IntegrityFailure(f"{storage.name}:{info.key}: not an anchor") from None
        if (anchor.seq, anchor.trail) != (named, tid):
            # An older anchor copied over a newer one would hide a later cut.
            raise IntegrityFailure(
                f"{storage.name}:{info.key}: holds the anchor of event {anchor.seq} of trail "
                f"{anchor.trail}: anchors were moved"
            )
        anchors.append(anchor)
    return sorted(anchors, key=lambda a: a.seq)


def anchor_from_json(data: object) -> Anchor:
    if not isinstance(data, dict) or set(data) != {"trail", "seq", "hash", "end", "time", "sig"}:
        raise ValueError("not an anchor")
    seq, end = data["seq"], data["end"]
    if not isinstance(seq, int) or not isinstance(end, int):
        raise ValueError("not an anchor")
    return Anchor(
        str(data["trail"]), seq, str(data["hash"]), end, str(data["time"]), str(data["sig"])
    )


def check_anchors(report: TrailReport, anchors: list[Anchor], public: Ed25519PublicKey) -> None:
    """Add a problem to `report` for every anchor the trail does not honour."""
    head = report.head.seq if report.head else 0
    for anchor in anchors:
        where = f"anchor {anchor.seq} ({anchor.time})"
        if not anchor.signature_ok(public):
            report.problems.append(
                TrailProblem(0, anchor.seq, "bad-anchor", f"{where} is not signed by the audit key")
            )
        elif anchor.seq > head:
            report.problems.append(
                TrailProblem(
                    0,
                    anchor.seq,
                    "truncated",
                    f"the trail ends at event {head}, but {where} shows it reached "
                    f"event {anchor.seq}: events were cut off or rolled back",
                )
            )
        elif report.hashes.get(anchor.seq) != anchor.hash:
            report.problems.append(
                TrailProblem(
                    0,
                    anchor.seq,
                    "rewritten",
                    f"event {anchor.seq} differs from the one {where} recorded: "
                    "the trail was rewritten",
                )
            )
