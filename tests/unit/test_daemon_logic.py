"""The daemon's pure decisions: which missed runs to catch up, and what the RPO is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from drbot.daemon.jobs import exit_name
from drbot.daemon.service import missed_run, newest_restore_point

T = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("expr", "last", "now", "kind", "expected"),
    [
        # Never ran: only a full backup runs at once.
        ("0 2 * * *", None, T, "full", True),
        ("0 2 * * *", None, T, "drill", False),
        ("0 2 * * *", None, T, "verify", False),
        # Ran after the last fire: nothing missed.
        ("0 2 * * *", T.replace(hour=2, minute=0, second=5), T, "full", False),
        # Missed today's 02:00 (last run yesterday 02:00); next is in 14 h: catch up once.
        ("0 2 * * *", T.replace(hour=2) - timedelta(days=1), T, "full", True),
        # Down for a week: still one catch-up (the caller runs it once, not seven times).
        ("0 2 * * *", T - timedelta(days=7), T, "drill", True),
        # Missed 11:05; the next run (12:05) is 5 min away, under a quarter period: skip.
        ("5 * * * *", T - timedelta(hours=1, minutes=30), T, "full", False),
        # Missed 11:05, next at 12:05 is 5 min away of a 60 min period: skip (< 25 %).
        ("5 * * * *", T.replace(hour=11, minute=0), T.replace(minute=0), "full", False),
        # Missed 11:05 and next is 50 min away: catch up.
        ("5 * * * *", T.replace(hour=10, minute=6), T.replace(minute=15), "full", True),
        # @every: counted from the last run.
        ("@every 10m", T - timedelta(minutes=5), T, "full", False),
        ("@every 10m", T - timedelta(minutes=25), T, "full", True),
        ("@every 10m", T - timedelta(minutes=19, seconds=30), T, "full", False),
    ],
)
def test_missed_run(
    expr: str, last: datetime | None, now: datetime, kind: str, expected: bool
) -> None:
    assert missed_run(expr, last, now, kind=kind) is expected


@pytest.mark.unit
def test_newest_restore_point_takes_wal_windows_and_dump_starts() -> None:
    rows = [
        {
            "mode": "logical",
            "started_at": "2026-11-23T10:00:00+00:00",
            "completed_at": "2026-11-23T10:05:00+00:00",
            "restorable": None,
        },
        {
            "mode": "physical",
            "started_at": "2026-11-23T09:00:00+00:00",
            "completed_at": "2026-11-23T09:01:00+00:00",
            "restorable": {"to_time": "2026-11-23T11:59:50+00:00"},
        },
        {
            "mode": "physical",
            "started_at": "2026-11-23T11:00:00+00:00",
            "completed_at": "2026-11-23T11:01:00+00:00",
            "restorable": {"to_time": None},
        },
    ]
    assert newest_restore_point(rows) == datetime(2026, 11, 23, 11, 59, 50, tzinfo=UTC)
    assert newest_restore_point(rows[:1]) == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert newest_restore_point(rows[2:]) == datetime(2026, 11, 23, 11, 1, tzinfo=UTC)
    assert newest_restore_point([]) is None


@pytest.mark.unit
def test_exit_names_label_failures() -> None:
    assert exit_name(15) == "storage_unreachable"
    assert exit_name(130) == "interrupted"
    assert exit_name(-9) == "killed"
    assert exit_name(77) == "exit_77"


def test_a_cron_incremental_is_a_scheduled_job_for_mongodb_only() -> None:
    from drbot.daemon.service import Daemon as _Daemon
    from drbot.policy.schema import Policy as _Policy

    def policy(kind: str, uri: str, incremental: str) -> _Policy:
        return _Policy.model_validate(
            {
                "version": 1,
                "name": "p",
                "source": {
                    "kind": kind,
                    "uri": uri,
                    "mode": "physical" if kind == "postgresql" else None,
                },
                "schedule": {"full": "0 2 * * *", "incremental": incremental, "verify": None},
                "encryption": {"key": "file:/k/p.key"},
                "destinations": [{"name": "d", "url": "file:///tmp/d"}],
            }
        )

    mongo = policy("mongodb", "mongodb://h:27017", "*/15 * * * *")
    assert _Daemon._jobs(mongo) == {"full": "0 2 * * *", "incremental": "*/15 * * * *"}
    streaming = policy("mongodb", "mongodb://h:27017", "continuous")
    assert "incremental" not in _Daemon._jobs(streaming)
