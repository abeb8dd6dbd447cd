"""LineSummer's checksum math and ArchiveFingerprinter on hand-built pg_dump custom archives.

The builder below writes the subset of the custom archive format (pg_backup_archiver.c,
pg_backup_custom.c) that `drbot.engines.postgres.archive` reads, so it doubles as a worked
example of that format:

    header  b"PGDMP", major 1, minor 14, rev 0, int_size 4, off_size 8, format 1 (custom),
            compression as an int (0 = none; archives >= 1.15 use one byte instead),
            7 ints (sec, min, hour, mday, mon, year, isdst), str dbname, str server version,
            str pg_dump version
    toc     int entry count, then per entry the fields listed in `_toc_entry`
    data    per TABLE DATA entry: byte 1 (block type), int dump id, chunks (int length,
            bytes), int 0
    int     sign byte (0 or 1) then int_size bytes, least significant first
    str     int length (-1 = null) then the bytes
"""

from __future__ import annotations

import hashlib
import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from drbot.engines.base import Fingerprint, TableFingerprint
from drbot.engines.postgres import archive
from drbot.engines.postgres.archive import (
    SHA256_128,
    XXH3_128,
    ArchiveFingerprinter,
    LineSummer,
)
from tests.fixtures.require import missing

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MASK = (1 << 128) - 1


@pytest.fixture(autouse=True, params=["c", "python"])
def rows_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: pg_dump's one-row chunks summed by the C extension, then by Python.

    Both must give the same fingerprints, on well-formed and damaged archives alike.
    """
    if request.param == "c" and archive._SUM_ROWS is None:
        missing("native", "drbot/engines/postgres/_rowsum.c is not built (setup.py)")
    monkeypatch.setattr(ArchiveFingerprinter, "native", request.param == "c")
    return str(request.param)


# -- a tiny archive writer ----------------------------------------------------------------


def _int(value: int, size: int = 4) -> bytes:
    return bytes([1 if value < 0 else 0]) + abs(value).to_bytes(size, "little")


def _str(value: bytes | None) -> bytes:
    if value is None:
        return _int(-1)
    return _int(len(value)) + value


def _header(*, minor: int = 14, compression: int = 0) -> bytes:
    out = b"PGDMP" + bytes([1, minor, 0, 4, 8, 1])
    out += bytes([compression]) if minor >= 15 else _int(compression)
    for value in (0, 0, 12, 1, 0, 124, 0):  # creation time: 2024-01-01 12:00:00
        out += _int(value)
    return out + _str(b"shop") + _str(b"15.6") + _str(b"15.6")


def _toc_entry(
    dump_id: int,
    *,
    tag: bytes,
    desc: bytes,
    namespace: bytes,
    copy_stmt: bytes = b"",
    deps: tuple[bytes, ...] = (),
    minor: int = 14,
) -> bytes:
    out = _int(dump_id)
    out += _int(1 if desc == b"TABLE DATA" else 0)  # had_dumper
    out += _str(b"1259") + _str(b"16384")  # tableoid, oid
    out += _str(tag) + _str(desc)
    out += _int(3 if desc == b"TABLE DATA" else 2)  # section: data / pre-data
    out += _str(b"") + _str(b"")  # defn, drop
    out += _str(copy_stmt) + _str(namespace)
    out += _str(b"")  # tablespace
    if minor >= 14:
        out += _str(b"heap")  # tableam (archive >= 1.14)
    if minor >= 16:
        out += _int(ord("r"))  # relkind (archive >= 1.16)
    out += _str(b"postgres")  # owner
    out += _str(b"false")  # with_oids
    for dep in deps:
        out += _str(dep)
    out += _str(None)  # end of dependencies
    out += bytes([1]) + bytes(8)  # offset flag "not set" + off_size bytes
    return out


def _table_data(dump_id: int, namespace: str, tag: str, columns: str) -> bytes:
    """A TABLE DATA entry of `namespace.tag`, whose COPY statement names `columns`."""
    return _toc_entry(
        dump_id,
        tag=tag.encode(),
        desc=b"TABLE DATA",
        namespace=namespace.encode(),
        copy_stmt=f"COPY {namespace}.{tag} ({columns}) FROM stdin;\n".encode(),
    )


def _data_block(dump_id: int, payload: bytes, chunk: int = 7) -> bytes:
    out = bytes([1]) + _int(dump_id)
    for i in range(0, len(payload), chunk):
        piece = payload[i : i + chunk]
        out += _int(len(piece)) + piece
    return out + _int(0)


def _row_block(dump_id: int, rows: list[bytes], end: bytes = b"\\.\n\n\n") -> bytes:
    """A data block as pg_dump writes it: one chunk per row, then its "\\.\\n\\n\\n" chunk."""
    out = bytes([1]) + _int(dump_id)
    for row in [*(r + b"\n" for r in rows), end]:
        out += _int(len(row)) + row
    return out + _int(0)


ORDERS_ROWS = [b"1\talice\t\\N", b"2\tbob\t3.5", b"3\t\xc3\xa9\\t\\n\t-0"]
ORDERS_COPY = b"".join(r + b"\n" for r in ORDERS_ROWS) + b"\\.\n\n"
EMPTY_COPY = b"\\.\n\n"


def _archive(*, minor: int = 14, compression: int = 0) -> bytes:
    """A schema entry, two tables' TABLE DATA (one empty) and their data blocks."""
    toc = [
        _toc_entry(1, tag=b"public", desc=b"SCHEMA", namespace=b"", minor=minor),
        _toc_entry(2, tag=b"orders", desc=b"TABLE", namespace=b"public", minor=minor),
        _toc_entry(
            5,
            tag=b"orders",
            desc=b"TABLE DATA",
            namespace=b"public",
            copy_stmt=b'COPY public.orders (id, "Name", price) FROM stdin;\n',
            deps=(b"2",),
            minor=minor,
        ),
        _toc_entry(
            6,
            tag=b"empty",
            desc=b"TABLE DATA",
            namespace=b"app",
            copy_stmt=b"COPY app.empty (id) FROM stdin;\n",
            minor=minor,
        ),
    ]
    out = _header(minor=minor, compression=compression) + _int(len(toc)) + b"".join(toc)
    return out + _data_block(5, ORDERS_COPY) + _data_block(6, EMPTY_COPY)


