"""PostgreSQL's write-ahead log, as far as drbot needs to know it: positions, file names,
timeline history files, and the page header that ties a segment's bytes to its name.

All pure: no I/O. The formats are PostgreSQL's own (src/include/access/xlog_internal.h).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from drbot.errors import IntegrityFailure

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
PAGE_MAGIC_PG15 = 0xD110
_LONG_HEADER = 0x0002
_SEGMENT_RE = re.compile(r"([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})")
_HISTORY_RE = re.compile(r"([0-9A-F]{8})\.history")
_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> int; ValueError naming the text otherwise."""
    m = _LSN_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a WAL position (expected like 0/16B3748): {text!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True, order=True)
class Segment:
    """One WAL segment file: a timeline and a segment number (LSN // segment size)."""

    timeline: int
    number: int

    def name(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
        per_id = 0x100000000 // segment_size
        return f"{self.timeline:08X}{self.number // per_id:08X}{self.number % per_id:08X}"

    def start_lsn(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return self.number * segment_size

    def end_lsn(self, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
        return (self.number + 1) * segment_size

    def next(self) -> Segment:
        return Segment(self.timeline, self.number + 1)


def segment_of(timeline: int, lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment:
    """The segment holding the byte at `lsn` on `timeline`."""
    return Segment(timeline, lsn // segment_size)


def parse_segment_name(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> Segment | None:
    """'000000010000000000000002' -> Segment(1, 2); None if `name` is not a segment file name."""
    m = _SEGMENT_RE.fullmatch(name)
    if not m:
        return None
    per_id = 0x100000000 // segment_size
    low = int(m.group(3), 16)
    if low >= per_id:
        return None
    return Segment(int(m.group(1), 16), int(m.group(2), 16) * per_id + low)


def history_file_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def parse_history_file_name(name: str) -> int | None:
    m = _HISTORY_RE.fullmatch(name)
    return int(m.group(1), 16) if m else None


@dataclass(frozen=True)
class Switch:
    """One line of a timeline history file: `parent` ended at `switch_lsn`."""

    parent: int
    switch_lsn: int
    reason: str


def parse_history(text: str) -> list[Switch]:
    """The lines of a `<TLI>.history` file: '<parent tli>\\t<switch lsn>\\t<reason>'.

    Blank lines and '#' comments are skipped, as PostgreSQL does; `IntegrityFailure` for any
    other malformed line, or parents that do not increase.
    """
    out: list[Switch] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 2)
        try:
            parent, lsn = int(fields[0]), parse_lsn(fields[1])
        except (ValueError, IndexError):
            raise IntegrityFailure(
                f"timeline history line {number} is malformed: {raw!r}"
            ) from None
        if out and parent <= out[-1].parent:
            raise IntegrityFailure(f"timeline history line {number}: timelines do not increase")
        out.append(Switch(parent, lsn, fields[2] if len(fields) > 2 else ""))
    return out


def timeline_of(lsn: int, timeline: int, history: list[Switch]) -> int:
    """Which timeline of `timeline`'s ancestry holds `lsn` (the history of `timeline`)."""
    for switch in history:
        if lsn < switch.switch_lsn:
            return switch.parent
    return timeline


def segment_on(
    number: int, timeline: int, history: list[Switch], segment_size: int = DEFAULT_SEGMENT_SIZE
) -> Segment:
    """Segment `number` as `timeline`'s history holds it: on the timeline that holds its last
    byte. A segment in which the timeline switched is the new timeline's copy, which holds the
    old timeline's WAL up to the switch and the new WAL after it."""
    return Segment(timeline_of((number + 1) * segment_size - 1, timeline, history), number)


@dataclass(frozen=True)
class PageHeader:
    """The first page header of a segment (a 'long' header)."""

    magic: int
    timeline: int
    page_lsn: int
    system_identifier: int
    segment_size: int


_SHORT = struct.Struct("<HHIQI")  # magic, info, tli, pageaddr, rem_len (+4 bytes padding)
_LONG_TAIL = struct.Struct("<QII")  # sysid, seg_size, xlog_blcksz, at offset 24


def read_first_page_header(data: bytes) -> PageHeader | None:
    """The long page header at the start of a segment; None if `data` is too short for one."""
    if len(data) < 24 + _LONG_TAIL.size:
        return None
    magic, info, tli, pageaddr, _ = _SHORT.unpack_from(data, 0)
    if not info & _LONG_HEADER:
        return PageHeader(magic, tli, pageaddr, 0, 0)
    sysid, seg_size, _ = _LONG_TAIL.unpack_from(data, 24)
    return PageHeader(magic, tli, pageaddr, sysid, seg_size)


def check_segment_bytes(
    head: bytes, segment: Segment, system_identifier: int, segment_size: int, *, where: str
) -> None:
    """Check that a segment's first bytes belong to `segment` of the cluster `system_identifier`.

    This binds an object's content to its name: a segment stored (or renamed) under another
    segment's key, or taken from another cluster, is an `IntegrityFailure`. A segment that opens
    a timeline starts with the parent timeline's bytes, so its page may carry a lower timeline.
    Short data (a tiny partial segment) is accepted: there is no header to check yet.
    """
    header = read_first_page_header(head)
    if header is None:
        return
    problems = []
    if header.page_lsn != segment.start_lsn(segment_size):
        problems.append(
            f"it starts at {format_lsn(header.page_lsn)}, not "
            f"{format_lsn(segment.start_lsn(segment_size))}"
        )
    if header.timeline > segment.timeline or header.timeline == 0:
        problems.append(f"its pages are of timeline {header.timeline}")
    if system_identifier and header.system_identifier != system_identifier:
        problems.append(
            f"it belongs to database system {header.system_identifier}, not {system_identifier}"
        )
    if header.segment_size and header.segment_size != segment_size:
        problems.append(f"its segment size is {header.segment_size}, not {segment_size}")
    if problems:
        raise IntegrityFailure(
            f"{where}: WAL segment {segment.name(segment_size)} holds the wrong WAL: "
            + "; ".join(problems)
        )
