"""A physical replication client: the streaming replication protocol, driven directly.

drbot speaks the protocol itself (rather than running pg_receivewal) for one reason: it must
decide when the server may forget WAL. The flush position it reports, which moves the
replication slot, is only ever a position whose WAL is stored and verified in every
destination. See https://www.postgresql.org/docs/15/protocol-replication.html.

Errors: `SourceUnavailable` when the server cannot be reached or the connection drops;
`DatabaseError` when the server refuses a command (with its message). Nothing from psycopg
escapes.
"""

from __future__ import annotations

import functools
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from drbot.engines.postgres.wal import parse_lsn
from drbot.errors import DatabaseError, SourceUnavailable

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_XLOGDATA = struct.Struct(">QQq")
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")


def _pg_now_us() -> int:
    return int((datetime.now(UTC) - _PG_EPOCH).total_seconds() * 1_000_000)


@dataclass(frozen=True)
class SystemInfo:
    """IDENTIFY_SYSTEM's answer."""

    system_identifier: int
    timeline: int
    flush_lsn: int


@dataclass(frozen=True)
class WalData:
    """WAL bytes starting at `start_lsn`, and the server's WAL end when it sent them."""

    start_lsn: int
    data: bytes
    server_end_lsn: int


@dataclass(frozen=True)
class Keepalive:
    server_end_lsn: int
    reply_requested: bool


@dataclass(frozen=True)
class TimelineEnd:
    """The streamed timeline ended (the server was promoted); WAL continues on `next_timeline`
    from `next_start_lsn`."""

    next_timeline: int
    next_start_lsn: int


Message = WalData | Keepalive | TimelineEnd


_F = TypeVar("_F", bound=Callable[..., Any])


