"""Drill records: signed evidence of each drill, kept in every destination and locally.

A record is a JSON envelope (see docs/drills.md):

    {"format": "drbot-drill-record/1", "record": {...}, "sha256": HEX,
     "signature": BASE64, "public_key": HEX}

`sha256` is taken over the record's canonical JSON (sorted keys, no spaces, UTF-8) and
`signature` is the Ed25519 signature of those 32 bytes by the audit key, whose public half is
`public_key` (and `audit.pub` beside the audit trail). Anyone can check a record without drbot.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from drbot.audit.event import canonical
from drbot.audit.trail import public_key_text
from drbot.errors import DrbotError
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

FORMAT = "drbot-drill-record/1"


def seal_record(record: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    digest = hashlib.sha256(canonical(record)).digest()
    return {
        "format": FORMAT,
        "record": record,
        "sha256": digest.hex(),
        "signature": base64.b64encode(key.sign(digest)).decode(),
        "public_key": public_key_text(key.public_key()),
    }


def record_ok(envelope: dict[str, Any], trusted: Ed25519PublicKey | None = None) -> bool:
    """Whether `envelope` is intact and signed by `trusted` (or by the key it names)."""
    try:
        digest = hashlib.sha256(canonical(envelope["record"])).digest()
        if digest.hex() != envelope["sha256"] or envelope.get("format") != FORMAT:
            return False
        public = trusted or Ed25519PublicKey.from_public_bytes(
            bytes.fromhex(envelope["public_key"])
        )
        public.verify(base64.b64decode(envelope["signature"], validate=True), digest)
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidSignature):
        return False
    return True


def encode(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, indent=1, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class Stored:
    local: Path | None
    destinations: tuple[str, ...]
    failed: dict[str, str]


def store_record(envelope: dict[str, Any], state_dir: Path, storages: Sequence[Storage]) -> Stored:
    """Write the record locally and to every destination it can reach (never raises for one
    destination; what failed is returned, so the drill result is never lost to a storage hiccup)."""
    record = envelope["record"]
    policy, drill_id = record["policy"], record["drill_id"]
    data = encode(envelope)
    path = local_dir(state_dir, policy) / f"{drill_id}.json"
    local: Path | None = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        log.error("drill.record_local_failed", path=str(path), error=str(exc))
        local = None
    stored: list[str] = []
    failed: dict[str, str] = {}
    for storage in storages:
        try:
            storage.put(layout.drill_record_key(policy, drill_id), [data])
            stored.append(storage.name)
        except DrbotError as exc:
            failed[storage.name] = exc.message
            log.error("drill.record_store_failed", destination=storage.name, error=exc.message)
    return Stored(local, tuple(stored), failed)


def local_dir(state_dir: Path, policy: str) -> Path:
    return state_dir / "drills" / policy


@dataclass(frozen=True)
class HistoryEntry:
    envelope: dict[str, Any]
    signature: str
    """'ok' (signed by the trusted key), 'other-key' (intact, but signed by another key, or no
    key to trust was given) or 'bad' (altered or damaged)."""
    found_in: tuple[str, ...]

    @property
    def signature_ok(self) -> bool:
        return self.signature == "ok"

    @property
    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = self.envelope.get("record", {})
        return rec


def read_history(
    policy: str,
    state_dir: Path,
    storages: Iterable[Storage],
    trusted: Ed25519PublicKey | None = None,
) -> tuple[list[HistoryEntry], dict[str, str]]:
    """Every drill record of `policy`, locally and in the destinations, oldest first.

    Returns the entries and the destinations that could not be read (with why). A record whose
    copies differ is listed once per distinct content, so tampering with one copy shows.
    """
    found: dict[tuple[str, str], tuple[dict[str, Any], list[str]]] = {}
    unreachable: dict[str, str] = {}

    def add(raw: bytes, where: str, drill_id: str) -> None:
        try:
            env = json.loads(raw)
            if not isinstance(env, dict):
                raise ValueError("not an object")
        except ValueError:
            env = {"record": {"drill_id": drill_id, "policy": policy}, "damaged": True}
        digest = hashlib.sha256(canonical(env)).hexdigest()
        entry = found.setdefault((drill_id, digest), (env, []))
        entry[1].append(where)

    folder = local_dir(state_dir, policy)
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            try:
                add(path.read_bytes(), "local", path.stem)
            except OSError as exc:
                log.warning("drill.record_unreadable", path=str(path), error=str(exc))
    for storage in storages:
        try:
            for obj in storage.list(layout.drills_prefix(policy)):
                drill_id = layout.parse_drill_record_key(policy, obj.key)
                if drill_id is not None:
                    add(b"".join(storage.open(obj.key)), storage.name, drill_id)
        except DrbotError as exc:
            unreachable[storage.name] = exc.message
    entries = [
        HistoryEntry(env, _signature(env, trusted), tuple(where))
        for (_id, _d), (env, where) in sorted(found.items())
    ]
    return entries, unreachable


def _signature(envelope: dict[str, Any], trusted: Ed25519PublicKey | None) -> str:
    if not record_ok(envelope):
        return "bad"
    if trusted is None or not record_ok(envelope, trusted):
        return "other-key"
    return "ok"
