"""Schedules: cron expressions as crontab(5) defines them, or `@every DURATION`, turned into
APScheduler triggers.

`@every 30s` / `@every 6h` runs at a fixed interval counted from the daemon's start; it is
for short intervals (demos, tests) and for "every N hours, whenever" jobs. Cron is read in UTC.

APScheduler 3's `CronTrigger.from_crontab` numbers weekdays from Monday (0 = Monday), while
crontab numbers them from Sunday (0 and 7 = Sunday, 1 = Monday). A policy that says
`0 6 * * 1` means Monday; read through `from_crontab` it would run on Tuesday. So the
day-of-week field is translated here into weekday names, which both agree on.
"""

from __future__ import annotations

from datetime import datetime

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from drbot.policy.durations import parse_duration

EVERY = "@every "

_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _day(token: str) -> int:
    token = token.strip().lower()
    if token[:3] in _NAMES and not token.isdigit():
        return _NAMES.index(token[:3])
    value = int(token)  # ValueError for anything else
    if not 0 <= value <= 7:
        raise ValueError(f"day of week {value} is not 0-7")
    return value % 7


def crontab_days(field: str) -> str:
    """A crontab day-of-week field as APScheduler weekday names ('*' stays '*')."""
    if field == "*":
        return field
    days: set[int] = set()
    for item in field.split(","):
        span, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"step {step} in day of week {field!r}")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            low, high = span.split("-", 1)
            first, last = _day(low), _day(high)
            if high.strip() == "7":
                last = 7  # "5-7" is Friday to Sunday
            if last < first:
                raise ValueError(f"day-of-week range {span!r} runs backwards")
        else:
            first = last = _day(span)
            if step_text:
                last = 6  # "1/2" means from Monday on, every other day
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_NAMES[d] for d in sorted(days))


def cron_trigger(expr: str) -> CronTrigger:
    """The trigger for a 5-field UTC crontab expression; ValueError if it is not one."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields, got {len(fields)}")
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=crontab_days(weekday),
        timezone="UTC",
    )


def schedule_trigger(expr: str, *, start: datetime | None = None) -> CronTrigger | IntervalTrigger:
    """The trigger for a schedule: `@every DURATION` (counted from `start`, default now) or a
    5-field UTC crontab expression. ValueError (saying what is wrong) for anything else."""
    if expr.startswith(EVERY):
        every = parse_duration(expr[len(EVERY) :].strip())
        return IntervalTrigger(seconds=int(every.total_seconds()), start_date=start, timezone="UTC")
    return cron_trigger(expr)
