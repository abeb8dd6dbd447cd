"""The audit events of operations: what each backup, verify and restore leaves in the trail.

Kept in one place so every caller (the CLI today, the daemon later) records the same events
with the same fields; `docs/audit.md` lists them.
"""

from __future__ import annotations

from drbot.audit.trail import AuditSink
from drbot.ops.backup import BackupResult
from drbot.ops.restore import RestorePlan, RestoreResult
from drbot.ops.verify import VerifyReport


def record_backup(trail: AuditSink, policy: str, result: BackupResult, backup_type: str) -> None:
    """`artifact.stored` per artifact and destination, then `backup.completed`."""
    subject = {"backup_id": result.backup_id}
    for destination, records in result.artifacts.items():
        for rec in records:
            trail.record(
                "artifact.stored",
                policy=policy,
                subject={**subject, "destination": destination, "artifact": rec.name},
                details={
                    "key": rec.key,
                    "size_bytes": rec.size_bytes,
                    "sha256": rec.sha256,
                    "verified": "read back, size and SHA-256 match",
                },
            )
    trail.record(
        "backup.completed",
        policy=policy,
        subject=subject,
        outcome="partial" if result.partial else "ok",
        details={
            "type": backup_type,
            "started_at": result.started_at.isoformat(),
            "completed_at": result.completed_at.isoformat(),
            "source_version": result.source_version,
            "databases": list(result.databases),
            "plaintext_bytes": result.plaintext_bytes,
            "stored_bytes": result.stored_bytes,
            "manifest_sha256": result.manifest_sha256,
            "destinations_ok": list(result.destinations_ok),
            "destinations_failed": result.destinations_failed,
            "positions": result.positions or None,
        },
    )


def record_verify(trail: AuditSink, policy: str, report: VerifyReport) -> None:
    trail.record(
        "verify.completed",
        policy=policy,
        subject={"backups": report.backups},
        outcome="ok" if report.ok else "failed",
        details={
            "checked_objects": report.checked_objects,
            "checked_bytes": report.checked_bytes,
            "problems": [
                {
                    "destination": f.destination,
                    "backup_id": f.backup_id,
                    "key": f.key,
                    "problem": f.problem,
                }
                for f in report.findings
            ],
            "unreachable": report.unreachable,
        },
    )


def restore_subject(plan: RestorePlan) -> dict[str, object]:
    return {"backup_id": plan.backup_id, "database": plan.database, "target": plan.target}


def record_restore_planned(trail: AuditSink, plan: RestorePlan, *, dry_run: bool) -> None:
    trail.record(
        "restore.planned",
        policy=plan.policy,
        subject=restore_subject(plan),
        outcome="info",
        details={
            "dry_run": dry_run,
            "sources": list(plan.sources),
            "artifacts": [a.name for a in plan.artifacts],
            "replace": plan.replace,
        },
    )


def record_restore_completed(trail: AuditSink, plan: RestorePlan, result: RestoreResult) -> None:
    trail.record(
        "restore.completed",
        policy=plan.policy,
        subject=restore_subject(plan),
        outcome="ok" if not result.mismatches else "failed",
        details={
            "source": result.source,
            "duration_s": result.duration_s,
            "fingerprint_checked": result.fingerprint_checked,
            "mismatches": [f"{m.table}: {m.problem}" for m in result.mismatches],
            "failed_sources": result.failed_sources,
        },
    )
