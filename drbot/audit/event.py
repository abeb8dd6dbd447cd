"""One audit event and its canonical encoding, hash and signature.

An event is one line of JSON (UTF-8). Its `hash` is SHA-256 over the canonical encoding of
every other field except `sig` (JSON, keys sorted, separators `,` `:`, non-ASCII kept as UTF-8),
and it includes `prev`, the previous event's hash (64 zeros for the first event), which chains
the trail: changing, removing, inserting or reordering any event breaks every later link. `sig`
is the Ed25519 signature, base64, of the 32 hash bytes, so only the holder of the audit key can
extend the chain.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT_VERSION = 1
GENESIS = "0" * 64
_FIELDS = (
    "v",
    "seq",
    "time",
    "actor",
    "host",
    "action",
    "policy",
    "subject",
    "outcome",
    "details",
    "prev",
    "hash",
    "sig",
)


class EventFormatError(ValueError):
    """A line that is not a well-formed audit event (the message says which field)."""


@dataclass(frozen=True)
class AuditEvent:
    """One thing that happened. `subject` holds ids (backup, destination...), `details` the rest."""

    seq: int
    time: str  # ISO 8601 UTC, e.g. 2026-11-23T10:00:00.123456Z
    actor: str  # user@host that caused it (or "daemon")
    host: str
    action: str  # one name per kind of event, e.g. "backup.completed"
    policy: str | None
    subject: dict[str, Any] = field(default_factory=dict)
    outcome: str = "ok"  # ok | failed | partial | refused | info
    details: dict[str, Any] = field(default_factory=dict)
    prev: str = GENESIS
    hash: str = ""
    sig: str = ""
    v: int = FORMAT_VERSION

    def body(self) -> dict[str, Any]:
        """Every field the hash covers."""
        data = asdict(self)
        del data["hash"], data["sig"]
        return data

    def computed_hash(self) -> str:
        return hashlib.sha256(canonical(self.body())).hexdigest()

    def to_line(self) -> bytes:
        data = {**self.body(), "hash": self.hash, "sig": self.sig}
        return canonical(data) + b"\n"


def canonical(data: dict[str, Any]) -> bytes:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # A lone surrogate (a file name that was not UTF-8) becomes a JSON \udcXX escape, which
    # parses back to the same string, so hashing stays stable instead of failing to encode.
    return text.encode("utf-8", "backslashreplace")


def seal(event: AuditEvent, key: Ed25519PrivateKey) -> AuditEvent:
    """The event with its hash and signature filled in."""
    digest = event.computed_hash()
    sig = base64.b64encode(key.sign(bytes.fromhex(digest))).decode()
    return AuditEvent(**{**event.body(), "hash": digest, "sig": sig})


def signature_ok(event: AuditEvent, public: Ed25519PublicKey) -> bool:
    try:
        public.verify(base64.b64decode(event.sig, validate=True), bytes.fromhex(event.hash))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def parse_line(line: bytes) -> AuditEvent:
    """The event in one line (without its newline); EventFormatError if it is not one."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventFormatError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EventFormatError("not a JSON object")
    unknown = sorted(set(data) - set(_FIELDS))
    missing = sorted(set(_FIELDS) - set(data))
    if unknown or missing:
        raise EventFormatError(f"fields: unknown {unknown}, missing {missing}")
    types: dict[str, type | tuple[type, ...]] = {
        "v": int,
        "seq": int,
        "time": str,
        "actor": str,
        "host": str,
        "action": str,
        "policy": (str, type(None)),
        "subject": dict,
        "outcome": str,
        "details": dict,
        "prev": str,
        "hash": str,
        "sig": str,
    }
    for name, kind in types.items():
        if not isinstance(data[name], kind) or (kind is int and isinstance(data[name], bool)):
            raise EventFormatError(f"field {name} has the wrong type")
    if data["v"] != FORMAT_VERSION:
        raise EventFormatError(f"unsupported event format version {data['v']}")
    return AuditEvent(**data)


def iter_events(data: bytes) -> list[AuditEvent]:
    """Every line of `data` that is an event, in order (debris and torn lines skipped)."""
    events = []
    for raw in data.split(b"\n"):
        if raw:
            try:
                events.append(parse_line(raw))
            except EventFormatError:
                continue
    return events
