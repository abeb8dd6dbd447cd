"""Cluster times as drbot writes them in manifests, slice names and reports."""

from __future__ import annotations

from datetime import UTC, datetime

from bson.timestamp import Timestamp


def ts_text(ts: Timestamp) -> str:
    """'SECONDS.INCREMENT', e.g. '1764633600.7' (sorts correctly only as a pair, see ts_key)."""
    return f"{ts.time}.{ts.inc}"


def ts_parse(text: str) -> Timestamp:
    """The Timestamp written by `ts_text`; ValueError otherwise."""
    secs, sep, inc = text.partition(".")
    if not sep or not secs.isdigit() or not inc.isdigit():
        raise ValueError(f"not a cluster time: {text!r} (want SECONDS.INCREMENT)")
    return Timestamp(int(secs), int(inc))


def ts_key(ts: Timestamp) -> int:
    """One integer that orders cluster times (seconds in the high 32 bits)."""
    return (ts.time << 32) | ts.inc


def ts_datetime(ts: Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.time, UTC)


def ts_at(moment: datetime) -> Timestamp:
    """The last cluster time at or before `moment` (whole seconds; the increment saturates)."""
    return Timestamp(int(moment.timestamp()), 0xFFFFFFFF)
