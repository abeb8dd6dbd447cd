"""Per-collection fingerprints over canonical BSON (docs/mongodb.md, "Fingerprint").

`dbHash` is not available on every server (managed services, compatible servers), so drbot
computes its own: the document count and the sum, modulo 2^128, of the first 16 bytes of the
SHA-256 of each document's canonical BSON. Canonical means every embedded document's fields
sorted by name (arrays keep their order; values keep their exact BSON types), so the checksum
does not depend on the order documents are read in, nor on the order an update left fields in.
"""

from __future__ import annotations

import hashlib
from typing import Any

import bson

from drbot.engines.base import TableFingerprint
from drbot.engines.mongodb.archive import EXACT

_MASK = (1 << 128) - 1


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def canonical_bson(raw: bytes) -> bytes:
    """`raw` (one BSON document) re-encoded with the fields of every embedded document sorted."""
    return bson.encode(_canonical(bson.decode(raw, codec_options=EXACT)), codec_options=EXACT)


class CollectionSummer:
    """Count and order-independent checksum of one collection's documents, fed one by one."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0

    def add(self, raw: bytes) -> None:
        digest = hashlib.sha256(canonical_bson(raw)).digest()
        self.total = (self.total + int.from_bytes(digest[:16], "big")) & _MASK
        self.count += 1

    @property
    def checksum(self) -> str:
        return f"{self.total:032x}"

    def result(self) -> TableFingerprint:
        return TableFingerprint(rows=self.count, checksum=self.checksum)