def _expected_sum(lines: list[bytes], alg: str = XXH3_128) -> str:
    """The checksum as docs/postgres-logical.md defines it, written out independently."""
    if alg == XXH3_128:
        total = sum(int.from_bytes(xxhash.xxh3_128_digest(line), "big") for line in lines)
    else:
        total = sum(int.from_bytes(hashlib.sha256(line).digest()[:16], "big") for line in lines)
    return f"{total & MASK:032x}"


class _WalkOnly(ArchiveFingerprinter):
    """Reads every chunk one by one: the reference the C-call path must agree with."""

    def _whole_rows(self, buf: bytearray, pos: int) -> tuple[int, bool]:
        self._fast = False
        return 0, False


def _fingerprint(
    data: bytes, sizes: list[int] | None = None, *, walk_only: bool = False
) -> Fingerprint | None:
    fp = _WalkOnly("test") if walk_only else ArchiveFingerprinter("test")
    if sizes is None:
        fp.feed(data)
    else:
        pos = 0
        for size in sizes:
            fp.feed(data[pos : pos + size])
            pos += size
        fp.feed(data[pos:])
    return fp.result()


def _sum(data: bytes, splits: list[int] | None = None, alg: str = XXH3_128) -> tuple[int, str]:
    summer = LineSummer(alg)
    if splits is None:
        summer.feed(data)
    else:
        last = 0
        for cut in sorted(splits):
            summer.feed(data[last:cut])
            last = cut
        summer.feed(data[last:])
    result = summer.result("cols")
    return result.rows, result.checksum


