"""Object keys: the one place they are built and parsed.

Layout inside a destination (relative to its URL's prefix):

    <policy>/backups/<backup_id>/manifest.json
    <policy>/backups/<backup_id>/<artifact name>.zst.enc

A backup id is `YYYYMMDDTHHMMSSZ-<6 hex>`: UTC start time plus randomness, so ids sort by time
and two backups started in the same second never collide.

Artifact names come from the source (a database may be called `my db` or `café`), so each
'/'-separated part of a name is percent-encoded in the key: every byte outside
`A-Z a-z 0-9 _ - .` becomes `%XX` (UTF-8, upper-case hex), as does a leading `.`. Names made of
those characters (`globals.sql`, `db/shop.pgdump`) appear unchanged.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote

MANIFEST_NAME = "manifest.json"
ARTIFACT_SUFFIX = ".zst.enc"
_ID_RE = re.compile(r"(\d{8}T\d{6}Z)-([0-9a-f]{6})")
_SAFE = frozenset(string.ascii_letters + string.digits + "_-.")


def new_backup_id(at: datetime) -> str:
    """A fresh sortable backup id for a backup started at `at` (UTC)."""
    return f"{at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def backup_id_time(backup_id: str) -> datetime:
    """The UTC start time encoded in a backup id; ValueError if it is not one."""
    m = _ID_RE.fullmatch(backup_id)
    if not m:
        raise ValueError(f"not a backup id: {backup_id!r}")
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def is_backup_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))


def backups_prefix(policy: str) -> str:
    return f"{policy}/backups/"


def backup_prefix(policy: str, backup_id: str) -> str:
    return f"{policy}/backups/{backup_id}/"


def manifest_key(policy: str, backup_id: str) -> str:
    return f"{backup_prefix(policy, backup_id)}{MANIFEST_NAME}"


def _encode_part(part: str) -> str:
    encoded = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in part)
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def artifact_key(policy: str, backup_id: str, artifact_name: str) -> str:
    """The key of an artifact; ValueError for an empty name or an empty '/'-part."""
    parts = artifact_name.split("/")
    if not all(parts):
        raise ValueError(f"bad artifact name: {artifact_name!r}")
    encoded = "/".join(_encode_part(p) for p in parts)
    return f"{backup_prefix(policy, backup_id)}{encoded}{ARTIFACT_SUFFIX}"


@dataclass(frozen=True)
class ParsedKey:
    """What an object key under a policy's backups prefix is."""

    backup_id: str
    is_manifest: bool
    artifact_name: str | None


def parse_key(policy: str, key: str) -> ParsedKey | None:
    """Classify `key`; None if it is not drbot's (foreign objects are left alone)."""
    prefix = backups_prefix(policy)
    if not key.startswith(prefix):
        return None
    backup_id, _, rest = key[len(prefix) :].partition("/")
    if not is_backup_id(backup_id) or not rest:
        return None
    if rest == MANIFEST_NAME:
        return ParsedKey(backup_id, True, None)
    if rest.endswith(ARTIFACT_SUFFIX):
        return ParsedKey(backup_id, False, unquote(rest[: -len(ARTIFACT_SUFFIX)]))
    return None


# -- the audit trail in a destination ------------------------------------------------------
#
#   audit/<trail id>/segments/<start offset>-<end offset>.jsonl   bytes [start, end) of trail.jsonl
#   audit/<trail id>/anchors/<seq>.json                            a signed chain head
#
# The trail id is the first 16 hex digits of the audit public key, so trails of several hosts
# can share a destination. Offsets and sequence numbers are zero-padded so keys sort in order.

AUDIT_PREFIX = "audit/"


def audit_prefix(trail_id: str) -> str:
    return f"{AUDIT_PREFIX}{trail_id}/"


def audit_segment_key(trail_id: str, start: int, end: int) -> str:
    return f"{audit_prefix(trail_id)}segments/{start:016d}-{end:016d}.jsonl"


def parse_audit_segment_key(trail_id: str, key: str) -> tuple[int, int] | None:
    """(start, end) byte offsets of a segment key; None if `key` is not one."""
    m = re.fullmatch(re.escape(audit_prefix(trail_id)) + r"segments/(\d{16})-(\d{16})\.jsonl", key)
    return (int(m.group(1)), int(m.group(2))) if m else None


def audit_anchor_key(trail_id: str, seq: int) -> str:
    return f"{audit_prefix(trail_id)}anchors/{seq:012d}.json"


def parse_audit_anchor_key(trail_id: str, key: str) -> int | None:
    """The sequence number an anchor key names; None if `key` is not an anchor key."""
    m = re.fullmatch(re.escape(audit_prefix(trail_id)) + r"anchors/(\d{12})\.json", key)
    return int(m.group(1)) if m else None


# -- WAL (continuous archiving) -------------------------------------------------------------
#
#   <policy>/wal/<TLI>/<segment>.zst.enc           a complete segment
#   <policy>/wal/<TLI>/<segment>.partial.zst.enc   the unfinished segment, as far as it was shipped
#   <policy>/wal/history/<TLI>.history.zst.enc     a timeline history file
#   <policy>/wal/heartbeat.zst.enc                  {"time", "timeline", "lsn"}: all WAL up to
#                                                   lsn was archived and the streamer was caught up
#
# Segment and history names are PostgreSQL's own (24 / 8 upper-case hex digits), so a key's
# name part is exactly the file name PostgreSQL asks `restore_command` for.

