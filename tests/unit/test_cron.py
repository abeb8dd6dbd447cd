"""Policy cron expressions mean what crontab(5) says, weekdays included."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from drbot.policy.cron import cron_trigger, crontab_days

pytestmark = pytest.mark.unit

SUNDAY = datetime(2026, 11, 22, tzinfo=UTC)  # a Sunday


def _weekdays(expr: str) -> list[str]:
    """Names of the days the expression fires on during the week starting SUNDAY."""
    trigger = cron_trigger(expr)
    fired: list[str] = []
    previous, now = None, SUNDAY
    while True:
        fire = trigger.get_next_fire_time(previous, now)
        assert fire is not None
        if (fire - SUNDAY).days >= 7:
            return fired
        fired.append(fire.strftime("%a").lower())
        previous, now = fire, fire.replace(second=1)


@pytest.mark.parametrize(
    ("expr", "days"),
    [
        ("0 6 * * 1", ["mon"]),
        ("0 6 * * 0", ["sun"]),
        ("0 6 * * 7", ["sun"]),
        ("0 6 * * 1-5", ["mon", "tue", "wed", "thu", "fri"]),
        ("0 6 * * */2", ["sun", "tue", "thu", "sat"]),
        ("0 6 * * 5-7", ["sun", "fri", "sat"]),
        ("0 6 * * sat,sun", ["sun", "sat"]),
        ("0 6 * * MON", ["mon"]),
    ],
)
def test_weekdays_follow_crontab_not_apscheduler_numbering(expr: str, days: list[str]) -> None:
    assert _weekdays(expr) == days


def test_star_stays_star_and_other_fields_are_untouched() -> None:
    assert crontab_days("*") == "*"
    assert len(_weekdays("0 2 * * *")) == 7


@pytest.mark.parametrize("bad", ["0 6 * *", "0 6 * * 8", "0 6 * * 5-1", "0 6 * * x", "61 * * * *"])
def test_invalid_expressions_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"."):  # APScheduler's or drbot's own message
        cron_trigger(bad)
