"""Keeping a drill's evidence: the signed record in every destination and locally, and the
audit event that points at it (by the record's SHA-256)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drbot.audit.trail import AuditSink
from drbot.drills.record import Stored, seal_record, store_record
from drbot.drills.runner import DrillReport
from drbot.storage.base import Storage


def keep_evidence(
    report: DrillReport,
    key: Ed25519PrivateKey,
    trail: AuditSink,
    state_dir: Path,
    storages: Sequence[Storage],
) -> tuple[dict[str, Any], Stored]:
    """Seal and store the record, then record `drill.completed` / `drill.failed`.

    Storing never raises for one destination (see `store_record`); the audit event names where
    the record landed. Raises what `AuditSink.record` raises.
    """
    envelope = seal_record(report.to_record(), key)
    stored = store_record(envelope, state_dir, storages)
    record = envelope["record"]
    trail.record(
        "drill.completed" if report.passed else "drill.failed",
        policy=report.policy,
        subject={"drill_id": report.drill_id, "backup_id": report.backup_id},
        outcome="ok" if report.passed else "failed",
        details={
            "destination": report.destination,
            "sandbox": report.sandbox,
            "restore_point": record["restore_point"],
            "rto_s": record["rto_s"],
            "rpo_s": record["rpo_s"],
            "targets": record["targets"],
            "checks": record["checks"],
            "record_sha256": envelope["sha256"],
            "stored_in": list(stored.destinations),
            "exit_code": report.exit_code,
            "error": record["error"],
        },
    )
    return envelope, stored
