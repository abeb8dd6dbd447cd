"""Evidence controls are judged from the events alone, as documented in drbot/audit/evidence.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from drbot.audit.event import AuditEvent
from drbot.audit.evidence import PolicyFacts, build_evidence, scheduled_runs

pytestmark = pytest.mark.unit

SINCE = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
UNTIL = SINCE + timedelta(days=7)
_seq = iter(range(1, 10_000))


def _event(day: int, action: str, outcome: str = "ok", **fields: Any) -> AuditEvent:
    when = SINCE + timedelta(days=day, hours=3)
    return AuditEvent(
        seq=next(_seq),
        time=when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        actor="t@h",
        host="h",
        action=action,
        policy="shop",
        outcome=outcome,
        subject=fields.pop("subject", {}),
        details=fields.pop("details", {}),
    )


def _backup(day: int, regions: tuple[str | None, ...], locked: bool) -> list[AuditEvent]:
    bid = f"b{day}"
    dests = {
        f"d{i}": {
            "url": "s3://x",
            "region": r,
            "object_lock": {"mode": "governance"} if locked else None,
        }
        for i, r in enumerate(regions)
    }
    return [
        _event(
            day,
            "backup.started",
            subject={"backup_id": bid},
            details={"destinations": dests, "key": "file:/k"},
        ),
        _event(
            day,
            "backup.completed",
            subject={"backup_id": bid},
            details={
                "destinations_ok": list(dests),
                "completed_at": (SINCE + timedelta(days=day)).isoformat(),
            },
        ),
    ]


def _controls(events: list[AuditEvent], facts: PolicyFacts) -> dict[str, str]:
    doc = build_evidence(events, since=SINCE, until=UNTIL, policies=[facts])
    return {k: v["status"] for k, v in doc["policies"]["shop"]["controls"].items()}


def test_a_week_of_daily_locked_two_region_backups_and_a_fast_restore_meets_everything() -> None:
    events = [e for day in range(7) for e in _backup(day, ("us-east-1", "eu-west-1"), True)]
    events.append(
        _event(6, "restore.completed", details={"duration_s": 60.0, "fingerprint_checked": True})
    )
    facts = PolicyFacts("shop", full_schedule="0 2 * * *", rto=timedelta(minutes=30))
    assert set(_controls(events, facts).values()) == {"met"}


def test_missed_runs_one_region_no_lock_and_a_slow_restore_are_not_met() -> None:
    events = [e for day in range(5) for e in _backup(day, ("us-east-1", "us-east-1"), False)]
    events.append(
        _event(6, "restore.completed", details={"duration_s": 4000.0, "fingerprint_checked": True})
    )
    facts = PolicyFacts("shop", full_schedule="0 2 * * *", rto=timedelta(minutes=30))
    assert _controls(events, facts) == {
        "backups_on_schedule": "not met",  # 5 of 7
        "encryption_in_force": "met",
        "copies_in_two_regions": "not met",
        "immutability": "not met",
        "restore_tested": "not met",  # slower than the RTO
    }


def test_events_outside_the_period_do_not_count() -> None:
    events = _backup(-3, ("us-east-1", "eu-west-1"), True) + _backup(9, ("a", "b"), True)
    doc = build_evidence(events, since=SINCE, until=UNTIL, policies=[PolicyFacts("shop")])
    assert doc["policies"]["shop"]["backups"] == []
    assert doc["policies"]["shop"]["controls"]["restore_tested"]["status"] == "not met"


def test_weekly_schedule_counts_mondays() -> None:
    assert scheduled_runs("0 6 * * 1", SINCE, SINCE + timedelta(days=28)) == 4


def test_drills_are_listed_and_a_passing_drill_within_the_rto_tests_restores() -> None:
    facts = PolicyFacts("shop", rto=timedelta(minutes=30))
    checks = [{"name": "amcheck", "passed": True, "detail": "ok"}]
    fast = _event(
        2,
        "drill.completed",
        subject={"drill_id": "d1", "backup_id": "b1"},
        details={"destination": "east", "rto_s": 42.0, "rpo_s": 3.0, "checks": checks},
    )
    slow = _event(
        3,
        "drill.failed",
        "failed",
        subject={"drill_id": "d2", "backup_id": "b1"},
        details={"destination": "west", "rto_s": 4000.0, "rpo_s": 3.0, "checks": checks},
    )
    doc = build_evidence([slow], since=SINCE, until=UNTIL, policies=[facts])
    assert doc["policies"]["shop"]["controls"]["restore_tested"]["status"] == "not met"
    doc = build_evidence([fast, slow], since=SINCE, until=UNTIL, policies=[facts])
    shop = doc["policies"]["shop"]
    assert shop["controls"]["restore_tested"]["status"] == "met"
    assert [(d["drill_id"], d["destination"], d["passed"]) for d in shop["drills"]] == [
        ("d1", "east", True),
        ("d2", "west", False),
    ]
    slow_only = _event(4, "drill.completed", details={"rto_s": 4000.0, "checks": checks})
    doc = build_evidence([slow_only], since=SINCE, until=UNTIL, policies=[facts])
    assert doc["policies"]["shop"]["controls"]["restore_tested"]["status"] == "not met"


def test_lease_and_daemon_events_are_part_of_the_evidence() -> None:
    """Who acted for a policy (lease changes) and daemon starts/stops are exported as recorded."""
    taken = _event(1, "lease.acquired", subject={"host": "db1"}, details={"holder": "db1:7:aa"})
    lost = _event(2, "lease.lost", outcome="failed", details={"holder": "db2:9:bb"})
    started = _event(1, "daemon.started", details={"policies": ["shop"]})
    doc = build_evidence(
        [started, taken, lost, _event(9, "lease.acquired")],
        since=SINCE,
        until=UNTIL,
        policies=[PolicyFacts("shop")],
    )
    leases = doc["policies"]["shop"]["leases"]
    assert [(e["action"], e["outcome"]) for e in leases] == [
        ("lease.acquired", "ok"),
        ("lease.lost", "failed"),
    ]
    assert [e["action"] for e in doc["daemon_events"]] == ["daemon.started"]
    assert lost.seq in [e["seq"] for e in doc["policies"]["shop"]["failures"]]
