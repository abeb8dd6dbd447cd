"""Retention planning as pure logic: the keep rules with their reasons, object lock, WAL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from drbot.ops.retention import BackupFacts, plan_retention
from drbot.policy.schema import Retention

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def _daily(days: int, *, per_day: int = 1, mode: str = "logical") -> list[BackupFacts]:
    out = []
    for d in range(days):
        for i in range(per_day):
            t = NOW - timedelta(days=d, hours=i * 3)
            size = 16 << 20 if mode == "physical" else None
            backup_id = t.strftime("%Y%m%dT%H%M%SZ-000000")
            out.append(BackupFacts(backup_id, t, mode, start_segment=1000 - d, segment_size=size))
    return out


def test_keep_last_keeps_the_newest_and_says_so() -> None:
    plan = plan_retention(_daily(5), Retention(keep_last=2), NOW)
    kept = sorted(plan.keep, reverse=True)
    assert len(kept) == 2 and len(plan.delete) == 3
    assert plan.keep[kept[0]] == ["newest backup", "last 1 of 2"]
    assert plan.keep[kept[1]] == ["last 2 of 2"]


def test_daily_keeps_the_newest_of_each_of_the_last_days_with_backups() -> None:
    backups = _daily(10, per_day=3)
    plan = plan_retention(backups, Retention(keep_daily=4), NOW)
    assert len(plan.keep) == 4 and len(plan.delete) == 26
    for backup_id, why in plan.keep.items():
        day = next(b for b in backups if b.backup_id == backup_id).started_at
        assert f"daily {day:%Y-%m-%d}" in why
        same_day = [b for b in backups if b.started_at.date() == day.date()]
        assert day == max(b.started_at for b in same_day)


def test_weekly_monthly_yearly_combine_and_one_backup_can_have_several_reasons() -> None:
    backups = _daily(800)
    plan = plan_retention(backups, Retention(keep_weekly=2, keep_monthly=3, keep_yearly=3), NOW)
    newest = max(backups, key=lambda b: b.started_at).backup_id
    assert {"newest backup", "weekly 2026-W48", "monthly 2026-11", "yearly 2026"} <= set(
        plan.keep[newest]
    )
    reasons = [r for why in plan.keep.values() for r in why]
    assert sum(r.startswith("weekly") for r in reasons) == 2
    assert sum(r.startswith("monthly") for r in reasons) == 3
    assert sum(r.startswith("yearly") for r in reasons) == 3
    assert len(plan.keep) + len(plan.delete) == 800


def test_object_lock_holds_what_the_rules_let_go_and_says_until_when() -> None:
    backups = _daily(4)
    locked = backups[-1]
    backups[-1] = BackupFacts(
        locked.backup_id, locked.started_at, "logical", locked_until=NOW + timedelta(days=2)
    )
    expired = backups[-2]
    backups[-2] = BackupFacts(
        expired.backup_id, expired.started_at, "logical", locked_until=NOW - timedelta(hours=1)
    )
    plan = plan_retention(backups, Retention(keep_last=1), NOW)
    assert plan.locked == {locked.backup_id: NOW + timedelta(days=2)}
    assert plan.keep[locked.backup_id] == [
        f"object lock until {(NOW + timedelta(days=2)).isoformat()}"
    ]
    assert expired.backup_id in plan.delete


def test_wal_is_kept_from_the_oldest_kept_base_backup_on() -> None:
    plan = plan_retention(_daily(6, mode="physical"), Retention(keep_last=3), NOW)
    assert plan.wal_before_segment == 1000 - 2  # the third newest starts there
    assert plan.wal_segment_size == 16 << 20
    # kept base backups that disagree on the segment size: no WAL is deleted at all
    mixed = _daily(6, mode="physical")
    mixed[1] = BackupFacts(mixed[1].backup_id, mixed[1].started_at, "physical", 999, 1 << 20)
    assert plan_retention(mixed, Retention(keep_last=3), NOW).wal_before_segment is None
    logical = plan_retention(_daily(6), Retention(keep_last=3), NOW)
    assert logical.wal_before_segment is None or all(b.mode == "logical" for b in _daily(6))
    assert plan_retention([], Retention(keep_last=3), NOW).delete == []
