"""WAL positions, names, history files and page headers; the base backup tar scanner; WAL keys.

The page headers below are built by hand in PostgreSQL's layout (xlog_internal.h), little endian:

    u16 magic, u16 info (0x0002: long header), u32 timeline, u64 pageaddr, u32 rem_len,
    4 bytes padding, then for a long header u64 system identifier, u32 segment size,
    u32 block size.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drbot.engines.postgres.basebackup import TarScanner
from drbot.engines.postgres.wal import (
    DEFAULT_SEGMENT_SIZE,
    PAGE_MAGIC_PG15,
    Segment,
    Switch,
    check_segment_bytes,
    format_lsn,
    history_file_name,
    parse_history,
    parse_history_file_name,
    parse_lsn,
    parse_segment_name,
    read_first_page_header,
    segment_of,
    timeline_of,
)
from drbot.errors import DatabaseError, IntegrityFailure
from drbot.storage import layout

pytestmark = pytest.mark.unit

MIB = 1024 * 1024
SEG16 = 16 * MIB
SEG64 = 64 * MIB
SYSID = 7_301_234_567_890_123_456

# -- positions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
        ("1/0", 1 << 32),
    ],
)
def test_lsn_parses_and_formats_as_postgresql_writes_it(text: str, value: int) -> None:
    """An LSN in PostgreSQL's 'high/low' hex form parses to its integer and formats back."""
    assert parse_lsn(text) == value
    assert format_lsn(value) == text


def test_lsn_parsing_accepts_lower_case_and_surrounding_space() -> None:
    """Lower-case hex and surrounding whitespace (as in a history file) are accepted."""
    assert parse_lsn(" 16/b374d848\n") == (0x16 << 32) | 0xB374D848


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_every_lsn_round_trips(value: int) -> None:
    """format_lsn and parse_lsn are inverse over the whole 64-bit range."""
    assert parse_lsn(format_lsn(value)) == value


@pytest.mark.parametrize(
    "text",
    ["", "0", "0/", "/1", "0/123456789", "123456789/0", "G/0", "0-1", "0/1/2", "0x1/2", "-1/0"],
)
def test_a_malformed_lsn_is_a_value_error_naming_it(text: str) -> None:
    """Anything not 1-8 hex digits, '/', 1-8 hex digits is refused, quoting the input."""
    with pytest.raises(ValueError, match="not a WAL position") as info:
        parse_lsn(text)
    assert repr(text) in str(info.value)


# -- segment names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "size", "name"),
    [
        (Segment(1, 2), SEG16, "000000010000000000000002"),
        (Segment(1, 0xFF), SEG16, "0000000100000000000000FF"),
        (Segment(1, 0x100), SEG16, "000000010000000100000000"),
        (Segment(1, 0x101), SEG16, "000000010000000100000001"),
        (Segment(0x1A, 0x2FF), SEG16, "0000001A00000002000000FF"),
        (Segment(1, 63), SEG64, "00000001000000000000003F"),
        (Segment(1, 64), SEG64, "000000010000000100000000"),
        (Segment(1, 0xFF), SEG64, "00000001000000030000003F"),
        (Segment(1, 0x100), SEG64, "000000010000000400000000"),
        (Segment(3, 0x101), SEG64, "000000030000000400000001"),
    ],
)
def test_segment_names_follow_postgresql(segment: Segment, size: int, name: str) -> None:
    """A segment's name is its timeline, then its number split at every 4 GiB of WAL."""
    assert segment.name(size) == name
    assert parse_segment_name(name, size) == segment


def test_the_default_segment_size_is_16_mib() -> None:
    """Without a size, names are those of 16 MiB segments."""
    assert DEFAULT_SEGMENT_SIZE == SEG16
    assert Segment(1, 0x100).name() == "000000010000000100000000"
    assert parse_segment_name("000000010000000100000000") == Segment(1, 0x100)


