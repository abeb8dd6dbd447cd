"""The manifest: the authenticated JSON record that makes a backup exist.

A manifest is written last, per destination, once every artifact in that destination has been
read back and checked. It names every artifact with its object key, size and SHA-256, carries the
data key wrapped for that destination, and is authenticated with HMAC-SHA256 under a key derived
from the backup's data key (HKDF, info "drbot manifest v1"). Only a holder of the policy key can
unwrap that data key, so only they can produce a manifest that authenticates. See docs/design.md.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drbot.engines.base import Fingerprint
from drbot.errors import IntegrityFailure
from drbot.pipeline.keys import WrappedKey

FORMAT = "drbot-manifest"
VERSION = 1


@dataclass(frozen=True)
class ArtifactRecord:
    """One stored artifact of a backup, as the manifest records it for one destination."""

    name: str
    kind: str
    key: str
    size_bytes: int
    sha256: str
    plaintext_bytes: int
    database: str | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything needed to find, check and restore one backup from one destination."""

    policy: str
    backup_id: str
    type: str
    mode: str
    engine: str
    source_version: str
    started_at: datetime
    completed_at: datetime
    destination: str
    wrapped_key: WrappedKey
    compression: dict[str, Any]
    encryption: dict[str, Any]
    artifacts: tuple[ArtifactRecord, ...]
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    databases: tuple[str, ...] = ()
    positions: dict[str, Any] = field(default_factory=dict)
    """Physical backups: system_identifier, segment_size, timeline, start_lsn, stop_lsn..."""
    drbot_version: str = ""
    host: str = ""

    @property
    def key_id(self) -> str:
        return self.wrapped_key.key_id

    @property
    def size_bytes(self) -> int:
        return sum(a.size_bytes for a in self.artifacts)

    def artifact(self, name: str) -> ArtifactRecord:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise KeyError(name)


def _mac_key(data_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"drbot manifest v1").derive(
        data_key
    )


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _fingerprint_key(data_key: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"drbot manifest v1 fingerprints"
    ).derive(data_key)


def _seal_fingerprints(fingerprints: dict[str, Fingerprint], data_key: bytes) -> dict[str, str]:
    """Table and column names are schema: encrypted like the data, not left readable."""
    plain = _canonical({db: fp.to_json() for db, fp in sorted(fingerprints.items())})
    nonce = os.urandom(12)
    sealed = AESGCM(_fingerprint_key(data_key)).encrypt(nonce, plain, b"drbot fingerprints")
    return {
        "alg": "AES-256-GCM",
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(sealed).decode(),
    }


def _open_fingerprints(
    sealed: dict[str, Any], data_key: bytes, where: str
) -> dict[str, Fingerprint]:
    try:
        plain = AESGCM(_fingerprint_key(data_key)).decrypt(
            base64.b64decode(sealed["nonce"]),
            base64.b64decode(sealed["ciphertext"]),
            b"drbot fingerprints",
        )
        data = json.loads(plain)
        return {db: Fingerprint.from_json(fp) for db, fp in data.items()}
    except (InvalidTag, ValueError, KeyError, TypeError) as exc:
        raise IntegrityFailure(
            f"{where}: the manifest's fingerprints do not open ({exc!r})"
        ) from None


def _body(m: Manifest, data_key: bytes) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "policy": m.policy,
        "backup_id": m.backup_id,
        "type": m.type,
        "mode": m.mode,
        "engine": m.engine,
        "source_version": m.source_version,
        "databases": list(m.databases),
        "started_at": m.started_at.isoformat(),
        "completed_at": m.completed_at.isoformat(),
        "destination": m.destination,
        "key": {
            "key_id": m.wrapped_key.key_id,
            "wrapped_data_key": base64.b64encode(m.wrapped_key.blob).decode(),
        },
        "compression": m.compression,
        "encryption": m.encryption,
        "artifacts": [
            {
                "name": a.name,
                "kind": a.kind,
                "database": a.database,
                "key": a.key,
                "size_bytes": a.size_bytes,
                "sha256": a.sha256,
                "plaintext_bytes": a.plaintext_bytes,
            }
            for a in m.artifacts
        ],
        "fingerprints_sealed": _seal_fingerprints(m.fingerprints, data_key),
        "positions": m.positions,
        "drbot_version": m.drbot_version,
        "host": m.host,
    }


