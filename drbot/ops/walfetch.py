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
    Segment,
    check_segment_bytes,
    parse_history_file_name,
    parse_segment_name,
)
from drbot.errors import DrbotError, IntegrityFailure, ObjectNotFound, StorageUnavailable
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

    A complete segment comes from the first destination whose copy checks out (a damaged or
    unreachable copy falls back to the next). Only if no destination has the complete segment
    is a partial one used (`partial_ok`): the longest copy that checks out, since destinations
    can hold partials of different ages. A damaged complete segment is never replaced by a
    partial. `NotInArchive` if every destination that answered lacks the file (unreachable
    ones are logged); otherwise the first failure (`IntegrityFailure`, `StorageUnavailable`,
    `KeyProblem`).
    """
    segment = parse_segment_name(name, segment_size)
    fetch = _Fetch(name, segment, system_identifier, segment_size, keys)
    candidates = candidate_keys(policy, name, segment_size)
    key, _ = candidates[0]
    for storage in storages:
        found = fetch.one(storage, key, partial=False)
        if found is not None:
            return found
    if fetch.damaged:
        raise fetch.damaged[0]  # never fall back from a damaged complete segment to a partial
    if partial_ok and len(candidates) > 1:
        key, _ = candidates[1]
        copies = [c for s in storages if (c := fetch.one(s, key, partial=True)) is not None]
        if copies:
            best = max(copies, key=len)
            return best + bytes(segment_size - len(best))
    if fetch.damaged:
        raise fetch.damaged[0]
    if fetch.unreachable and fetch.unreachable == fetch.lookups:
        raise fetch.errors[0]  # nobody answered: unknown, not "not archived"
    if fetch.unreachable:
        log.warning("wal.fetch_partly_unreachable", name=name, unreachable=fetch.unreachable)
    raise NotInArchive(f"WAL file {name} is not in the archive")


class _Fetch:
    """One file's lookups: reads and checks copies, and keeps what went wrong where."""

    def __init__(
        self,
        name: str,
        segment: Segment | None,
        system_identifier: int,
        segment_size: int,
        keys: KeyCache,
    ) -> None:
        self.name = name
        self.segment = segment
        self.system_identifier = system_identifier
        self.segment_size = segment_size
        self.keys = keys
        self.errors: list[DrbotError] = []
        self.damaged: list[DrbotError] = []
        self.unreachable = 0
        self.lookups = 0

    def one(self, storage: Storage, key: str, *, partial: bool) -> bytes | None:
        where = f"{storage.name}:{key}"
        self.lookups += 1
        try:
            data = read_wal_object(storage, key, self.keys)
            if self.segment is not None:
                size = self.segment_size
                if len(data) > size or (not partial and len(data) != size):
                    raise IntegrityFailure(f"{where}: {len(data)} bytes, a segment is {size}")
                check_segment_bytes(
                    data[:64], self.segment, self.system_identifier, size, where=where
                )
        except ObjectNotFound:
            return None
        except DrbotError as exc:
            log.warning(
                "wal.fetch_failed", name=self.name, destination=storage.name, error=str(exc)
            )
            self.errors.append(exc)
            if isinstance(exc, StorageUnavailable):
                self.unreachable += 1
            else:
                self.damaged.append(exc)
            return None
        log.debug("wal.fetched", name=self.name, destination=storage.name, partial=partial)
        return data


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


class SpoolProgress:
    """How far the server has taken the spooled segments, which it does in order.

    Tracked from where it was last seen, so a poll costs a stat or two, not one per segment.
    Files taken before the last two are removed (the server asks for the last segment again
    when recovery ends).
    """

    def __init__(self, spool: Path, names: Sequence[str]) -> None:
        self._spool = spool
        self._names = names
        self._taken = 0

    def pending(self, *, placed: int) -> int:
        """Of the first `placed` segments (all in the spool), how many the server has not taken."""
        while self._taken < placed and (self._spool / f"{self._names[self._taken]}.taken").exists():
            if self._taken >= 2:
                old = self._names[self._taken - 2]
                for suffix in ("", ".sha256"):
                    (self._spool / f"{old}{suffix}").unlink(missing_ok=True)
            self._taken += 1
        return placed - self._taken