@given(
    st.integers(min_value=1, max_value=0xFFFFFFFF),
    st.integers(min_value=0, max_value=(1 << 40) - 1),
    st.sampled_from([1 * MIB, SEG16, SEG64, 1024 * MIB]),
)
def test_every_segment_name_round_trips(timeline: int, lsn: int, size: int) -> None:
    """The segment holding any LSN has a name that parses back to it, and it holds that LSN."""
    seg = segment_of(timeline, lsn, size)
    assert seg.start_lsn(size) <= lsn < seg.end_lsn(size)
    assert seg.end_lsn(size) == seg.next().start_lsn(size)
    assert parse_segment_name(seg.name(size), size) == seg


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("000000010000000000000100", SEG16),  # low part past 0xFF: no such 16 MiB segment
        ("000000010000000000000040", SEG64),  # low part past 0x3F: no such 64 MiB segment
        ("00000001000000000000000", SEG16),  # 23 digits
        ("0000000100000000000000002", SEG16),  # 25 digits
        ("00000001000000000000000a", SEG16),  # lower case: PostgreSQL never writes it
        ("000000010000000000000002.partial", SEG16),
        ("00000001.history", SEG16),
        ("", SEG16),
    ],
)
def test_what_is_not_a_segment_name_parses_to_none(name: str, size: int) -> None:
    """Names of other lengths, cases or suffixes, or out of range for the size, are not segments."""
    assert parse_segment_name(name, size) is None


def test_a_segment_name_with_a_trailing_newline_is_not_a_segment_name() -> None:
    """A name followed by a newline is not PostgreSQL's file name."""
    assert parse_segment_name("000000010000000000000002\n") is None


def test_history_file_names_round_trip() -> None:
    """History file names are the timeline in 8 upper-case hex digits plus '.history'."""
    assert history_file_name(2) == "00000002.history"
    assert history_file_name(0x1A) == "0000001A.history"
    assert parse_history_file_name("0000001A.history") == 0x1A
    for bad in ("0000001a.history", "1.history", "00000002.history.partial", "00000002"):
        assert parse_history_file_name(bad) is None


# -- timeline history -----------------------------------------------------------------------


def test_a_history_file_parses_skipping_comments_and_blank_lines() -> None:
    """Lines are parent timeline, switch LSN, optional reason; '#' and blank lines are skipped."""
    text = (
        "# written by PostgreSQL\n"
        "1\t0/3000158\tno recovery target specified\n"
        "\n"
        "   \n"
        '2\t0/5000000\tat restore point "before upgrade"\n'
        "3\t1/0\n"
    )
    assert parse_history(text) == [
        Switch(1, 0x3000158, "no recovery target specified"),
        Switch(2, 0x5000000, 'at restore point "before upgrade"'),
        Switch(3, 1 << 32, ""),
    ]


def test_an_empty_history_has_no_switches() -> None:
    """An empty file (or only comments) means no ancestry."""
    assert parse_history("") == []
    assert parse_history("# nothing\n\n") == []


@pytest.mark.parametrize(
    "text",
    [
        "1\n",  # no LSN
        "one\t0/3000000\treason\n",  # parent not a number
        "1\t0/30000000000\treason\n",  # LSN part too long
        "1\tnot-an-lsn\n",
        "1\t0/3000000\n2\t0/4000000\nthree\t0/5000000\n",  # a bad line after good ones
    ],
)
def test_a_malformed_history_line_is_an_integrity_failure(text: str) -> None:
    """A line that is neither blank, a comment, nor 'parent<TAB>lsn[<TAB>reason]' is refused."""
    with pytest.raises(IntegrityFailure, match="malformed"):
        parse_history(text)


@pytest.mark.parametrize(
    "text",
    [
        "2\t0/3000000\n1\t0/4000000\n",  # decreasing
        "1\t0/3000000\n1\t0/4000000\n",  # repeated
    ],
)
def test_history_parents_must_increase(text: str) -> None:
    """Parents that do not strictly increase cannot be one timeline's ancestry."""
    with pytest.raises(IntegrityFailure, match="line 2: timelines do not increase"):
        parse_history(text)