# -- LineSummer -------------------------------------------------------------------------

lines_strategy = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")).filter(lambda b: b != b"\\."),
    max_size=30,
)


@pytest.mark.parametrize("alg", [XXH3_128, SHA256_128])
def test_checksum_definition_by_hand(alg: str) -> None:
    rows, checksum = _sum(b"a\tb\n\\N\t\n", alg=alg)
    assert rows == 2
    assert checksum == _expected_sum([b"a\tb", b"\\N\t"], alg)
    assert len(checksum) == 32
    assert checksum == checksum.lower()
    assert LineSummer(alg).result("c").alg == alg


def test_checksum_of_known_values() -> None:
    # Fixed values, so a change of either definition cannot pass unnoticed (the SHA-256 one is
    # what every backup before 2026-12-02 holds).
    assert _sum(b"a\n", alg=XXH3_128)[1] == "a96faf705af16834e6c632b61e964e1f"
    assert _sum(b"a\n", alg=SHA256_128)[1] == "ca978112ca1bbdcafac231b39a23dc4d"


def test_unknown_checksum_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown row checksum 'md5'"):
        LineSummer("md5")


def test_no_input_is_zero_rows_and_zero_sum() -> None:
    assert _sum(b"") == (0, "0" * 32)
    assert LineSummer().result("x") == TableFingerprint(
        rows=0, checksum="0" * 32, columns="x", alg=XXH3_128
    )


@settings(max_examples=200, deadline=None)
@given(lines=lines_strategy, seed=st.randoms(use_true_random=False))
def test_order_independent(lines: list[bytes], seed: random.Random) -> None:
    shuffled = list(lines)
    seed.shuffle(shuffled)
    text = b"".join(line + b"\n" for line in lines)
    other = b"".join(line + b"\n" for line in shuffled)
    assert _sum(text) == _sum(other) == (len(lines), _expected_sum(lines))


@settings(max_examples=200, deadline=None)
@given(lines=lines_strategy, data=st.data())
def test_split_points_do_not_matter(lines: list[bytes], data: st.DataObject) -> None:
    text = b"".join(line + b"\n" for line in lines) + b"\\.\n"
    splits = data.draw(st.lists(st.integers(min_value=0, max_value=len(text)), max_size=20))
    assert _sum(text, splits) == _sum(text) == (len(lines), _expected_sum(lines))


def test_every_single_byte_split() -> None:
    text = b"x\ty\n\\\\.\nlast\n\\.\nignored\n"
    whole = _sum(text)
    assert whole == (3, _expected_sum([b"x\ty", b"\\\\.", b"last"]))
    assert _sum(text, list(range(len(text)))) == whole


def test_terminator_and_everything_after_it_ignored() -> None:
    base = _sum(b"1\n2\n")
    assert _sum(b"1\n2\n\\.\n") == base
    assert _sum(b"1\n2\n\\.\n3\n4\nmore garbage") == base
    assert _sum(b"1\n2\n\\.") == (3, _expected_sum([b"1", b"2", b"\\."]))  # no newline: a row
    summer = LineSummer()
    summer.feed(b"1\n2\n\\.\n")
    summer.feed(b"after the end\n")
    assert (summer.rows, summer.result("").checksum) == base


def test_escaped_terminator_lookalikes_are_rows() -> None:
    # "\\." is a backslash followed by a dot in COPY text, " \." has a leading space.
    assert _sum(b"\\\\.\n \\.\n\\.x\n")[0] == 3


def test_empty_lines_count_as_rows() -> None:
    # A single-column table holding an empty string writes an empty line per row.
    rows, checksum = _sum(b"\n\n\n")
    assert rows == 3
    assert checksum == _expected_sum([b"", b"", b""])
    assert _sum(b"\n\n\\.\n")[0] == 2


def test_final_line_without_newline_is_a_row() -> None:
    assert _sum(b"a\nb") == (2, _expected_sum([b"a", b"b"]))


