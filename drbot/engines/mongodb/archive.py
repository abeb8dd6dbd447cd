"""The record format of drbot's MongoDB artifacts (docs/mongodb.md, "Artifact format").

An artifact is a sequence of records. A record is one tag byte followed by one BSON document,
which carries its own length (a little-endian int32 that counts itself), so documents are
stored exactly as the server returned them and never decoded on the way through.

    H  header      {format, version, ...}: first record of every artifact
    C  collection  {db, name, type, options, indexes, ...}: documents of it follow
    D  document    a document of the last C, raw
    E  end         {db, name, count, checksum}: closes the last C
    V  event       one change event, raw, as the server returned it
    Z  trailer     {...}: last record; an artifact without it is truncated

The trailer makes truncation detectable even before the encrypted stream's own end check.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import bson
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument

from drbot.errors import IntegrityFailure

HEADER, COLLECTION, DOCUMENT, END, EVENT, TRAILER = b"H", b"C", b"D", b"E", b"V", b"Z"
_TAGS = frozenset((HEADER, COLLECTION, DOCUMENT, END, EVENT, TRAILER))
DUMP_FORMAT = "drbot-mongo-dump"
CHANGES_FORMAT = "drbot-mongo-changes"
VERSION = 1

# Exact round trips: datetimes outside Python's range stay BSON datetimes, UUIDs stay Binary.
EXACT: CodecOptions[dict[str, Any]] = CodecOptions(
    document_class=dict, datetime_conversion=DatetimeConversion.DATETIME_MS, tz_aware=True
)
RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)


def record(tag: bytes, doc: Mapping[str, Any] | bytes) -> bytes:
    """One record: `doc` given as raw BSON bytes is stored as it is."""
    raw = doc if isinstance(doc, bytes) else bson.encode(doc, codec_options=EXACT)
    return tag + raw


def read_records(chunks: Iterable[bytes], *, artifact: str = "") -> Iterator[tuple[bytes, bytes]]:
    """(tag, raw BSON) for every record of an artifact given in arbitrary pieces.

    Raises `IntegrityFailure` for an unknown tag, a bad length, or data that ends inside a
    record or without a trailer record.
    """
    buf = bytearray()
    pos = 0
    seen_trailer = False
    for chunk in chunks:
        buf += chunk
        while True:
            if len(buf) - pos < 5:
                break
            tag = bytes(buf[pos : pos + 1])
            if tag not in _TAGS:
                raise IntegrityFailure(f"{artifact}: unknown record tag {tag!r} at byte {pos}")
            size = int.from_bytes(buf[pos + 1 : pos + 5], "little")
            if size < 5:
                raise IntegrityFailure(f"{artifact}: bad BSON length {size} at byte {pos}")
            if len(buf) - pos < 1 + size:
                break
            if seen_trailer:
                raise IntegrityFailure(f"{artifact}: records after the trailer")
            raw = bytes(buf[pos + 1 : pos + 1 + size])
            pos += 1 + size
            seen_trailer = tag == TRAILER
            yield tag, raw
        if pos > (1 << 20):
            del buf[:pos]
            pos = 0
    if len(buf) > pos:
        raise IntegrityFailure(f"{artifact}: data ends inside a record (truncated)")
    if not seen_trailer:
        raise IntegrityFailure(f"{artifact}: no trailer record (truncated)")


def decode(raw: bytes) -> dict[str, Any]:
    """A record's document, decoded exactly (see EXACT)."""
    return bson.decode(raw, codec_options=EXACT)


def token_text(token: Mapping[str, Any] | None) -> str:
    """A resume token as canonical Extended JSON text ('' for none), for manifests and checks."""
    if token is None:
        return ""
    return json_util.dumps(
        dict(token), sort_keys=True, json_options=json_util.CANONICAL_JSON_OPTIONS
    )


def token_parse(text: str) -> dict[str, Any] | None:
    """The resume token written by `token_text`."""
    if not text:
        return None
    value = json_util.loads(text, json_options=json_util.CANONICAL_JSON_OPTIONS)
    if not isinstance(value, dict):
        raise ValueError("a resume token is a document")
    return value