def test_timeline_of_walks_the_ancestry() -> None:
    """A position belongs to the first ancestor whose switch comes after it, else the timeline."""
    history = [Switch(1, 0x3000000, ""), Switch(2, 0x5000100, "")]
    assert timeline_of(0, 3, history) == 1
    assert timeline_of(0x2FFFFFF, 3, history) == 1
    assert timeline_of(0x3000000, 3, history) == 2  # the switch point starts the child
    assert timeline_of(0x50000FF, 3, history) == 2
    assert timeline_of(0x5000100, 3, history) == 3
    assert timeline_of(1 << 40, 3, history) == 3
    assert timeline_of(1 << 40, 1, []) == 1


# -- page headers ---------------------------------------------------------------------------


def _page(
    *,
    timeline: int = 1,
    pageaddr: int = 0,
    sysid: int = SYSID,
    seg_size: int = SEG16,
    long_header: bool = True,
    tail: int = 64,
) -> bytes:
    info = 0x0002 if long_header else 0
    head = struct.pack("<HHIQI4x", PAGE_MAGIC_PG15, info, timeline, pageaddr, 0)
    head += struct.pack("<QII", sysid, seg_size, 8192)
    return head + bytes(tail)


def test_the_page_header_layout_is_40_bytes() -> None:
    """The hand-built long header is the 40 bytes PostgreSQL writes (before any record)."""
    assert len(_page(tail=0)) == 40


def test_the_first_page_header_is_read() -> None:
    """A long header yields magic, timeline, page address, system identifier and segment size."""
    header = read_first_page_header(_page(timeline=3, pageaddr=0x5000000, seg_size=SEG64))
    assert header is not None
    assert header.magic == PAGE_MAGIC_PG15
    assert header.timeline == 3
    assert header.page_lsn == 0x5000000
    assert header.system_identifier == SYSID
    assert header.segment_size == SEG64


def test_a_short_header_carries_no_system_identifier() -> None:
    """Without the long-header bit, the system identifier and size are unknown (0)."""
    header = read_first_page_header(_page(long_header=False, pageaddr=0x2000000))
    assert header is not None
    assert (header.page_lsn, header.system_identifier, header.segment_size) == (0x2000000, 0, 0)


@pytest.mark.parametrize("length", [0, 1, 24, 39])
def test_too_little_data_has_no_header(length: int) -> None:
    """Fewer than 40 bytes cannot hold a long header."""
    assert read_first_page_header(_page(pageaddr=0x2000000)[:length]) is None


def test_a_segment_with_its_own_bytes_passes() -> None:
    """A segment whose header names its start, timeline, cluster and size is accepted."""
    seg = Segment(1, 0x102)
    check_segment_bytes(_page(pageaddr=seg.start_lsn()), seg, SYSID, SEG16, where="d:k")
    seg64 = Segment(1, 0x102)
    page64 = _page(pageaddr=seg64.start_lsn(SEG64), seg_size=SEG64)
    check_segment_bytes(page64, seg64, SYSID, SEG64, where="d:k")


def test_a_segment_stored_under_another_number_fails() -> None:
    """Segment 3's bytes stored as segment 4 are the wrong WAL, and the error says where."""
    data = _page(pageaddr=Segment(1, 3).start_lsn())
    with pytest.raises(IntegrityFailure, match=r"d:k: WAL segment 000000010000000000000004") as e:
        check_segment_bytes(data, Segment(1, 4), SYSID, SEG16, where="d:k")
    assert "it starts at 0/3000000, not 0/4000000" in e.value.message


def test_a_segment_of_another_cluster_fails() -> None:
    """The same segment from a different database system is refused."""
    data = _page(pageaddr=Segment(1, 3).start_lsn(), sysid=SYSID + 1)
    with pytest.raises(IntegrityFailure, match="belongs to database system"):
        check_segment_bytes(data, Segment(1, 3), SYSID, SEG16, where="d:k")


def test_an_unknown_system_identifier_is_not_checked() -> None:
    """With no system identifier to compare (0), any cluster's segment passes that check."""
    data = _page(pageaddr=Segment(1, 3).start_lsn(), sysid=SYSID + 1)
    check_segment_bytes(data, Segment(1, 3), 0, SEG16, where="d:k")