def _translated(func: _F) -> _F:
    """libpq calls raise psycopg errors when the connection drops: drbot's error instead."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except psycopg.Error as exc:
            raise SourceUnavailable(f"replication connection lost: {exc}") from None

    return wrapper  # type: ignore[return-value]


def _size_setting(text: str) -> int:
    units = {"kB": 1024, "MB": 1024**2, "GB": 1024**3}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


class ReplicationConnection:
    """One physical replication connection to a source."""

    def __init__(self, conninfo: str, *, password: str | None = None, where: str = "") -> None:
        extra = {"password": password} if password is not None else {}
        full = make_conninfo(conninfo, replication="true", application_name="drbot", **extra)
        self._pg = pq.PGconn.connect(full.encode())
        if self._pg.status != pq.ConnStatus.OK:
            message = self._error()
            self._pg.finish()
            raise SourceUnavailable(
                f"cannot open a replication connection to {where or 'the source'}: {message}",
                hint="the user needs the REPLICATION attribute and a 'replication' line in "
                "pg_hba.conf",
            )
        self._streaming = False

    def close(self) -> None:
        self._pg.finish()

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _error(self) -> str:
        return self._pg.get_error_message(encoding="utf-8").strip() or "connection lost"

    def _command(self, command: str) -> list[tuple[str | None, ...]]:
        result = self._pg.exec_(command.encode())
        if result.status == pq.ExecStatus.TUPLES_OK:
            return [
                tuple(
                    None if (v := result.get_value(r, c)) is None else bytes(v).decode()
                    for c in range(result.nfields)
                )
                for r in range(result.ntuples)
            ]
        if result.status == pq.ExecStatus.COMMAND_OK:
            return []
        if self._pg.status != pq.ConnStatus.OK:
            raise SourceUnavailable(f"replication connection lost: {self._error()}")
        message = result.get_error_message(encoding="utf-8").strip()
        raise DatabaseError(f"the server refused {command.split(maxsplit=1)[0]}: {message}")

    @_translated
    def identify_system(self) -> SystemInfo:
        row = self._command("IDENTIFY_SYSTEM")[0]
        return SystemInfo(int(str(row[0])), int(str(row[1])), parse_lsn(str(row[2])))

    @_translated
    def segment_size(self) -> int:
        return _size_setting(str(self._command("SHOW wal_segment_size")[0][0]))

    @_translated
    def timeline_history(self, timeline: int) -> tuple[str, bytes]:
        """The `<TLI>.history` file of `timeline` (file name, content)."""
        result = self._pg.exec_(f"TIMELINE_HISTORY {timeline}".encode())
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise DatabaseError(
                f"the server has no history of timeline {timeline}: "
                f"{result.get_error_message(encoding='utf-8').strip()}"
            )
        name, content = result.get_value(0, 0), result.get_value(0, 1)
        return bytes(name or b"").decode(), bytes(content or b"")

    @_translated
    def start(self, slot: str, start_lsn: int, timeline: int) -> None:
        """START_REPLICATION from `start_lsn` on `timeline` through `slot`."""
        lsn = f"{start_lsn >> 32:X}/{start_lsn & 0xFFFFFFFF:X}"
        command = f'START_REPLICATION SLOT "{slot}" PHYSICAL {lsn} TIMELINE {timeline}'
        result = self._pg.exec_(command.encode())
        if result.status != pq.ExecStatus.COPY_BOTH:
            message = result.get_error_message(encoding="utf-8").strip() or self._error()
            if self._pg.status != pq.ConnStatus.OK or "is active for PID" in message:
                # An earlier connection's walsender may still hold the slot: retry later.
                raise SourceUnavailable(f"cannot stream WAL yet: {message}")
            raise DatabaseError(f"the server refused to stream WAL: {message}")
        self._streaming = True
        self._pg.nonblocking = 1

    def messages(self, timeout: float) -> Iterator[Message]:
        """Messages that arrive within `timeout` seconds (none if nothing arrives)."""
        try:
            yield from self._messages(timeout)
        except psycopg.Error as exc:
            raise SourceUnavailable(f"WAL stream broke: {exc}") from None

    def _messages(self, timeout: float) -> Iterator[Message]:
        deadline = time.monotonic() + timeout
        while True:
            n, buf = self._pg.get_copy_data(1)
            if n > 0:
                yield self._parse(bytes(buf))
                continue
            if n == -1:
                yield self._end_of_timeline()
                return
            if n == -2:
                raise SourceUnavailable(f"WAL stream broke: {self._error()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select([self._pg.socket], [], [], remaining)
            if ready:
                try:
                    self._pg.consume_input()
                except psycopg.OperationalError as exc:
                    raise SourceUnavailable(f"WAL stream broke: {exc}") from None

    def _parse(self, msg: bytes) -> Message:
        kind = msg[:1]
        if kind == b"w":
            start, end, _ = _XLOGDATA.unpack_from(msg, 1)
            return WalData(start, msg[1 + _XLOGDATA.size :], end)
        if kind == b"k":
            end, _, reply = _KEEPALIVE.unpack_from(msg, 1)
            return Keepalive(end, bool(reply))
        raise DatabaseError(f"unexpected replication message {kind!r}")

    def _end_of_timeline(self) -> TimelineEnd:
        # The server ended the copy: answer with our own CopyDone, then read the next timeline.
        self._pg.nonblocking = 0
        self._pg.put_copy_end()
        self._pg.flush()
        self._streaming = False
        next_timeline, next_lsn = 0, 0
        while (result := self._pg.get_result()) is not None:
            if result.status == pq.ExecStatus.TUPLES_OK and result.ntuples:
                next_timeline = int(bytes(result.get_value(0, 0) or b"0").decode())
                next_lsn = parse_lsn(bytes(result.get_value(0, 1) or b"0/0").decode())
            elif result.status == pq.ExecStatus.FATAL_ERROR:
                raise SourceUnavailable(
                    f"WAL stream ended: {result.get_error_message(encoding='utf-8').strip()}"
                )
        if not next_timeline:
            raise SourceUnavailable("the server ended the WAL stream (shutting down?)")
        return TimelineEnd(next_timeline, next_lsn)

    @_translated
    def send_status(self, written: int, flushed: int, *, reply: bool = False) -> None:
        """Tell the server what drbot has received (`written`) and stored (`flushed`).

        The flush position is what moves the replication slot: only stored WAL goes there.
        With `reply`, the server answers at once with a keepalive carrying its WAL end.
        """
        if not self._streaming:
            return
        msg = _STATUS.pack(b"r", written, flushed, flushed, _pg_now_us(), 1 if reply else 0)
        if self._pg.put_copy_data(msg) != 1 or self._pg.flush() < 0:
            raise SourceUnavailable(f"WAL stream broke: {self._error()}")
