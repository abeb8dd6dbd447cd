"""What a physical base backup holds: read from pg_basebackup's tar stream as it passes.

pg_basebackup writes one ustar archive of the data directory to stdout (`-D - -Ft`), with the
WAL the backup needs (`-X fetch`) and, last, PostgreSQL's own `backup_manifest`: every file with
its size and CRC32C, and the WAL range (timeline, start and end LSN) a restore must replay.
drbot keeps that manifest's facts in its own manifest, so it knows the backup's positions
without unpacking anything, and a restore can check every file against it (`backupmanifest`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from drbot.engines.postgres.wal import format_lsn, parse_lsn
from drbot.errors import DatabaseError

_BLOCK = 512
_KEEP = frozenset({"backup_label", "backup_manifest", "tablespace_map"})
_KEEP_LIMIT = 256 * 1024 * 1024


def tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # base-256, used for sizes of 8 GiB and more
        value = field[0] & 0x7F
        for b in field[1:]:
            value = (value << 8) | b
        return value
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


@dataclass(frozen=True, slots=True)
class TarHeader:
    """The fields drbot reads from one ustar header block (the scanner at backup, the
    extractor at restore; only the extractor insists on `ustar` and `checksum_ok`)."""

    name: bytes  # the ustar prefix and name, joined with "/"
    kind: bytes  # the type flag: b"0" or b"\0" a file, b"5" a directory, b"2" a symlink, ...
    mode: int
    size: int
    mtime: int
    ustar: bool  # the block carries ustar's magic
    checksum_ok: bool

    @property
    def padded_size(self) -> int:
        """The member's content with its padding to whole blocks."""
        return -(-self.size // _BLOCK) * _BLOCK


def read_header(block: bytes) -> TarHeader:
    """Parse one 512-byte header block (not the all-zero end-of-archive block)."""
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    # The checksum counts its own 8 bytes as spaces.
    stored = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return TarHeader(
        name=prefix + b"/" + name if prefix else name,
        kind=block[156:157],
        mode=tar_number(block[100:108]),
        size=tar_number(block[124:136]),
        mtime=tar_number(block[136:148]),
        ustar=block[257:262] == b"ustar",
        checksum_ok=tar_number(block[148:156]) == stored,
    )


@dataclass(frozen=True)
class BaseBackupInfo:
    """The positions and the data fingerprint of one base backup."""

    system_identifier: int
    segment_size: int
    timeline: int
    start_lsn: int
    stop_lsn: int
    files: int
    data_bytes: int
    backup_manifest_sha256: str

    def to_json(self) -> dict[str, str | int]:
        return {
            "system_identifier": str(self.system_identifier),
            "segment_size": self.segment_size,
            "timeline": self.timeline,
            "start_lsn": format_lsn(self.start_lsn),
            "stop_lsn": format_lsn(self.stop_lsn),
            "files": self.files,
            "data_bytes": self.data_bytes,
            "backup_manifest_sha256": self.backup_manifest_sha256,
        }


class TarScanner:
    """Follows a tar stream chunk by chunk, keeping the few small files drbot reads."""

    def __init__(self, system_identifier: int = 0, segment_size: int = 0) -> None:
        self.system_identifier = system_identifier
        self.segment_size = segment_size
        self._buf = bytearray()
        self._skip = 0  # content bytes (with padding) of the current member still to pass
        self._keep_name: str | None = None
        self._keep_size = 0
        self._kept = bytearray()
        self.files: dict[str, bytes] = {}
        self.members = 0
        self.data_bytes = 0
        self.symlinks: list[str] = []
        self.ended = False

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                take = min(self._skip, len(view))
                if self._keep_name is not None:
                    room = self._keep_size - len(self._kept)
                    self._kept += view[: min(take, max(room, 0))]
                self._skip -= take
                view = view[take:]
                if not self._skip and self._keep_name is not None:
                    self.files[self._keep_name] = bytes(self._kept)
                    self._keep_name = None
                continue
            need = _BLOCK - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == _BLOCK:
                self._header(bytes(self._buf))
                self._buf.clear()

    def _header(self, block: bytes) -> None:
        if self.ended or block == bytes(_BLOCK):
            self.ended = True
            return
        header = read_header(block)
        full = header.name.decode(errors="replace")
        size = header.size
        self.members += 1
        if header.kind == b"2":
            self.symlinks.append(full)
        if header.kind in (b"0", b"\0"):
            self.data_bytes += size
        self._skip = header.padded_size
        if full in _KEEP and size <= _KEEP_LIMIT:
            self._keep_name, self._keep_size = full, size
            self._kept = bytearray()
            if size == 0:
                self.files[full] = b""
                self._keep_name = None

    def info(self, where: str) -> BaseBackupInfo:
        """The backup's facts; `DatabaseError` if the stream lacked what every base backup has."""
        manifest = self.files.get("backup_manifest")
        if manifest is None or not self.ended:
            raise DatabaseError(
                f"{where}: the base backup stream ended without its backup_manifest"
            )
        try:
            doc = json.loads(manifest)
            ranges = doc["WAL-Ranges"]
            last = ranges[-1]
            info = BaseBackupInfo(
                system_identifier=self.system_identifier,
                segment_size=self.segment_size,
                timeline=int(last["Timeline"]),
                start_lsn=parse_lsn(str(ranges[0]["Start-LSN"])),
                stop_lsn=parse_lsn(str(last["End-LSN"])),
                files=len(doc.get("Files", [])),
                data_bytes=self.data_bytes,
                backup_manifest_sha256=hashlib.sha256(manifest).hexdigest(),
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise DatabaseError(f"{where}: unreadable backup_manifest ({exc!r})") from None
        return info