def test_sum_wraps_modulo_2_128() -> None:
    lines = [f"row {i}".encode() for i in range(2000)]
    rows, checksum = _sum(b"".join(line + b"\n" for line in lines))
    assert rows == 2000
    assert int(checksum, 16) < 1 << 128
    assert checksum == _expected_sum(lines)


def test_duplicate_rows_are_not_cancelled() -> None:
    assert _sum(b"a\n")[1] != _sum(b"a\na\n")[1]
    assert _sum(b"a\na\n")[0] == 2


# -- ArchiveFingerprinter ---------------------------------------------------------------

EXPECTED = Fingerprint(
    tables={
        "public.orders": TableFingerprint(
            rows=3, checksum=_expected_sum(ORDERS_ROWS), columns='id, "Name", price', alg=XXH3_128
        ),
        "app.empty": TableFingerprint(rows=0, checksum="0" * 32, columns="id", alg=XXH3_128),
    }
)


def test_synthetic_archive() -> None:
    assert _fingerprint(_archive()) == EXPECTED


@pytest.mark.parametrize("minor", [12, 13, 14, 15, 16])
def test_supported_archive_versions(minor: int) -> None:
    # 1.12-1.14 store the compression level as an int, 1.15+ as one byte (the algorithm);
    # 1.14 added the table access method and 1.16 the relkind to each TOC entry.
    assert _fingerprint(_archive(minor=minor)) == EXPECTED


def test_large_archive_fed_in_pieces() -> None:
    # Past 64 KiB the TOC is parsed while feeding, so chunks then span feed boundaries
    # (pg_dump's output arrives in 1 MiB reads; a row's chunk is often split between two).
    rows = [f"{i}\t{'x' * (i % 300)}\t\\N".encode() for i in range(3000)]
    copy = b"".join(r + b"\n" for r in rows) + b"\\.\n\n"
    toc = [_table_data(5, "public", "orders", "id, t, n")]
    data = _header() + _int(1) + b"".join(toc) + _data_block(5, copy, chunk=1000)
    assert len(data) > 256 * 1024
    expected = Fingerprint(
        tables={
            "public.orders": TableFingerprint(
                rows=3000, checksum=_expected_sum(rows), columns="id, t, n", alg=XXH3_128
            )
        }
    )
    for piece in (1, 4096, 65536 + 7, 1 << 20):
        assert _fingerprint(data, [piece] * (len(data) // piece + 1)) == expected, piece


def test_byte_by_byte_feeding() -> None:
    data = _archive()
    assert _fingerprint(data, [1] * len(data)) == EXPECTED


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=64), max_size=60))
def test_any_chunking(sizes: list[int]) -> None:
    assert _fingerprint(_archive(), sizes) == EXPECTED


@pytest.mark.parametrize("compression", [1, 6, 9, -1])
def test_compressed_archive_is_none(compression: int) -> None:
    assert _fingerprint(_archive(compression=compression)) is None


@pytest.mark.parametrize("algorithm", [1, 2, 3])
def test_compressed_archive_1_15_is_none(algorithm: int) -> None:
    assert _fingerprint(_archive(minor=15, compression=algorithm)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        b"PGDMP",
        b"PGDMP\x01\x0e\x00\x04\x08\x02",  # format 2 (tar)
        b"PGDMP\x01\x09\x00\x04\x08\x01",  # archive 1.9: too old
        b"PGDMP\x01\x63\x00\x04\x08\x01",  # archive 1.99: too new
        b"\x00" * 10_000,
        bytes(range(256)) * 100,
        b"-- PostgreSQL database dump\nCREATE TABLE t (id int);\n",
    ],
)
def test_garbage_is_none(data: bytes) -> None:
    assert _fingerprint(data) is None
    assert _fingerprint(data, [1] * min(len(data), 300)) is None


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = _fingerprint(data)
    assert result is None or isinstance(result, Fingerprint)
    result = _fingerprint(b"PGDMP\x01\x0e\x00\x04\x08\x01" + data)
    assert result is None or isinstance(result, Fingerprint)


