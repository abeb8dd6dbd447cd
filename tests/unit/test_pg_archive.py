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
from hypothesis import given, settings
from hypothesis import strategies as st

from drbot.engines.base import Fingerprint, TableFingerprint
from drbot.engines.postgres.archive import ArchiveFingerprinter, LineSummer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MASK = (1 << 128) - 1


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


def _data_block(dump_id: int, payload: bytes, chunk: int = 7) -> bytes:
    out = bytes([1]) + _int(dump_id)
    for i in range(0, len(payload), chunk):
        piece = payload[i : i + chunk]
        out += _int(len(piece)) + piece
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


def _expected_sum(lines: list[bytes]) -> str:
    total = sum(int.from_bytes(hashlib.sha256(line).digest()[:16], "big") for line in lines)
    return f"{total & MASK:032x}"


def _fingerprint(data: bytes, sizes: list[int] | None = None) -> Fingerprint | None:
    fp = ArchiveFingerprinter("test")
    if sizes is None:
        fp.feed(data)
    else:
        pos = 0
        for size in sizes:
            fp.feed(data[pos : pos + size])
            pos += size
        fp.feed(data[pos:])
    return fp.result()


def _sum(data: bytes, splits: list[int] | None = None) -> tuple[int, str]:
    summer = LineSummer()
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


def test_checksum_definition_by_hand() -> None:
    rows, checksum = _sum(b"a\tb\n\\N\t\n")
    assert rows == 2
    assert checksum == _expected_sum([b"a\tb", b"\\N\t"])
    assert len(checksum) == 32
    assert checksum == checksum.lower()


def test_no_input_is_zero_rows_and_zero_sum() -> None:
    assert _sum(b"") == (0, "0" * 32)
    assert LineSummer().result("x") == TableFingerprint(rows=0, checksum="0" * 32, columns="x")


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
            rows=3, checksum=_expected_sum(ORDERS_ROWS), columns='id, "Name", price'
        ),
        "app.empty": TableFingerprint(rows=0, checksum="0" * 32, columns="id"),
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
    toc = [
        _toc_entry(
            5,
            tag=b"orders",
            desc=b"TABLE DATA",
            namespace=b"public",
            copy_stmt=b"COPY public.orders (id, t, n) FROM stdin;\n",
        )
    ]
    data = _header() + _int(1) + b"".join(toc) + _data_block(5, copy, chunk=1000)
    assert len(data) > 256 * 1024
    expected = Fingerprint(
        tables={
            "public.orders": TableFingerprint(
                rows=3000, checksum=_expected_sum(rows), columns="id, t, n"
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
