"""Fingerprints of table data, read from a pg_dump custom-format archive as it streams past.

The backup fingerprints each table without a second read of the database: the archive that
pg_dump writes (`--format=custom --compress=0`, to a pipe) already holds every row in COPY
text form. This module follows that format far enough to find each TABLE DATA entry's rows:

    header  "PGDMP", u8 major, u8 minor, u8 rev, u8 int_size, u8 off_size, u8 format,
            compression (archive >= 1.15: u8 algorithm; before: int level),
            7 ints (creation time), str dbname, str server version, str pg_dump version
    toc     int count, then per entry: int dump_id, int had_dumper, str tableoid, str oid,
            str tag, str desc, int section, str defn, str drop, str copy_stmt, str namespace,
            str tablespace, str tableam (>= 1.14), int relkind (>= 1.16), str owner,
            str with_oids, str* dependencies (ended by a null str), offset (u8 flag + off_size)
    data    per entry with data: u8 block type (1 table data, 3 large objects), int dump_id,
            then chunks (int length + bytes; length 0 ends the block); large object blocks
            repeat (int oid, chunks) until an oid of 0.

An int is a sign byte then `int_size` bytes, least significant first; a str is an int length
(-1 for null) then that many bytes. This is pg_backup_archiver.c / pg_backup_custom.c, stable
for archive versions 1.12 to 1.16 (pg_dump 11 to 17).

pg_dump writes one chunk per row (each COPY data message the server sends), so most of the
work is per row. The common case goes through C. Where drbot's extension `_rowsum` is built
(setup.py), it walks the one-row chunks and sums their hashes itself, without the GIL: about
0.1 microsecond a row, against 0.5 for the best Python could do. Without it, one `re.split` of
a buffer at the row ends (newline, sign byte 0, four length bytes) gives the rows and their
chunks' lengths, and the lengths are checked against the rows before any row is counted.
Whatever fits neither (the terminator, a chunk that is not one whole row, a row longer than a
buffer) takes the byte-exact walk, so the result never depends on which path read a row.

The fingerprint of a table is its row count and the sum, modulo 2**128, of a 128-bit hash of
every COPY text line (without its newline): order-independent, so a restored table that
returns its rows in another order still matches. The hash is XXH3-128 (`XXH3_128`); backups
made before 2026-12-02 used the first 16 bytes of SHA-256 (`SHA256_128`), which hashed about a
million rows a second in Python against five with XXH3. A restored database is checked by
reading pg_dump's output of it through this same module (or, when its server is newer than
the local pg_dump, `COPY ... TO STDOUT` through `LineSummer`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add, itemgetter, methodcaller, ne
from typing import ClassVar, Literal

import structlog
import xxhash

from drbot.engines.base import Fingerprint, TableFingerprint

_SumRows = Callable[[bytes | bytearray, int, int], tuple[int, int, int, int, int]]
try:
    from drbot.engines.postgres import _rowsum
except ImportError:  # built without a C compiler or xxhash.h (setup.py): rows split in Python
    _SUM_ROWS: _SumRows | None = None
    _NEED_MORE = _NOT_A_ROW = -1
else:
    _SUM_ROWS = _rowsum.sum_rows
    _NEED_MORE, _NOT_A_ROW = _rowsum.NEED_MORE, _rowsum.NOT_A_ROW

log = structlog.get_logger(__name__)

_MASK = (1 << 128) - 1
_BLK_DATA = 1
_BLK_BLOBS = 3
_MIN_VERSION = (1, 12)
_MAX_VERSION = (1, 16)
_CHUNK_HEAD = 5  # sign byte and four length bytes (int_size 4, as every pg_dump writes)
_NEWLINE = 0x0A
_TERMINATOR = b"\\."
# A row's newline, then the next chunk's header: sign byte 0 and four length bytes, any value
# (a length can hold a newline byte, so splitting at newlines alone would cut headers).
_ROW_END = re.compile(rb"\n\x00([\x00-\xff]{4})")
_FAST_MAX_ROW = 1 << 20  # a longer unfinished row is walked, not split again on every read
_FIRST_WINDOW = 512
_COPY_COLUMNS = re.compile(rb"^COPY .*? \((?P<cols>.*)\) FROM stdin;\s*$", re.DOTALL)


XXH3_128 = "xxh3-128"
"""Row checksum of current backups: XXH3 128-bit (seed 0) of each line, as its integer value."""
SHA256_128 = ""
"""Row checksum of backups made before 2026-12-02 (their manifests name none): the first 16
bytes of SHA-256 of each line, read big-endian."""

_DIGEST = methodcaller("digest")
_FIRST_16 = itemgetter(slice(16))
_BIG: Literal["big"] = "big"
_LITTLE: Literal["little"] = "little"


def _sum_xxh3(lines: list[bytes]) -> int:
    return sum(map(xxhash.xxh3_128_intdigest, lines))


def _sum_sha256(lines: list[bytes]) -> int:
    # Chained maps, no Python code per line.
    digests = map(_FIRST_16, map(_DIGEST, map(hashlib.sha256, lines)))
    return sum(map(int.from_bytes, digests, repeat(_BIG)))


_SUMS: dict[str, Callable[[list[bytes]], int]] = {XXH3_128: _sum_xxh3, SHA256_128: _sum_sha256}


class LineSummer:
    """Row count and order-independent checksum of COPY text, fed in arbitrary pieces.

    `alg` names the row checksum (`XXH3_128` or `SHA256_128`); any other raises `ValueError`.
    """

    __slots__ = ("_done", "_partial", "_sum", "alg", "rows", "total")

    def __init__(self, alg: str = XXH3_128) -> None:
        try:
            self._sum = _SUMS[alg]
        except KeyError:
            raise ValueError(f"unknown row checksum {alg!r}") from None
        self.alg = alg
        self._partial = b""
        self._done = False
        self.rows = 0
        self.total = 0

    @property
    def at_line_start(self) -> bool:
        """True when no partial line is pending and the terminator has not been seen."""
        return not self._partial and not self._done

    def feed(self, data: bytes) -> None:
        if self._done or not data:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        try:
            # pg_dump ends its COPY data with "\." (a data row can never be exactly that: a
            # backslash is always escaped); whatever follows is padding.
            end = lines.index(b"\\.")
        except ValueError:
            pass
        else:
            del lines[end:]
            self._done = True
        self._add(lines)

    def add_lines(self, lines: list[bytes]) -> None:
        """Whole rows without their newlines, none of them the terminator; only when
        `at_line_start`."""
        assert self.at_line_start
        self._add(lines)

    def add_sum(self, rows: int, total: int) -> None:
        """`rows` whole rows whose XXH3-128 checksums sum to `total` (summed elsewhere); only
        when `at_line_start`, for the XXH3-128 checksum."""
        assert self.at_line_start
        assert self.alg == XXH3_128
        self.total = (self.total + total) & _MASK
        self.rows += rows

    def _add(self, lines: list[bytes]) -> None:
        self.total = (self.total + self._sum(lines)) & _MASK
        self.rows += len(lines)

    def result(self, columns: str) -> TableFingerprint:
        if self._partial and not self._done:
            # A final row without a newline (not produced by PostgreSQL, but well defined).
            self._add([self._partial])
            self._partial = b""
        return TableFingerprint(
            rows=self.rows, checksum=f"{self.total:032x}", columns=columns, alg=self.alg
        )


@dataclass
class _Entry:
    dump_id: int
    namespace: str
    tag: str
    columns: str


class _NeedMore(Exception):
    pass


class _Cursor:
    """Reads archive primitives from a buffer; `_NeedMore` when the buffer ends too soon."""

    def __init__(self, buf: bytes | bytearray, pos: int, int_size: int = 4) -> None:
        self.buf = buf
        self.pos = pos
        self.int_size = int_size

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise _NeedMore
        out = bytes(self.buf[self.pos : end])
        self.pos = end
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def int(self) -> int:
        raw = self.take(1 + self.int_size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def str(self) -> bytes | None:
        n = self.int()
        if n < 0:
            return None
        return self.take(n)


class ArchiveFingerprinter:
    """Feed it the archive bytes in order; `result()` gives per-table fingerprints.

    `alg` is the row checksum (`XXH3_128`, or `SHA256_128` to check a backup made before
    2026-12-02); an unknown one raises `ValueError`.

    Never raises on archives it does not understand (another format version, compressed
    data, garbage): it stops looking, logs `pg.fingerprint_unavailable` once, and `result()`
    returns None. A backup must never fail because its fingerprint could not be computed.
    """

    native: ClassVar[bool] = _SUM_ROWS is not None
    """Whether pg_dump's one-row chunks are summed by the C extension (tests turn it off)."""

    def __init__(self, artifact: str = "", alg: str = XXH3_128) -> None:
        LineSummer(alg)  # an unknown checksum raises ValueError here, not mid-stream
        self._artifact = artifact
        self._alg = alg
        self._buf = bytearray()
        self._next_attempt = 0
        self._failed: str | None = None
        self._int_size = 4
        self._entries: dict[int, _Entry] = {}
        self._sums: dict[int, LineSummer] = {}
        self._in_toc = True
        # Data phase state: None between blocks; else (kind, dump_id, in_lo_data).
        self._block: tuple[int, int] | None = None
        self._lo_needs_oid = False
        self._chunk_left = 0
        self._fast = False  # whether `_whole_rows` may read the current data block
        self._window = _FIRST_WINDOW  # how far past a chunk's start `_whole_rows` splits

    # -- public ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            return
        try:
            self._buf += data
            if self._in_toc:
                if len(self._buf) < self._next_attempt:
                    return
                self._parse_head_and_toc()
                if self._in_toc:
                    return
            self._parse_blocks()
        except _Unsupported as exc:
            self._fail(str(exc))
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            self._fail(f"unreadable archive: {exc}")

    def result(self) -> Fingerprint | None:
        if self._failed is None and self._in_toc:
            # Small archives end before the next scheduled TOC parse attempt.
            self._next_attempt = 0
            self.feed(b"")
        if self._failed is not None:
            return None
        if self._in_toc or self._chunk_left or self._block is not None or self._buf:
            self._fail("archive ended early")
            return None
        missing = [e for e in self._entries.values() if e.dump_id not in self._sums]
        if missing:
            # pg_dump writes a data block for every TABLE DATA entry, even an empty table's.
            self._fail(f"archive ended before the data of {missing[0].namespace}.{missing[0].tag}")
            return None
        tables: dict[str, TableFingerprint] = {}
        for dump_id, entry in self._entries.items():
            tables[f"{entry.namespace}.{entry.tag}"] = self._sums[dump_id].result(entry.columns)
        return Fingerprint(tables=tables)

    # -- parsing --------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        if self._failed is None:
            self._failed = why
            self._buf = bytearray()
            log.warning("pg.fingerprint_unavailable", artifact=self._artifact, reason=why)

    def _parse_head_and_toc(self) -> None:
        cur = _Cursor(self._buf, 0)
        try:
            self._read_head(cur)
            entries = self._read_toc(cur)
        except _NeedMore:
            # Retry once the buffer has doubled: a huge TOC is then parsed O(n log n), not O(n²).
            self._next_attempt = max(2 * len(self._buf), 64 * 1024)
            return
        self._entries = entries
        self._in_toc = False
        del self._buf[: cur.pos]

    def _read_head(self, cur: _Cursor) -> None:
        if cur.take(5) != b"PGDMP":
            raise _Unsupported("not a pg_dump custom-format archive")
        version = (cur.byte(), cur.byte())
        cur.byte()  # revision
        if not _MIN_VERSION <= version <= _MAX_VERSION:
            raise _Unsupported(f"archive version {version[0]}.{version[1]} is not supported")
        self._version = version
        self._int_size = cur.int_size = cur.byte()
        self._off_size = cur.byte()
        if cur.byte() != 1:
            raise _Unsupported("not a custom-format archive")
        compression = cur.byte() if version >= (1, 15) else cur.int()
        if compression != 0:
            raise _Unsupported("archive data is compressed (pg_dump must run with --compress=0)")
        for _ in range(7):
            cur.int()
        for _ in range(3):
            cur.str()

    def _read_toc(self, cur: _Cursor) -> dict[int, _Entry]:
        entries: dict[int, _Entry] = {}
        for _ in range(cur.int()):
            dump_id = cur.int()
            cur.int()  # had_dumper
            cur.str()  # tableoid
            cur.str()  # oid
            tag = cur.str() or b""
            desc = cur.str() or b""
            cur.int()  # section
            cur.str()  # defn
            cur.str()  # drop
            copy_stmt = cur.str() or b""
            namespace = cur.str() or b""
            cur.str()  # tablespace
            if self._version >= (1, 14):
                cur.str()  # tableam
            if self._version >= (1, 16):
                cur.int()  # relkind
            cur.str()  # owner
            cur.str()  # with oids
            while cur.str() is not None:  # dependencies
                pass
            cur.take(1 + self._off_size)  # data offset (unset when writing to a pipe)
            if desc == b"TABLE DATA":
                match = _COPY_COLUMNS.match(copy_stmt)
                entries[dump_id] = _Entry(
                    dump_id=dump_id,
                    namespace=namespace.decode(),
                    tag=tag.decode(),
                    columns=match.group("cols").decode() if match else "",
                )
        return entries

    def _parse_blocks(self) -> None:
        buf = self._buf
        while True:
            block = self._block
            if block is not None and block[0] == _BLK_DATA:
                pos = self._data_chunks(buf)
            else:
                pos = 0
                if self._chunk_left:  # inside a large object's chunk: skip it
                    pos = min(len(buf), self._chunk_left)
                    self._chunk_left -= pos
                    if self._chunk_left:
                        del buf[:pos]
                        return
                cur = _Cursor(buf, pos, self._int_size)
                try:
                    self._read_marker(cur)
                except _NeedMore:
                    del buf[:pos]  # the incomplete marker is re-read next time
                    return
                pos = cur.pos
            if pos == 0:
                return  # nothing more can be read without more input
            del buf[:pos]

    def _data_chunks(self, buf: bytearray) -> int:
        """Consume a table data block's chunks from `buf`; returns how many bytes were used."""
        pos = 0
        while True:
            if self._fast and not self._chunk_left:
                used, wait = self._whole_rows(buf, pos)
                pos += used
                if wait:
                    return pos
            used, at_row = self._walk(buf, pos)
            pos += used
            if not at_row:
                return pos

    def _whole_rows(self, buf: bytearray, pos: int) -> tuple[int, bool]:
        """Take the whole one-row chunks from `pos` (a chunk's start) through C calls.

        Returns the bytes used and whether to wait for more input: True when all that is left
        is the start of one more chunk (short enough to read again), False when `_walk` must
        take the next chunk (the terminator, the block's end, a long row, or another shape of
        chunk, after which this block is walked chunk by chunk).

        Each split covers a window that starts small and doubles while rows fill it: a read
        can hold thousands of tiny tables, and splitting the rest of the buffer at each one's
        start would be quadratic.
        """
        summer = self._sums.get(self._block[1]) if self._block is not None else None
        if summer is not None and not summer.at_line_start:
            return 0, False
        if _SUM_ROWS is not None and self.native and (summer is None or summer.alg == XXH3_128):
            return self._native_rows(_SUM_ROWS, buf, pos, summer)
        start = pos
        size = len(buf)
        while True:
            if size - pos < _CHUNK_HEAD:
                return pos - start, True
            if buf[pos]:
                return pos - start, False  # a negative length: `_walk` reports it
            end = min(size, pos + _CHUNK_HEAD + self._window)
            with memoryview(buf) as view:
                first = int.from_bytes(view[pos + 1 : pos + _CHUNK_HEAD], "little")
                parts = _ROW_END.split(bytes(view[pos + _CHUNK_HEAD : end]))
            rows = parts[0::2]  # the last one is cut by the end of the window
            sizes = list(map(len, rows))
            whole = len(rows) - 1
            lengths = [first, *map(int.from_bytes, parts[1::2], repeat(_LITTLE))]
            wrong = list(map(ne, lengths, map(add, sizes, repeat(1))))
            stop = whole
            with contextlib.suppress(ValueError):
                stop = wrong.index(True, 0, whole)
            newline = b"".join(rows[:stop]).find(b"\n")
            if newline >= 0:  # a chunk of more than one line: the terminator's, or not pg_dump's
                stop = bisect_right(list(accumulate(sizes[:stop])), newline)
            with contextlib.suppress(ValueError):
                stop = rows.index(_TERMINATOR, 0, stop)
            if stop < whole and not rows[stop].startswith(_TERMINATOR):
                # Not pg_dump's shape: walk the rest of this block rather than split it again
                # at every chunk.
                self._fast = False
            taken = rows[:stop]
            if summer is not None and taken:
                summer.add_lines(taken)
            pos += sum(sizes[:stop]) + (_CHUNK_HEAD + 1) * stop
            if stop < whole:
                return pos - start, False
            if end == size:
                # Wait only for the rest of a short chunk; a whole one (the block's last) is
                # walked.
                return pos - start, sizes[stop] < lengths[stop] <= _FAST_MAX_ROW
            self._window *= 2  # rows reached the window's end: look further next time

    def _native_rows(
        self, sum_rows: _SumRows, buf: bytearray, pos: int, summer: LineSummer | None
    ) -> tuple[int, bool]:
        """`_whole_rows` through the C extension: the same stops, one call for all the rows."""
        end, rows, high, low, state = sum_rows(buf, pos, _FAST_MAX_ROW)
        if rows and summer is not None:
            summer.add_sum(rows, high << 64 | low)
        if state == _NOT_A_ROW and not buf.startswith(_TERMINATOR, end + _CHUNK_HEAD):
            self._fast = False  # not pg_dump's shape: walk the rest of this block
        return end - pos, state == _NEED_MORE

    def _walk(self, buf: bytearray, start: int) -> tuple[int, bool]:
        """Walk chunks one by one from `start`, with the payloads reaching the table's summer.

        Returns the bytes used and whether it stopped at the start of a chunk right after a
        row's end, where `_whole_rows` can take over again. Otherwise it stops at the end of
        the buffer or of the block.
        """
        size = len(buf)
        marker = 1 + self._int_size
        view = memoryview(buf)
        pending: list[memoryview] = []
        pos = start
        left = self._chunk_left
        at_row = False
        from_bytes = int.from_bytes
        try:
            while True:
                if left:
                    end = pos + left
                    if end > size:
                        pending.append(view[pos:size])
                        left = end - size
                        pos = size
                        break
                    pending.append(view[pos:end])
                    pos = end
                    left = 0
                    if self._fast and buf[end - 1] == _NEWLINE:
                        at_row = True
                        break
                if pos + marker > size:
                    break
                if buf[pos]:
                    raise _Unsupported("negative chunk length in table data")
                left = from_bytes(view[pos + 1 : pos + marker], "little")
                pos += marker
                if not left:
                    self._flush(pending)
                    self._block = None
                    break
            self._flush(pending)
        finally:
            pending.clear()
            view.release()
        self._chunk_left = left
        return pos - start, at_row

    def _flush(self, pending: list[memoryview]) -> None:
        """Give the current table's collected payload bytes to its summer."""
        if not pending:
            return
        if self._block is not None:
            summer = self._sums.get(self._block[1])
            if summer is not None:
                summer.feed(b"".join(pending))
        pending.clear()

    def _read_marker(self, cur: _Cursor) -> None:
        """Read what comes between payloads: a block header, a large object's oid or a length."""
        if self._block is None:
            kind = cur.byte()
            dump_id = cur.int()
            if kind not in (_BLK_DATA, _BLK_BLOBS):
                raise _Unsupported(f"unknown data block type {kind}")
            self._block = (kind, dump_id)
            self._lo_needs_oid = kind == _BLK_BLOBS
            if kind == _BLK_DATA and dump_id in self._entries:
                self._sums[dump_id] = LineSummer(self._alg)
            self._fast = self._int_size == 4
            self._window = _FIRST_WINDOW
            return
        if self._lo_needs_oid:
            if cur.int() == 0:
                self._block = None
            else:
                self._lo_needs_oid = False
            return
        length = cur.int()
        if length < 0:
            raise _Unsupported(f"negative chunk length {length}")
        if length > 0:
            self._chunk_left = length
        elif self._block[0] == _BLK_BLOBS:
            self._lo_needs_oid = True  # end of one large object; next comes an oid (0 = done)
        else:
            self._block = None


class _Unsupported(Exception):
    pass