def test_garbage_after_toc_is_none() -> None:
    data = _archive()
    toc_end = data.index(bytes([1]) + _int(5) + _int(7))
    assert _fingerprint(data[:toc_end] + b"\x07" + bytes(40)) is None  # unknown block type
    assert _fingerprint(data[:toc_end] + bytes([1]) + _int(5) + _int(-4)) is None


@pytest.mark.parametrize("cut", [3, 20, 60, 200, 600, -40, -10, -1])
def test_truncated_archive_is_none(cut: int) -> None:
    data = _archive()
    assert _fingerprint(data[:cut]) is None


BLOCK_HEADER = 1 + 5  # block type byte + dump id int


def _block_starts(data: bytes) -> tuple[int, int]:
    return data.index(bytes([1]) + _int(5) + _int(7)), data.index(bytes([1]) + _int(6))


def test_every_truncation_inside_a_data_block_is_none() -> None:
    data = _archive()
    first, second = _block_starts(data)
    cuts = [*range(first + BLOCK_HEADER, second), *range(second + BLOCK_HEADER, len(data))]
    for cut in cuts:
        assert _fingerprint(data[:cut]) is None, cut


def test_truncation_inside_a_block_header_is_none() -> None:
    data = _archive()
    first, second = _block_starts(data)
    for start in (first, second):
        for cut in range(start + 1, start + BLOCK_HEADER):
            assert _fingerprint(data[:cut]) is None, cut


def test_truncation_between_data_blocks_is_none() -> None:
    data = _archive()
    first, second = _block_starts(data)
    for cut in (first, second):
        assert _fingerprint(data[:cut]) is None, cut


def test_feeding_after_failure_is_ignored() -> None:
    fp = ArchiveFingerprinter("t")
    fp.feed(b"not an archive at all")
    fp.feed(_archive())
    assert fp.result() is None
    assert fp.result() is None


# -- one chunk per row (pg_dump's own shape): the C-call path -----------------------------

# Row lengths whose chunk headers hold a newline byte, a zero byte or both ("\n\x00" inside a
# header is what a split at newlines alone would get wrong): 9 + 1 = 0x0a, 2559 + 1 = 0x0a00.
AWKWARD_LENGTHS = [0, 1, 9, 10, 255, 265, 2559, 2569, 65545]


def _pg_archive(
    rows: list[bytes], *, other: list[bytes] | None = None, end: bytes = b"\\.\n\n\n"
) -> bytes:
    toc = [_table_data(5, "public", "orders", "id, t"), _table_data(6, "app", "empty", "id")]
    head = _header() + _int(len(toc)) + b"".join(toc)
    return head + _row_block(5, rows, end) + _row_block(6, other or [], end)


def _pg_expected(rows: list[bytes], other: list[bytes] | None = None) -> Fingerprint:
    other = other or []
    return Fingerprint(
        tables={
            "public.orders": TableFingerprint(
                rows=len(rows), checksum=_expected_sum(rows), columns="id, t", alg=XXH3_128
            ),
            "app.empty": TableFingerprint(
                rows=len(other), checksum=_expected_sum(other), columns="id", alg=XXH3_128
            ),
        }
    )


def _awkward_rows() -> list[bytes]:
    rows = []
    for i, n in enumerate(AWKWARD_LENGTHS * 3):
        rows.append((f"{i}\t".encode() + b"x" * n)[:n] if n else b"")
    return rows


