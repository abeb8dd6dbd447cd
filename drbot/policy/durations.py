"""Durations as people write them in policies: "30s", "5m", "1h30m", "7d".

A duration is one or more `<whole number><unit>` parts with units d, h, m, s, each at most once
and in that order. The model keeps a `timedelta` and writes it back in the same shortest form,
so `format_duration(parse_duration(text))` is the canonical spelling of `text`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

DURATION_PATTERN = r"^(?=\d)(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?$"
_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
_HELP = "write a number and a unit (d, h, m, s), e.g. '30s', '5m', '1h30m', '7d'"


def parse_duration(text: str) -> timedelta:
    """The timedelta that `text` names.

    Raises ValueError (whose message says how to write one) for anything else, including an
    empty string, a bare number, fractions, spaces or a zero duration.
    """
    match = _DURATION_RE.match(text)
    if not text or match is None:
        raise ValueError(f"invalid duration {text!r}; {_HELP}")
    seconds = sum(
        int(part) * factor
        for part, (_, factor) in zip(match.groups(), _UNITS, strict=True)
        if part is not None
    )
    if seconds == 0:
        raise ValueError(f"duration {text!r} is zero; it must be longer than 0s")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """`value` in the shortest policy spelling ("1h30m"); ValueError unless whole seconds > 0."""
    if value.microseconds or value <= timedelta(0):
        raise ValueError(f"duration {value} must be a positive whole number of seconds")
    remaining = int(value.total_seconds())
    parts: list[str] = []
    for unit, factor in _UNITS:
        count, remaining = divmod(remaining, factor)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _coerce(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        # Going through the text form applies the same rules as YAML input does.
        return parse_duration(format_duration(value))
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"a duration must be text with a unit; {_HELP}")


Duration = Annotated[
    timedelta,
    BeforeValidator(_coerce),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": DURATION_PATTERN, "description": f"a duration: {_HELP}"}
    ),
]
"""A positive whole-second timedelta, read from and written as "1h30m"-style text."""
