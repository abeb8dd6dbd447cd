"""Re-wrapped data keys for WAL objects: how rotation reaches objects it must not rewrite.

A WAL object's header carries its data key wrapped under the key of the day it was written
(a streamer wraps one data key for its whole session). Rotation leaves the object alone and
stores, once per such wrapped key, the same data key wrapped under the new key
(`keys/rewrapped/<digest>.json`, layout.py). A reader that cannot unwrap a header's key looks
for that entry. An entry needs no authentication of its own: a wrong data key fails the
object's header tag, which only the right data key produces.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from drbot.errors import IntegrityFailure, ObjectNotFound
from drbot.pipeline.keys import WrappedKey
from drbot.storage import layout
from drbot.storage.base import Storage

FORMAT = "drbot-rewrap/1"


def encode_entry(old: WrappedKey, new: WrappedKey) -> bytes:
    body: dict[str, Any] = {
        "format": FORMAT,
        "from": {"key_id": old.key_id, "blob_sha256": hashlib.sha256(old.blob).hexdigest()},
        "to": {"key_id": new.key_id, "blob": base64.b64encode(new.blob).decode()},
    }
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def decode_entry(raw: bytes, old: WrappedKey, where: str) -> WrappedKey:
    """The new wrapping in an entry; IntegrityFailure if it is not the entry for `old`."""
    try:
        body = json.loads(raw)
        frm, to = body["from"], body["to"]
        if body.get("format") != FORMAT or frm["key_id"] != old.key_id:
            raise ValueError("not an entry for this wrapped key")
        if frm["blob_sha256"] != hashlib.sha256(old.blob).hexdigest():
            raise ValueError("not an entry for this wrapped key")
        return WrappedKey(str(to["key_id"]), base64.b64decode(to["blob"], validate=True))
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityFailure(f"{where}: damaged re-wrapped key entry ({exc})") from None


def read_entry(storage: Storage, old: WrappedKey) -> WrappedKey | None:
    """The re-wrapping of `old` stored in `storage`, or None if rotation made none there.

    Raises `StorageUnavailable`, and `IntegrityFailure` for a damaged entry.
    """
    key = layout.rewrap_key(old.key_id, old.blob)
    try:
        raw = b"".join(storage.open(key))
    except ObjectNotFound:
        return None
    return decode_entry(raw, old, f"{storage.name}:{key}")


def write_entry(storage: Storage, old: WrappedKey, new: WrappedKey) -> None:
    storage.put(layout.rewrap_key(old.key_id, old.blob), [encode_entry(old, new)])