def encode_manifest(m: Manifest, data_key: bytes) -> bytes:
    """The manifest as stored: readable JSON with an HMAC over its canonical form."""
    body = _body(m, data_key)
    mac = hmac.new(_mac_key(data_key), _canonical(body), hashlib.sha256).hexdigest()
    return (
        json.dumps({**body, "mac": {"alg": "HMAC-SHA256", "value": mac}}, indent=2) + "\n"
    ).encode()


def _parse(body: dict[str, Any]) -> Manifest:
    key = body["key"]
    return Manifest(
        policy=str(body["policy"]),
        backup_id=str(body["backup_id"]),
        type=str(body["type"]),
        mode=str(body["mode"]),
        engine=str(body["engine"]),
        source_version=str(body["source_version"]),
        databases=tuple(str(d) for d in body.get("databases", [])),
        started_at=datetime.fromisoformat(body["started_at"]),
        completed_at=datetime.fromisoformat(body["completed_at"]),
        destination=str(body["destination"]),
        wrapped_key=WrappedKey(str(key["key_id"]), base64.b64decode(key["wrapped_data_key"])),
        compression=dict(body["compression"]),
        encryption=dict(body["encryption"]),
        artifacts=tuple(
            ArtifactRecord(
                name=str(a["name"]),
                kind=str(a["kind"]),
                database=a.get("database"),
                key=str(a["key"]),
                size_bytes=int(a["size_bytes"]),
                sha256=str(a["sha256"]),
                plaintext_bytes=int(a["plaintext_bytes"]),
            )
            for a in body["artifacts"]
        ),
        positions=dict(body.get("positions") or {}),
        fingerprints={},  # sealed: filled in by authenticate_manifest once the key is known
        drbot_version=str(body.get("drbot_version", "")),
        host=str(body.get("host", "")),
    )


def read_manifest_unverified(raw: bytes, *, where: str) -> tuple[Manifest, dict[str, Any], str]:
    """Parse a stored manifest without checking its MAC (to learn which key opens it).

    Returns the manifest, its body and the stored MAC. `IntegrityFailure` if it is not a drbot
    manifest of a known version; `where` names the object in messages.
    """
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IntegrityFailure(f"{where}: not a drbot manifest")
        if doc.get("version") != VERSION:
            raise IntegrityFailure(f"{where}: unknown manifest version {doc.get('version')!r}")
        mac = doc.pop("mac")
        if not isinstance(mac, dict) or mac.get("alg") != "HMAC-SHA256":
            raise IntegrityFailure(f"{where}: manifest has no HMAC-SHA256 authentication")
        return _parse(doc), doc, str(mac["value"])
    except IntegrityFailure:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityFailure(
            f"{where}: malformed manifest ({exc.__class__.__name__}: {exc})"
        ) from exc


def authenticate_manifest(
    raw: bytes, unwrap: Callable[[WrappedKey], bytes], *, where: str
) -> tuple[Manifest, bytes]:
    """Parse and authenticate a stored manifest; returns it with the unwrapped data key.

    `unwrap` raises `KeyProblem` when the policy key cannot open the data key (wrong key);
    a MAC that does not match raises `IntegrityFailure` naming `where`.
    """
    manifest, body, mac = read_manifest_unverified(raw, where=where)
    data_key = unwrap(manifest.wrapped_key)
    expected = hmac.new(_mac_key(data_key), _canonical(body), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, mac):
        raise IntegrityFailure(f"{where}: manifest authentication failed (edited or corrupt)")
    fingerprints = _open_fingerprints(body["fingerprints_sealed"], data_key, where)
    return dataclasses.replace(manifest, fingerprints=fingerprints), data_key
