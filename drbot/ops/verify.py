"""Verify stored backups: download every artifact, check SHA-256, authenticate every frame."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from drbot.catalog import Copy, scan_catalog
from drbot.errors import DrbotError, KeyProblem, NoRestorePoint, StorageUnavailable
from drbot.ops.artifacts import read_artifact
from drbot.ops.changeverify import verify_changes
from drbot.ops.walverify import WalVerifyResult, verify_wal
from drbot.pipeline.keys import KeyProvider
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Finding:
    """One problem found by verify, naming where it is."""

    destination: str
    backup_id: str
    key: str
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    """What was checked and what was wrong."""

    checked_objects: int = 0
    checked_bytes: int = 0
    backups: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings and not self.unreachable


def _merge(report: VerifyReport, wal: WalVerifyResult) -> None:
    report.findings.extend(
        Finding(f.destination, f.subject, f.key, f.problem) for f in wal.findings
    )
    for dest, why in wal.unreachable.items():
        report.unreachable.setdefault(dest, why)


def _check_copy(
    policy: str,
    backup_id: str,
    copy: Copy,
    storage: Storage,
    report: VerifyReport,
    nbytes: int,
    progress: Callable[[str, str, int], None] | None,
) -> tuple[int, int]:
    """Read back every artifact of one copy; (objects checked, bytes so far)."""
    checked = 0
    for rec in copy.manifest.artifacts:
        try:
            with contextlib.closing(read_artifact(storage, rec, copy.data_key)) as chunks:
                for chunk in chunks:
                    nbytes += len(chunk)
                    if progress is not None:
                        progress(copy.destination, rec.name, nbytes)
            checked += 1
        except StorageUnavailable as exc:
            # Not a finding about the data: the copy could not be read at all.
            report.unreachable[copy.destination] = exc.message
            log.error(
                "verify.unreachable",
                policy=policy,
                backup_id=backup_id,
                destination=copy.destination,
                error=exc.message,
            )
            break
        except DrbotError as exc:
            report.findings.append(Finding(copy.destination, backup_id, rec.key, exc.message))
            log.error(
                "verify.failed",
                policy=policy,
                backup_id=backup_id,
                destination=copy.destination,
                key=rec.key,
                error=exc.message,
            )
    return checked, nbytes


def run_verify(
    policy: str,
    storages: Sequence[Storage],
    keys: KeyProvider,
    *,
    backup_id: str | None = None,
    sample: int | None = None,
    rng: random.Random | None = None,
    progress: Callable[[str, str, int], None] | None = None,
) -> VerifyReport:
    """Check every (or one) backup of `policy` in each of `storages`, and (unless one backup
    or a sample is asked for) every WAL object and the continuity of each physical chain.

    `sample` checks the newest backup and `sample - 1` others picked at random (`rng`), each
    in every destination: the daemon's daily spot check, cheap enough to run on any archive.

    Raises `NoRestorePoint` if `backup_id` is given and no destination has it (nor a damaged
    manifest for it), and `KeyProblem` if no manifest at all opens with the policy key.
    Everything else wrong is a `Finding` in the report.
    """
    scan = scan_catalog(policy, storages, keys)
    report = VerifyReport(unreachable={d: str(e) for d, e in scan.unreachable.items()})
    report.findings.extend(
        Finding(p.destination, p.backup_id, p.key, str(p.error))
        for p in scan.problems
        if backup_id is None or p.backup_id == backup_id
    )
    key_problems = [p.error for p in scan.problems if isinstance(p.error, KeyProblem)]
    if key_problems and not scan.backups:
        raise key_problems[0]
    backups = scan.backups
    if backup_id is not None:
        backups = [b for b in backups if b.backup_id == backup_id]
        if not backups and not report.findings:
            raise NoRestorePoint(f"no backup {backup_id} of policy {policy!r} in the destinations")
    if sample is not None and len(backups) > sample:
        *older, newest = sorted(backups, key=lambda b: b.backup_id)
        # Not security: which old backups the spot check reads.
        picked = (rng or random.Random()).sample(older, sample - 1) if sample > 1 else []  # noqa: S311
        backups = sorted([*picked, newest], key=lambda b: b.backup_id)
    by_name = {s.name: s for s in storages}
    checked = 0
    nbytes = 0
    for backup in backups:
        report.backups.append(backup.backup_id)
        for copy in backup.copies:
            n, nbytes = _check_copy(
                policy, backup.backup_id, copy, by_name[copy.destination], report, nbytes, progress
            )
            checked += n
    if backup_id is None and sample is None:
        for part in (verify_wal, verify_changes):
            found = part(policy, storages, keys, scan, progress)
            checked, nbytes = checked + found.checked_objects, nbytes + found.checked_bytes
            _merge(report, found)
    result = VerifyReport(checked, nbytes, report.backups, report.findings, report.unreachable)
    log.info(
        "verify.completed",
        policy=policy,
        backups=len(result.backups),
        objects=checked,
        problems=len(result.findings),
    )
    return result