_WAL_SEGMENT_RE = re.compile(r"([0-9A-F]{8})/([0-9A-F]{24})(\.partial)?\.zst\.enc")
_WAL_HISTORY_RE = re.compile(r"history/([0-9A-F]{8}\.history)\.zst\.enc")


def wal_prefix(policy: str) -> str:
    return f"{policy}/wal/"


def wal_segment_key(policy: str, segment_name: str, *, partial: bool = False) -> str:
    suffix = ".partial" if partial else ""
    return f"{wal_prefix(policy)}{segment_name[:8]}/{segment_name}{suffix}{ARTIFACT_SUFFIX}"


WAL_HEARTBEAT = "heartbeat"


def wal_heartbeat_key(policy: str) -> str:
    """The streamer's note that the archive was current at a time (see docs/postgres-physical)."""
    return f"{wal_prefix(policy)}{WAL_HEARTBEAT}{ARTIFACT_SUFFIX}"


def wal_history_key(policy: str, history_name: str) -> str:
    return f"{wal_prefix(policy)}history/{history_name}{ARTIFACT_SUFFIX}"


@dataclass(frozen=True)
class WalKey:
    """What an object under a policy's WAL prefix is: a 'segment', 'partial' or 'history'."""

    kind: str
    name: str


def parse_wal_key(policy: str, key: str) -> WalKey | None:
    """Classify `key`; None if it is not one of drbot's WAL objects."""
    prefix = wal_prefix(policy)
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if rest == f"{WAL_HEARTBEAT}{ARTIFACT_SUFFIX}":
        return WalKey("heartbeat", WAL_HEARTBEAT)
    m = _WAL_SEGMENT_RE.fullmatch(rest)
    if m and m.group(2).startswith(m.group(1)):
        return WalKey("partial" if m.group(3) else "segment", m.group(2))
    h = _WAL_HISTORY_RE.fullmatch(rest)
    return WalKey("history", h.group(1)) if h else None


# -- drill records ---------------------------------------------------------------------------
#
#   <policy>/drills/<drill id>.json   one signed drill record (see docs/drills.md)
#
# A drill id has the form of a backup id (UTC start time plus randomness), so records sort by time.


def drills_prefix(policy: str) -> str:
    return f"{policy}/drills/"


def drill_record_key(policy: str, drill_id: str) -> str:
    return f"{drills_prefix(policy)}{drill_id}.json"


def parse_drill_record_key(policy: str, key: str) -> str | None:
    """The drill id a record key names; None if `key` is not one."""
    m = re.fullmatch(re.escape(drills_prefix(policy)) + r"(\d{8}T\d{6}Z-[0-9a-f]{6})\.json", key)
    return m.group(1) if m else None


# -- key rotation ------------------------------------------------------------------------------
#
#   keys/rewrapped/<digest>.json   a data key that a WAL object's header wraps under an old key,
#                                  wrapped again under the new one (see docs/keys.md, "Rotation")
#
# The digest is SHA-256 (hex) of key_id, a zero byte, and the old wrapped blob: the same for every
# object whose header carries that wrapped key, so one entry serves a streamer's whole session.

REWRAP_PREFIX = "keys/rewrapped/"


def rewrap_key(key_id: str, blob: bytes) -> str:
    import hashlib

    digest = hashlib.sha256(key_id.encode() + b"\0" + blob).hexdigest()
    return f"{REWRAP_PREFIX}{digest}.json"


# -- lease -------------------------------------------------------------------------------------
#
#   <policy>/lease.json   which daemon acts on the policy now (docs/design.md, "Lease"); kept in
#                         the policy's first destination and written only with conditional writes


def lease_key(policy: str) -> str:
    return f"{policy}/lease.json"


# -- MongoDB change-stream slices ------------------------------------------------------------
#
#   <policy>/changes/<start>-<end>.zst.enc   one slice of change events (docs/mongodb.md)
#   <policy>/changes/heartbeat.zst.enc        {"time", "end"}: at time, the slices ending at
#                                             end held every change the server had
#
# start and end are 16 lower-case hex digits: the cluster time (seconds << 32 | increment) of
# the point the slice resumes after and of its last event. Keys sort by time, and consecutive
# slices of one unbroken history chain: the next one's start is the previous one's end.

_CHANGES_RE = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16})\.zst\.enc")


def changes_prefix(policy: str) -> str:
    return f"{policy}/changes/"


CHANGES_HEARTBEAT = "heartbeat"


def changes_heartbeat_key(policy: str) -> str:
    """The streamer's note that the stored slices were current at a time (docs/mongodb.md)."""
    return f"{changes_prefix(policy)}{CHANGES_HEARTBEAT}{ARTIFACT_SUFFIX}"


def changes_slice_key(policy: str, start: int, end: int) -> str:
    return f"{changes_prefix(policy)}{start:016x}-{end:016x}{ARTIFACT_SUFFIX}"


def parse_changes_slice_key(policy: str, key: str) -> tuple[int, int] | None:
    """(start, end) of a slice key; None if `key` is not one."""
    prefix = changes_prefix(policy)
    if not key.startswith(prefix):
        return None
    m = _CHANGES_RE.fullmatch(key[len(prefix) :])
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None