def test_a_segment_of_a_later_timeline_fails() -> None:
    """Pages of timeline 2 cannot be timeline 1's segment."""
    data = _page(timeline=2, pageaddr=Segment(1, 3).start_lsn())
    with pytest.raises(IntegrityFailure, match="its pages are of timeline 2"):
        check_segment_bytes(data, Segment(1, 3), SYSID, SEG16, where="d:k")


def test_a_segment_opening_a_timeline_may_carry_its_parents_pages() -> None:
    """The first segment of timeline 2 starts with timeline 1's pages: accepted."""
    data = _page(timeline=1, pageaddr=Segment(2, 3).start_lsn())
    check_segment_bytes(data, Segment(2, 3), SYSID, SEG16, where="d:k")


def test_timeline_zero_in_a_header_fails() -> None:
    """No page is of timeline 0 (an all-zero page is not a WAL page)."""
    with pytest.raises(IntegrityFailure, match="timeline 0"):
        check_segment_bytes(bytes(8192), Segment(1, 0), SYSID, SEG16, where="d:k")


def test_a_segment_of_another_size_fails() -> None:
    """A 64 MiB cluster's segment is not a 16 MiB cluster's, even at a matching start."""
    data = _page(pageaddr=Segment(1, 4).start_lsn(SEG16), seg_size=SEG64)
    with pytest.raises(IntegrityFailure, match=f"its segment size is {SEG64}, not {SEG16}"):
        check_segment_bytes(data, Segment(1, 4), SYSID, SEG16, where="d:k")


def test_every_problem_is_named_at_once() -> None:
    """Several mismatches are reported together."""
    data = _page(timeline=5, pageaddr=0, sysid=1)
    with pytest.raises(IntegrityFailure) as e:
        check_segment_bytes(data, Segment(1, 4), SYSID, SEG16, where="d:k")
    assert e.value.message.count(";") == 2


@pytest.mark.parametrize("length", [0, 10, 39])
def test_short_data_passes(length: int) -> None:
    """A tiny partial segment has no header yet: nothing to check, so it is accepted."""
    data = _page(timeline=9, pageaddr=0x7000000, sysid=1)[:length]
    check_segment_bytes(data, Segment(1, 4), SYSID, SEG16, where="d:k")


# -- the base backup tar stream -------------------------------------------------------------