def test_one_chunk_per_row_goes_through_c_calls(
    monkeypatch: pytest.MonkeyPatch, rows_in: str
) -> None:
    rows = [f"{i}\tname {i}\t{'y' * (i % 300)}".encode() for i in range(20_000)]
    taken: list[int] = []
    add_lines, add_sum = LineSummer.add_lines, LineSummer.add_sum

    def counting_lines(self: LineSummer, lines: list[bytes]) -> None:
        taken.append(len(lines))
        add_lines(self, lines)

    def counting_sums(self: LineSummer, rows: int, total: int) -> None:
        taken.append(rows)
        add_sum(self, rows, total)

    monkeypatch.setattr(LineSummer, "add_lines", counting_lines)
    monkeypatch.setattr(LineSummer, "add_sum", counting_sums)
    data = _pg_archive(rows)
    assert _fingerprint(data) == _pg_expected(rows)
    assert sum(taken) == len(rows)  # fed whole: not one row walked
    taken.clear()
    assert _fingerprint(data, [65536] * (len(data) // 65536 + 1)) == _pg_expected(rows)
    # Every row but those cut by a feed boundary is counted without walking its chunk.
    assert sum(taken) >= len(rows) - len(data) // 65536 - 2
    if rows_in == "c":
        assert len(taken) <= len(data) // 65536 + 2  # one call per feed, not per row


def test_the_c_extension_stops_where_python_takes_over() -> None:
    if archive._SUM_ROWS is None:
        missing("native", "drbot/engines/postgres/_rowsum.c is not built (setup.py)")
    sum_rows, max_row = archive._SUM_ROWS, archive._FAST_MAX_ROW
    rows = [b"a", b"", b"b" * 300]
    chunks = b"".join(_int(len(r) + 1) + r + b"\n" for r in rows)
    whole = len(chunks)

    def stop(data: bytes, pos: int = 0) -> tuple[int, int, int]:
        end, n, high, low, state = sum_rows(bytearray(data), pos, max_row)
        assert high << 64 | low == sum(map(xxhash.xxh3_128_intdigest, rows[:n])) & MASK
        assert sum_rows(data, pos, max_row) == (end, n, high, low, state)  # bytes alike
        return end, n, state

    from drbot.engines.postgres import _rowsum

    need_more, walk, not_a_row = _rowsum.NEED_MORE, _rowsum.WALK, _rowsum.NOT_A_ROW
    assert stop(chunks) == (whole, 3, need_more)  # at the end, waiting for a header
    assert stop(chunks + _int(5)[:3]) == (whole, 3, need_more)
    assert stop(chunks + _int(9) + b"par") == (whole, 3, need_more)  # a short row, unfinished
    assert stop(chunks + _int(max_row + 1) + b"x") == (whole, 3, walk)  # a long one
    assert stop(chunks + _int(0)) == (whole, 3, walk)  # the block's end
    assert stop(chunks + _int(-1)) == (whole, 3, walk)  # a negative length
    assert stop(chunks + _int(3) + b"\\.\n") == (whole, 3, not_a_row)  # the terminator
    assert stop(chunks + _int(5) + b"\\.\n\n\n") == (whole, 3, not_a_row)
    assert stop(chunks + _int(4) + b"c\nd\n") == (whole, 3, not_a_row)  # two rows
    assert stop(chunks + _int(2) + b"cd") == (whole, 3, not_a_row)  # part of one
    assert stop(chunks, whole) == (whole, 0, need_more)
    with pytest.raises(ValueError, match="outside"):
        stop(chunks, whole + 1)
    with pytest.raises(ValueError, match="negative"):
        sum_rows(chunks, 0, -1)
    # Past 64 KiB the GIL is released while summing: the same result.
    many = [f"{i}\t{'w' * (i % 50)}".encode() for i in range(5000)]
    data = bytearray(b"".join(_int(len(r) + 1) + r + b"\n" for r in many))
    assert len(data) > 65536
    end, n, high, low, state = sum_rows(data, 0, max_row)
    assert (end, n, state) == (len(data), len(many), need_more)
    assert high << 64 | low == sum(map(xxhash.xxh3_128_intdigest, many)) & MASK


def test_backups_made_with_sha256_are_checked_with_sha256() -> None:
    # The old row checksum never takes the C path (it sums XXH3 only).
    rows = _awkward_rows()
    fp = ArchiveFingerprinter("test", alg=SHA256_128)
    fp.feed(_pg_archive(rows))
    result = fp.result()
    assert result is not None
    table = result.tables["public.orders"]
    assert (table.rows, table.checksum) == (len(rows), _expected_sum(rows, SHA256_128))
    assert table.alg == SHA256_128


def test_headers_holding_newline_and_zero_bytes() -> None:
    rows = _awkward_rows()
    data = _pg_archive(rows, other=[b"1", b""])
    expected = _pg_expected(rows, [b"1", b""])
    assert _fingerprint(data) == expected
    assert _fingerprint(data, [1] * len(data)) == expected
    assert _fingerprint(data, walk_only=True) == expected


class _CountingSplit:
    """Stands in for `archive._ROW_END`, noting the size of every split."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._pattern = archive._ROW_END

    def split(self, data: bytes) -> list[bytes]:
        self.sizes.append(len(data))
        return self._pattern.split(data)


def test_a_row_longer_than_a_read_is_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    splits = _CountingSplit()
    monkeypatch.setattr(archive, "_ROW_END", splits)
    big = b"1\t" + b"z" * (archive._FAST_MAX_ROW + 123)
    rows = [b"0\tsmall", big, b"2\tafter"]
    data = _pg_archive(rows)
    expected = _pg_expected(rows)
    piece = 1 << 16
    fp, held = ArchiveFingerprinter("test"), 0
    for at in range(0, len(data), piece):
        fp.feed(data[at : at + piece])
        held = max(held, len(fp._buf))
    assert fp.result() == expected
    # Walked as it arrives, not gathered whole before it is read.
    assert held < 4 * piece
    # Not split again each time a piece of it arrives (that would be quadratic).
    assert sum(splits.sizes) < 2 * len(data)
    assert _fingerprint(data) == expected


def test_chunks_holding_several_rows_or_part_of_one() -> None:
    # Not what pg_dump writes, but the format allows it: the result must not change.
    rows = [b"a\t1", b"b\t2", b"c\t3", b"d\t4", b"e\t5"]
    chunks = [b"a\t1\n", b"b\t2\nc\t3\n", b"d\t", b"4\n", b"e\t5\n", b"\\.\n\n\n"]
    assert _fingerprint(_replace_block(_pg_archive([]), chunks)) == _pg_expected(rows)


def _replace_block(data: bytes, chunks: list[bytes]) -> bytes:
    """`data` (from `_pg_archive`) with table 5's data block made of exactly `chunks`."""
    block = bytes([1]) + _int(5) + b"".join(_int(len(c)) + c for c in chunks) + _int(0)
    return data[: data.index(bytes([1]) + _int(5))] + block + _row_block(6, [])


def test_terminator_alone_in_its_chunk() -> None:
    data = _replace_block(_pg_archive([]), [b"a\n", b"b\n", b"\\.\n", b"c\n"])
    assert _fingerprint(data) == _pg_expected([b"a", b"b"])


def test_a_last_chunk_without_a_newline() -> None:
    # The archive's last chunk is whole but no row end follows it: read it, do not wait.
    data = _replace_block(_pg_archive([]), [b"a\n", b"b"])
    first, second = data.index(bytes([1]) + _int(5)), data.index(bytes([1]) + _int(6))
    data = data[:first] + data[second:] + data[first:second]  # table 5's block last
    assert _fingerprint(data) == _pg_expected([b"a", b"b"])


def test_other_shapes_are_split_once_not_at_every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    splits = _CountingSplit()
    monkeypatch.setattr(archive, "_ROW_END", splits)
    calls: list[int] = []  # of the C extension, where it is used
    sum_rows = archive._SUM_ROWS
    if sum_rows is not None:

        def counting(
            buf: bytes | bytearray, pos: int, max_row: int
        ) -> tuple[int, int, int, int, int]:
            calls.append(pos)
            return sum_rows(buf, pos, max_row)

        monkeypatch.setattr(archive, "_SUM_ROWS", counting)
    rows = [f"{i}\tr".encode() for i in range(4000)]
    pairs = [rows[i] + b"\n" + rows[i + 1] + b"\n" for i in range(0, len(rows), 2)]
    data = _replace_block(_pg_archive([]), [*pairs, b"\\.\n\n\n"])
    assert _fingerprint(data) == _pg_expected(rows)
    assert len(splits.sizes) <= 4
    assert len(calls) <= 4  # nor handed to C again at every chunk


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.one_of(
            st.binary(max_size=30).map(lambda b: b.replace(b"\n", b" ").replace(b"\x00", b"0")),
            st.sampled_from(AWKWARD_LENGTHS[:7]).map(lambda n: b"q" * n),
        ).filter(lambda b: b != b"\\."),
        max_size=40,
    ),
    sizes=st.lists(st.integers(min_value=1, max_value=300), max_size=30),
    end=st.sampled_from([b"\\.\n\n\n", b"\\.\n"]),
)
def test_same_result_as_walking_every_chunk(
    rows: list[bytes], sizes: list[int], end: bytes
) -> None:
    data = _pg_archive(rows, other=rows[:3], end=end)
    fast = _fingerprint(data, sizes)
    assert fast == _fingerprint(data, sizes, walk_only=True)
    assert fast == _pg_expected(rows, rows[:3])


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_same_result_as_walking_on_damaged_archives(data: st.DataObject) -> None:
    # Whatever a damaged archive yields (None or some fingerprint), both paths yield the same.
    # Short rows, so that a good share of the damage lands in chunk headers.
    rows = [b"q" * 9, b"x\ty", b"", b"z", b"q" * 8, b"1\t2\t3"] * 3
    good = bytearray(_pg_archive(rows, other=[b"7"]))
    start = good.index(bytes([1]) + _int(5))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        at = data.draw(st.integers(min_value=start, max_value=len(good) - 1))
        good[at] = data.draw(st.sampled_from([0x00, 0x01, 0x02, 0x09, 0x0A, 0x0B, 0x5C, 0x2E]))
    sizes = data.draw(st.lists(st.integers(min_value=1, max_value=200), max_size=20))
    damaged = bytes(good)
    assert _fingerprint(damaged, sizes) == _fingerprint(damaged, sizes, walk_only=True)


