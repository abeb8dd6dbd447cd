"""An unpacked base backup checked against PostgreSQL's `backup_manifest`, as pg_verifybackup
checks it, from the sizes and CRC-32C computed while the files were written.

pg_verifybackup reads every file back: from the page cache that costs little, but a restore
that writes past it (`directio`) would read 1.6 GiB from disk again (3.4 s against 0.4 s,
measured). The checksums are taken of exactly the bytes handed to the file system.

The rules are pg_verifybackup's (PostgreSQL 13-17, `--no-parse-wal`): the manifest's own
`Manifest-Checksum` (SHA-256 of every line before its own) matches, no path is listed twice,
every file the manifest lists exists with its size and checksum, no other file exists, and the
manifest's own entry, `pg_wal/` and the files a restore may add (`postgresql.auto.conf`,
`recovery.signal`, `standby.signal`) are left out of both. A CRC-32C is recorded as the hex of
its 4 bytes in the server's byte order (PostgreSQL copies the integer as it is): little-endian
on every platform drbot runs on. A manifest with another algorithm (SHA-224 to SHA-512, a
`pg_basebackup --manifest-checksums` other than drbot's) is not checked here: the caller runs
pg_verifybackup. Not checked either (nor by pg_verifybackup before PostgreSQL 17): that
`global/pg_control` belongs to the manifest's `System-Identifier`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

from drbot.errors import IntegrityFailure

_IGNORED = frozenset(
    {"backup_manifest", "postgresql.auto.conf", "recovery.signal", "standby.signal"}
)
_IGNORED_DIR = "pg_wal/"
_SHOWN = 5  # problems named in the error; the count says how many there were


def check_files(manifest: bytes, files: Mapping[str, tuple[int, int]], where: str) -> bool:
    """Compare `files` (name -> size, CRC-32C) with `manifest`.

    True if all match; False if the manifest uses a checksum this cannot compare (nothing was
    checked). Raises `IntegrityFailure`, naming `where` and the first files that differ, are
    missing or are extra, or if `manifest` is not a backup manifest.
    """
    _check_own_checksum(manifest, where)
    try:
        entries = json.loads(manifest)["Files"]
        listed = {_name(e): e for e in entries}
        if len(listed) != len(entries):
            raise ValueError("a path is listed twice")
        if any(e.get("Checksum-Algorithm", "NONE") not in ("CRC32C", "NONE") for e in entries):
            return False
        problems = [
            p
            for name, e in listed.items()
            if not _ignored(name) and (p := _problem(name, e, files))
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityFailure(
            f"{where}: backup_manifest is not a PostgreSQL backup manifest "
            f"({exc.__class__.__name__}: {exc})"
        ) from exc
    problems += [
        f"{n} is not in the manifest" for n in sorted(files) if n not in listed and not _ignored(n)
    ]
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise IntegrityFailure(
            f"{where}: the unpacked base backup does not match its backup_manifest: "
            + "; ".join(problems[:_SHOWN])
            + more
        )
    return True


def _check_own_checksum(manifest: bytes, where: str) -> None:
    """The last line holds the SHA-256 of everything before it (up to its newline)."""
    body_end = manifest.rfind(b"\n", 0, len(manifest) - 1) + 1
    found = re.fullmatch(rb'"Manifest-Checksum": "([0-9a-fA-F]{64})"}\n', manifest[body_end:])
    if not body_end or found is None:
        raise IntegrityFailure(f"{where}: backup_manifest has no Manifest-Checksum line at its end")
    if hashlib.sha256(manifest[:body_end]).hexdigest() != found.group(1).decode().lower():
        raise IntegrityFailure(f"{where}: backup_manifest does not match its Manifest-Checksum")


def _name(entry: dict[str, object]) -> str:
    if "Encoded-Path" in entry:  # a name that is not UTF-8, in hex
        if "Path" in entry:
            raise ValueError("an entry has both Path and Encoded-Path")
        return bytes.fromhex(str(entry["Encoded-Path"])).decode("utf-8", "surrogateescape")
    path = entry["Path"]
    if not isinstance(path, str):
        raise TypeError(f"Path {path!r} is not a string")
    return path


def _problem(name: str, entry: dict[str, object], files: Mapping[str, tuple[int, int]]) -> str:
    found = files.get(name)
    if found is None:
        return f"{name} is missing"
    size, crc = found
    if size != entry["Size"]:
        return f"{name} has {size} bytes, the manifest {entry['Size']}"
    expected = entry.get("Checksum")
    written = crc.to_bytes(4, "little").hex()
    if entry.get("Checksum-Algorithm") == "CRC32C" and (
        not isinstance(expected, str) or written != expected.lower()
    ):
        return f"{name} has CRC-32C {written}, the manifest {expected}"
    return ""


def _ignored(name: str) -> bool:
    return name in _IGNORED or name.startswith(_IGNORED_DIR)