BIG = bytes((i * 7 + i // 251) % 256 for i in range(300_001))
LABEL = (
    b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    b"CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n"
    b"START TIMELINE: 1\nLABEL: drbot\n"
)


def _backup_manifest(ranges: list[dict[str, object]] | None = None, files: int = 4) -> bytes:
    doc = {
        "PostgreSQL-Backup-Manifest-Version": 1,
        "Files": [
            {"Path": f"f{i}", "Size": i, "Last-Modified": "2026-11-23 02:00:00 GMT"}
            for i in range(files)
        ],
        "WAL-Ranges": ranges
        if ranges is not None
        else [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}],
        "Manifest-Checksum": "00" * 32,
    }
    return json.dumps(doc, indent=1).encode()


def _tar(
    members: list[tuple[str, bytes | None, bytes]], fmt: int = tarfile.USTAR_FORMAT
) -> tuple[bytes, int]:
    """A tar stream and the offset where its end-of-archive blocks begin.

    Each member is (name, content or None for a directory, symlink target or b"").
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, content, link in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif link:
                info.type = tarfile.SYMTYPE
                info.linkname = link.decode()
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        end = tar.offset
    return buf.getvalue(), end


MANIFEST = _backup_manifest()
MEMBERS: list[tuple[str, bytes | None, bytes]] = [
    ("backup_label", LABEL, b""),
    ("base", None, b""),
    ("base/1", None, b""),
    ("base/1/1259", BIG, b""),
    ("base/1/empty", b"", b""),
    ("pg_tblspc/16384", b"", b"/srv/tablespace"),
    ("global/pg_control", bytes(8192), b""),
    ("backup_manifest", MANIFEST, b""),
]
DATA_BYTES = len(LABEL) + len(BIG) + 8192 + len(MANIFEST)


def _scan(data: bytes, chunk: int) -> TarScanner:
    scanner = TarScanner(system_identifier=SYSID, segment_size=SEG16)
    for i in range(0, len(data), chunk):
        scanner.feed(data[i : i + chunk])
    return scanner


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 1 << 20])
def test_the_scanner_reads_a_base_backup_in_any_chunking(chunk: int) -> None:
    """However the stream is cut, the scanner finds the manifest's facts and the data size."""
    data, _ = _tar(MEMBERS)
    scanner = _scan(data, chunk)
    assert scanner.ended
    assert scanner.members == len(MEMBERS)
    assert scanner.symlinks == ["pg_tblspc/16384"]
    assert scanner.data_bytes == DATA_BYTES
    assert scanner.files == {"backup_label": LABEL, "backup_manifest": MANIFEST}
    info = scanner.info("primary:base.tar")
    assert info.system_identifier == SYSID
    assert info.segment_size == SEG16
    assert info.timeline == 1
    assert info.start_lsn == 0x2000028
    assert info.stop_lsn == 0x2000100
    assert info.files == 4
    assert info.data_bytes == DATA_BYTES
    assert info.backup_manifest_sha256 == hashlib.sha256(MANIFEST).hexdigest()
    assert info.to_json()["start_lsn"] == "0/2000028"
    assert info.to_json()["system_identifier"] == str(SYSID)


def test_a_backup_spanning_timelines_reports_the_last_timeline() -> None:
    """A backup of a standby that switched timelines starts in the first range and ends in the
    last."""
    manifest = _backup_manifest(
        [
            {"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/3000000"},
            {"Timeline": 2, "Start-LSN": "0/3000000", "End-LSN": "0/3000100"},
        ]
    )
    data, _ = _tar([("backup_label", LABEL, b""), ("backup_manifest", manifest, b"")])
    info = _scan(data, 513).info("d")
    assert (info.timeline, info.start_lsn, info.stop_lsn) == (2, 0x2000028, 0x3000100)


def test_the_scanner_reads_a_gnu_or_pax_tar_of_short_names_alike() -> None:
    """Plain names and sizes give the same facts in the other formats tarfile writes."""
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data, _ = _tar(MEMBERS, fmt)
        info = _scan(data, 4096).info("d")
        assert (info.stop_lsn, info.files, info.data_bytes) == (0x2000100, 4, DATA_BYTES)


def test_a_size_of_8_gib_or_more_is_read_in_base_256() -> None:
    """A member of 9 GiB has its size in base-256 (as pg_basebackup writes it): counted exactly."""
    info = tarfile.TarInfo("base/1/huge")
    info.size = 9 << 30
    scanner = TarScanner()
    scanner.feed(info.tobuf(format=tarfile.GNU_FORMAT))
    assert scanner.members == 1
    assert scanner.data_bytes == 9 << 30


def test_a_stream_without_backup_manifest_is_a_database_error() -> None:
    """A stream that ends properly but holds no backup_manifest is not a base backup."""
    data, _ = _tar([m for m in MEMBERS if m[0] != "backup_manifest"])
    scanner = _scan(data, 4096)
    assert scanner.ended
    with pytest.raises(DatabaseError, match=r"primary:base\.tar: .*without its backup_manifest"):
        scanner.info("primary:base.tar")


@pytest.mark.parametrize("cut", ["before_end_blocks", "in_manifest", "in_big_file"])
def test_a_truncated_stream_is_a_database_error(cut: str) -> None:
    """A stream cut anywhere before its end-of-archive blocks is refused, even with the manifest."""
    data, end = _tar(MEMBERS)
    length = {
        "before_end_blocks": end,
        "in_manifest": end - -(-len(MANIFEST) // 512) * 512 + len(MANIFEST) // 2,
        "in_big_file": 2048,
    }[cut]
    scanner = _scan(data[:length], 7)
    assert not scanner.ended
    if cut == "before_end_blocks":
        assert scanner.files["backup_manifest"] == MANIFEST  # whole, yet not enough
    with pytest.raises(DatabaseError, match="without its backup_manifest"):
        scanner.info("d")


@pytest.mark.parametrize(
    "manifest",
    [
        b"{not json",
        b"",
        json.dumps({"Files": []}).encode(),
        json.dumps({"WAL-Ranges": []}).encode(),
        json.dumps({"WAL-Ranges": [{"Timeline": 1, "Start-LSN": "x", "End-LSN": "0/1"}]}).encode(),
        json.dumps(
            {"WAL-Ranges": [{"Timeline": "one", "Start-LSN": "0/1", "End-LSN": "0/2"}]}
        ).encode(),
        json.dumps([1, 2]).encode(),
    ],
)
def test_an_unreadable_backup_manifest_is_a_database_error(manifest: bytes) -> None:
    """A backup_manifest that is not JSON or lacks the WAL range is refused."""
    data, _ = _tar([("backup_manifest", manifest, b"")])
    with pytest.raises(DatabaseError, match="unreadable backup_manifest"):
        _scan(data, 511).info("d")


# -- WAL object keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["000000010000000000000002", "0000000A00000001000000FF", "FFFFFFFFFFFFFFFFFFFFFFFF"]
)
def test_wal_segment_keys_round_trip(name: str) -> None:
    """A segment key sits under its timeline's directory and parses back to its name."""
    key = layout.wal_segment_key("shop", name)
    assert key == f"shop/wal/{name[:8]}/{name}.zst.enc"
    assert layout.parse_wal_key("shop", key) == layout.WalKey("segment", name)
    partial = layout.wal_segment_key("shop", name, partial=True)
    assert partial == f"shop/wal/{name[:8]}/{name}.partial.zst.enc"
    assert layout.parse_wal_key("shop", partial) == layout.WalKey("partial", name)


def test_wal_history_keys_round_trip() -> None:
    """A history key sits under history/ and parses back to PostgreSQL's file name."""
    key = layout.wal_history_key("shop", history_file_name(2))
    assert key == "shop/wal/history/00000002.history.zst.enc"
    assert layout.parse_wal_key("shop", key) == layout.WalKey("history", "00000002.history")


def test_wal_keys_of_another_policy_are_not_ours() -> None:
    """A key under another policy's prefix (even one that shares a prefix) is foreign."""
    key = layout.wal_segment_key("shop", "000000010000000000000002")
    assert layout.parse_wal_key("sho", key) is None
    assert layout.parse_wal_key("shop2", key) is None
    assert (
        layout.parse_wal_key("shop", "shop2/wal/00000001/000000010000000000000002.zst.enc") is None
    )


@pytest.mark.parametrize(
    "key",
    [
        "shop/wal/00000002/000000010000000000000002.zst.enc",  # under the wrong timeline
        "shop/wal/00000001/000000020000000000000002.partial.zst.enc",
        "shop/wal/000000010000000000000002.zst.enc",  # no timeline directory
        "shop/wal/00000001/000000010000000000000002",  # no suffix
        "shop/wal/00000001/000000010000000000000002.zst",
        "shop/wal/00000001/000000010000000000000002.partial",
        "shop/wal/00000001/00000001000000000000000a.zst.enc",  # lower case
        "shop/wal/00000001/00000001000000000000002.zst.enc",  # 23 digits
        "shop/wal/00000001/000000010000000000000002.zst.enc.tmp",
        "shop/wal/history/00000002.history",
        "shop/wal/history/2.history.zst.enc",
        "shop/wal/00000001/00000002.history.zst.enc",
        "shop/wal/README",
        "shop/wal/",
        "shop/backups/20261123T020000Z-abc123/manifest.json",
    ],
)
def test_foreign_objects_under_the_wal_prefix_are_not_ours(key: str) -> None:
    """Anything not exactly a segment, partial or history key is left alone (None)."""
    assert layout.parse_wal_key("shop", key) is None


@pytest.mark.parametrize(
    "key",
    [
        "shop/wal/00000001/000000010000000000000002.zst.enc\n",
        "shop/wal/history/00000002.history.zst.enc\n",
    ],
)
def test_a_wal_key_with_a_trailing_newline_is_foreign(key: str) -> None:
    """A key with a final newline is another object than the one its name would be read from."""
    assert layout.parse_wal_key("shop", key) is None