def test_many_small_tables_in_one_read_are_not_split_again_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A read can hold thousands of tiny tables' blocks: each block's start must not cost a split
    # of everything after it in the buffer (that would be quadratic).
    splits = _CountingSplit()
    monkeypatch.setattr(archive, "_ROW_END", splits)
    tables = 2000
    toc = [_table_data(10 + i, "public", f"t{i}", "id") for i in range(tables)]
    data = _header() + _int(len(toc)) + b"".join(toc)
    data += b"".join(_row_block(10 + i, [str(i).encode()]) for i in range(tables))
    result = _fingerprint(data)
    assert result is not None
    assert result.tables["public.t1999"] == TableFingerprint(
        rows=1, checksum=_expected_sum([b"1999"]), columns="id", alg=XXH3_128
    )
    assert sum(splits.sizes) < 8 * len(data)


def test_damage_inside_a_row_still_gives_a_fingerprint() -> None:
    # The damaged-archive property test mostly meets archives both paths give up on; damage to a
    # row's text keeps the framing, so both must still agree on a (different) fingerprint.
    rows = [b"1\tabc", b"2\tdef", b"3\tghi"]
    data = _pg_archive(rows)
    at = data.index(b"def")
    damaged = data[:at] + b"dXf" + data[at + 3 :]
    expected = _pg_expected([b"1\tabc", b"2\tdXf", b"3\tghi"])
    for sizes in (None, [1] * len(damaged), [7] * 200):
        assert _fingerprint(damaged, sizes) == expected
        assert _fingerprint(damaged, sizes, walk_only=True) == expected
