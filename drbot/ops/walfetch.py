"""Getting WAL back for recovery: one file by name from the destinations, and the spool that
feeds a restoring server.

`fetch_wal_file` is what `drbot wal fetch --policy` does for a `restore_command`: find the file
(a complete segment before a partial one, the preferred destination first), decrypt it, check
it belongs where its name says, and pad a partial segment with zeros to the segment size (the
server then replays up to the last valid record and ends recovery there).

The spool is how `drbot restore` serves WAL to a server that runs as another user and cannot
read drbot's key or policy: drbot decrypts and checks the planned files into a private
directory (`inventory.txt` lists them), each with its SHA-256, ahead of the server, and the
server's `restore_command` (`restore_command.sh` in the spool) moves each one into place after
checking its SHA-256 again. A file the inventory does not list answers "not in the archive"
at once; a file drbot could not get answers with an error that stops recovery (exit 255 makes
PostgreSQL abort rather than treat it as the end of the archive).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import structlog

from drbot.engines.postgres.wal import (
    DEFAULT_SEGMENT_SIZE,
    check_segment_bytes,
    parse_history_file_name,
    parse_segment_name,
)
from drbot.errors import DrbotError, IntegrityFailure, ObjectNotFound
from drbot.ops.walstore import KeyCache, read_wal_object
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

FAILED_SUFFIX = ".failed"


class NotInArchive(DrbotError):
    """The archive has no such WAL file (the normal end of the archive during recovery)."""

    exit_code = 1


def candidate_keys(policy: str, name: str, segment_size: int) -> list[tuple[str, bool]]:
    """Object keys that may hold WAL file `name`, best first, with whether each is partial."""
    if parse_segment_name(name, segment_size) is not None:
        return [
            (layout.wal_segment_key(policy, name), False),
            (layout.wal_segment_key(policy, name, partial=True), True),
        ]
    if parse_history_file_name(name) is not None:
        return [(layout.wal_history_key(policy, name), False)]
    raise NotInArchive(f"{name} is not a WAL segment or timeline history file name")


def fetch_wal_file(
    policy: str,
    name: str,
    storages: Sequence[Storage],
    keys: KeyCache,
    *,
    system_identifier: int = 0,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    partial_ok: bool = True,
) -> bytes:
    """The content of WAL file `name`, checked, as the server should receive it.

    With `partial_ok` false, only a complete segment counts (a streamer's `.partial` is not it).

    Destinations are tried in order; a damaged or unreachable copy falls back to the next.
    `NotInArchive` if no reachable destination has it; otherwise, when every copy failed,
    the first failure (`IntegrityFailure`, `StorageUnavailable`, `KeyProblem`).
    """
    errors: list[DrbotError] = []
    segment = parse_segment_name(name, segment_size)
    for key, partial in candidate_keys(policy, name, segment_size):
        if partial and not partial_ok:
            continue
        for storage in storages:
            try:
                data = read_wal_object(storage, key, keys)
                if segment is not None:
                    where = f"{storage.name}:{key}"
                    if len(data) > segment_size or (not partial and len(data) != segment_size):
                        raise IntegrityFailure(
                            f"{where}: {len(data)} bytes, a segment is {segment_size}"
                        )
                    check_segment_bytes(
                        data[:64], segment, system_identifier, segment_size, where=where
                    )
                    if partial:
                        data += bytes(segment_size - len(data))
                log.debug("wal.fetched", name=name, destination=storage.name, partial=partial)
                return data
            except ObjectNotFound:
                continue
            except DrbotError as exc:
                log.warning("wal.fetch_failed", name=name, destination=storage.name, error=str(exc))
                errors.append(exc)
        if errors:
            break  # a damaged complete segment must not be replaced by an older partial one
    if errors:
        raise errors[0]
    raise NotInArchive(f"WAL file {name} is not in the archive")


# -- the spool --------------------------------------------------------------------------------

INVENTORY = "inventory.txt"
READER = "restore_command.sh"

# The server's restore_command during a drbot restore. It runs as the server's OS user, which
# may be unable to run drbot itself (its interpreter or key unreadable), and once per WAL file,
# so it is a few lines of POSIX shell and coreutils: no key, no network, only files drbot has
# already decrypted and checked. Exit 1 means "not in the archive" (recovery ends normally);
# 255 makes PostgreSQL stop recovery (a file that exists but could not be served).
_READER_TEXT = """#!/bin/sh
# Written by drbot restore: serves WAL files drbot decrypted and checked. Usage: %f %p
spool=$(dirname "$0")
f="$1"; p="$2"
grep -qxF -- "$f" "$spool/inventory.txt" || exit 1
i=0
while [ ! -e "$spool/$f" ]; do
  if [ -e "$spool/$f.failed" ]; then
    echo "drbot: $f could not be fetched: $(cat "$spool/$f.failed")" >&2; exit 255
  fi
  i=$((i + 1))
  if [ "$i" -gt 72000 ]; then echo "drbot: $f did not arrive within an hour" >&2; exit 255; fi
  sleep 0.05
done
want=$(cat "$spool/$f.sha256")
got=$(sha256sum "$spool/$f" | cut -d' ' -f1)
if [ "$want" != "$got" ]; then echo "drbot: $f in the spool is damaged" >&2; exit 255; fi
cp "$spool/$f" "$p.drbot-tmp" && mv "$p.drbot-tmp" "$p" || exit 255
: > "$spool/$f.taken"
"""


def write_inventory(spool: Path, names: Sequence[str]) -> Path:
    """Declare which files the spool will serve and write the reader; returns the reader."""
    tmp = spool / f".{INVENTORY}.tmp"
    tmp.write_text("".join(f"{n}\n" for n in names))
    tmp.replace(spool / INVENTORY)
    reader = spool / READER
    reader.write_text(_READER_TEXT)
    return reader


def put_spool_file(spool: Path, name: str, data: bytes) -> None:
    """Place one checked file, with its SHA-256 beside it (written first), atomically."""
    tmp = spool / f".{name}.tmp"
    tmp.write_bytes(data)
    (spool / f"{name}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    tmp.replace(spool / name)


def fail_spool_file(spool: Path, name: str, why: str) -> None:
    (spool / f"{name}{FAILED_SUFFIX}").write_text(why.replace("\n", " ") + "\n")


def spool_pending(spool: Path, names: Sequence[str]) -> int:
    """How many of `names` are in the spool, not yet taken by the server; removes files taken
    before the last two (the server asks for the last segment again when recovery ends)."""
    taken = [i for i, n in enumerate(names) if (spool / f"{n}.taken").exists()]
    for n in names[: max(taken[-1] - 1, 0) if taken else 0]:
        for suffix in ("", ".sha256"):
            (spool / f"{n}{suffix}").unlink(missing_ok=True)
    return sum(1 for n in names if (spool / n).exists() and not (spool / f"{n}.taken").exists())
