"""Compliance evidence for a period, built from the audit trail alone (pure: no I/O).

For each policy: its backups, restores, drills, verifications, key events and failures in the
period, and a verdict per control, each with the sequence numbers of the events that show it:

- backups_on_schedule: as many completed backups as the full-backup schedule fired;
- encryption_in_force: every backup was made under a recorded key (drbot cannot write an
  unencrypted one; the event shows which key);
- copies_in_two_regions: every completed backup has verified copies in two or more regions;
- immutability: every destination of every backup had object lock;
- restore_tested: at least one restore (or drill) completed with its data check passing, and
  within the RTO target when the policy sets one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from drbot.audit.event import AuditEvent
from drbot.policy.cron import schedule_trigger

MET = "met"
NOT_MET = "not met"
NOT_APPLICABLE = "not applicable"


@dataclass(frozen=True)
class PolicyFacts:
    """What the policy says (from its file): schedule and targets the evidence is judged by."""

    name: str
    full_schedule: str | None = None
    rto: timedelta | None = None


def event_time(event: AuditEvent) -> datetime:
    """When the event happened, timezone-aware UTC."""
    return datetime.fromisoformat(event.time)


def scheduled_runs(cron: str, since: datetime, until: datetime) -> int:
    """How often a schedule (5-field UTC cron, or `@every` counted from `since`) fired in
    [since, until)."""
    trigger = schedule_trigger(cron, start=since)
    count = 0
    previous = None
    now = since - timedelta(microseconds=1)
    while True:
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire >= until:
            return count
        count += 1
        previous = fire
        now = fire + timedelta(microseconds=1)


def _control(status: str, reason: str, events: Sequence[AuditEvent]) -> dict[str, Any]:
    return {"status": status, "reason": reason, "events": [e.seq for e in events]}


def build_evidence(
    events: Sequence[AuditEvent],
    *,
    since: datetime,
    until: datetime,
    policies: Sequence[PolicyFacts],
) -> dict[str, Any]:
    """The evidence document (JSON-ready) for `policies` over [since, until)."""
    in_period = [e for e in events if since <= event_time(e) < until]
    out: dict[str, Any] = {
        "period": {"since": since.isoformat(), "until": until.isoformat()},
        "policies": {},
    }
    for facts in policies:
        mine = [e for e in in_period if e.policy == facts.name]
        # A backup completed in the period may have started just before it.
        started = {
            e.subject.get("backup_id"): e
            for e in events
            if e.policy == facts.name and e.action == "backup.started"
        }
        out["policies"][facts.name] = _policy_evidence(facts, mine, started, since, until)
        out["policies"][facts.name]["facts"] = {
            "full_schedule": facts.full_schedule,
            "rto_s": None if facts.rto is None else facts.rto.total_seconds(),
        }
    out["key_events"] = [_brief(e) for e in in_period if e.action.startswith("key.")]
    out["daemon_events"] = [_brief(e) for e in in_period if e.action.startswith("daemon.")]
    return out


def _brief(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "time": event.time,
        "action": event.action,
        "outcome": event.outcome,
        "actor": event.actor,
        "subject": event.subject,
        "details": event.details,
    }


def _policy_evidence(
    facts: PolicyFacts,
    events: Sequence[AuditEvent],
    started: dict[Any, AuditEvent],
    since: datetime,
    until: datetime,
) -> dict[str, Any]:
    completed = [
        e for e in events if e.action == "backup.completed" and e.outcome in ("ok", "partial")
    ]
    failed = [e for e in events if e.outcome == "failed"]
    restores = [e for e in events if e.action in ("restore.completed", "drill.completed")]
    backups = []
    for e in completed:
        start = started.get(e.subject.get("backup_id"))
        dests = (start.details.get("destinations", {}) if start else {}) or {}
        ok = list(e.details.get("destinations_ok", []))
        backups.append(
            {
                "id": e.subject.get("backup_id"),
                "type": e.details.get("type"),
                "started_at": e.details.get("started_at"),
                "completed_at": e.details.get("completed_at"),
                "plaintext_bytes": e.details.get("plaintext_bytes"),
                "stored_bytes": e.details.get("stored_bytes"),
                "manifest_sha256": e.details.get("manifest_sha256"),
                "key": start.details.get("key") if start else None,
                "key_ids": start.details.get("key_ids", {}) if start else {},
                "destinations": {
                    name: _copy(dests.get(name) or {}, e.details.get("completed_at")) for name in ok
                },
                "failed_destinations": e.details.get("destinations_failed", {}),
                "outcome": e.outcome,
                "events": [x.seq for x in (start, e) if x is not None],
            }
        )
    return {
        "backups": backups,
        "restores": [_brief(e) for e in restores],
        "drills": [_drill(e) for e in events if e.action in ("drill.completed", "drill.failed")],
        "retention": [_brief(e) for e in events if e.action.startswith("prune.")],
        "verifications": [_brief(e) for e in events if e.action.startswith("verify.")],
        "failures": [_brief(e) for e in failed],
        "policy_changes": [_brief(e) for e in events if e.action.startswith("policy.")],
        # Which daemon acted for the policy, and when that changed hands.
        "leases": [_brief(e) for e in events if e.action.startswith("lease.")],
        "controls": _controls(facts, completed, backups, restores, since, until),
    }


def _drill(event: AuditEvent) -> dict[str, Any]:
    """A drill as evidence: what was restored from where, RTO/RPO against targets, checks."""
    d = event.details
    return {
        "seq": event.seq,
        "time": event.time,
        "drill_id": event.subject.get("drill_id"),
        "backup_id": event.subject.get("backup_id"),
        "destination": d.get("destination"),
        "sandbox": d.get("sandbox"),
        "restore_point": d.get("restore_point"),
        "rto_s": d.get("rto_s"),
        "rpo_s": d.get("rpo_s"),
        "targets": d.get("targets", {}),
        "checks": d.get("checks", []),
        "passed": event.outcome == "ok",
        "error": d.get("error"),
        "record_sha256": d.get("record_sha256"),
    }


def _copy(destination: dict[str, Any], completed_at: str | None) -> dict[str, Any]:
    """Region and object lock of one copy, with the date its lock holds until."""
    lock = destination.get("object_lock")
    retain_until = None
    if lock and completed_at:
        days = timedelta(days=int(lock.get("days", 0)))
        retain_until = (datetime.fromisoformat(completed_at) + days).isoformat()
    return {"region": destination.get("region"), "object_lock": lock, "retain_until": retain_until}


def _controls(
    facts: PolicyFacts,
    completed: Sequence[AuditEvent],
    backups: Sequence[dict[str, Any]],
    restores: Sequence[AuditEvent],
    since: datetime,
    until: datetime,
) -> dict[str, dict[str, Any]]:
    controls: dict[str, dict[str, Any]] = {}
    if facts.full_schedule is None:
        controls["backups_on_schedule"] = _control(
            NOT_APPLICABLE, "the policy schedules no full backups", completed
        )
    else:
        expected = scheduled_runs(facts.full_schedule, since, until)
        status = MET if len(completed) >= expected else NOT_MET
        controls["backups_on_schedule"] = _control(
            status,
            f"{len(completed)} completed backup(s); the schedule {facts.full_schedule!r} "
            f"fired {expected} time(s) in the period",
            completed,
        )
    checks: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
        "encryption_in_force": (
            lambda b: bool(b["key"]),
            "record the key that encrypted them",
        ),
        "copies_in_two_regions": (
            lambda b: len({d["region"] for d in b["destinations"].values() if d["region"]}) >= 2,
            "have verified copies in 2+ regions",
        ),
        "immutability": (
            lambda b: (
                bool(b["destinations"])
                and all(d["object_lock"] for d in b["destinations"].values())
            ),
            "stored only under object lock",
        ),
    }
    for name, (holds, says) in checks.items():
        passing = [b for b in backups if holds(b)]
        controls[name] = _control(
            MET if backups and len(passing) == len(backups) else NOT_MET,
            f"{len(passing)} of {len(backups)} backup(s) {says}"
            if backups
            else "no backups in the period",
            completed,
        )
    controls["restore_tested"] = _restore_control(facts, restores)
    return controls


def _restore_seconds(event: AuditEvent, default: float) -> float:
    """How long a restore took: a restore's duration, or a drill's RTO (drill start to checks
    passed)."""
    d = event.details
    value = d.get("duration_s", d.get("rto_s"))
    return default if value is None else float(value)


def _restore_control(facts: PolicyFacts, restores: Sequence[AuditEvent]) -> dict[str, Any]:
    passed = [
        e
        for e in restores
        # A drill passes only when all its checks (data checks included) passed.
        if e.outcome == "ok"
        and (e.action == "drill.completed" or e.details.get("fingerprint_checked", False))
    ]
    if not passed:
        return _control(NOT_MET, "no restore with a passing data check in the period", restores)
    if facts.rto is None:
        return _control(MET, f"{len(passed)} restore(s) with a passing data check", passed)
    rto = facts.rto.total_seconds()
    within = [e for e in passed if _restore_seconds(e, rto + 1) <= rto]
    return _control(
        MET if within else NOT_MET,
        f"{len(within)} of {len(passed)} passing restore(s) within the RTO of {rto:g}s",
        passed,
    )
