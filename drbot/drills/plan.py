"""Pure drill planning: which destination, which restore point, and whether targets were met.

Nothing here does I/O; the runner feeds in what it read (the catalog, the WAL archive, the last
drill's destination, the clock) and a random generator, so every choice can be tested.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from drbot.catalog import BackupEntry
from drbot.errors import NoRestorePoint, UsageError


@dataclass(frozen=True)
class CheckResult:
    """One check of a drill: what was checked, whether it passed, and what was seen."""

    name: str
    passed: bool
    detail: str


def pick_destination(
    names: Sequence[str], setting: str, requested: str | None, last_used: str | None
) -> str:
    """The destination to drill from.

    `requested` (--from) wins; then a fixed `setting`; with 'rotate', the destination after the
    one the last drill used (in policy order), so every region gets proven in turn.
    """
    if requested is not None:
        if requested not in names:
            raise UsageError(
                f"unknown destination {requested!r}; the policy has: {', '.join(names)}"
            )
        return requested
    if setting != "rotate":
        return setting
    if last_used is not None and last_used in names:
        return names[(list(names).index(last_used) + 1) % len(names)]
    return names[0]


def pick_time(
    now: datetime, earliest: datetime, newest: datetime, within: timedelta, rng: random.Random
) -> datetime:
    """A random moment in the last `within` that the chain can restore to (uniform)."""
    low = max(earliest, now - within)
    if low >= newest:
        return newest
    span = (newest - low).total_seconds()
    return low + timedelta(seconds=rng.uniform(0, span))


def pick_logical_backup(backups: Sequence[BackupEntry], at: datetime | None) -> BackupEntry:
    """The newest backup whose data (the dump's snapshot, taken at its start) is not after `at`.

    `backups` are in time order. Raises `NoRestorePoint` when none is that old.
    """
    if not backups:
        raise NoRestorePoint("no complete backup in that destination")
    if at is None:
        return backups[-1]
    older = [b for b in backups if b.manifest.started_at <= at]
    if not older:
        raise NoRestorePoint(
            f"no backup is as old as {at.isoformat()}; the oldest was taken at "
            f"{backups[0].manifest.started_at.isoformat()}"
        )
    return older[-1]


def target_checks(
    *,
    rto_s: float,
    rpo_s: float | None,
    rto_target: timedelta | None,
    rpo_target: timedelta | None,
) -> list[CheckResult]:
    """The RTO/RPO checks against the policy's targets (a target not set is not checked)."""
    out: list[CheckResult] = []
    if rto_target is not None:
        limit = rto_target.total_seconds()
        out.append(
            CheckResult(
                "rto",
                rto_s <= limit,
                f"restored and checked in {rto_s:.1f}s; target {limit:g}s"
                + ("" if rto_s <= limit else f": missed by {rto_s - limit:.1f}s"),
            )
        )
    if rpo_target is not None:
        limit = rpo_target.total_seconds()
        if rpo_s is None:
            out.append(CheckResult("rpo", False, "the newest restore point's time is unknown"))
        else:
            out.append(
                CheckResult(
                    "rpo",
                    rpo_s <= limit,
                    f"newest restorable point was {rpo_s:.1f}s old at drill start; target "
                    f"{limit:g}s" + ("" if rpo_s <= limit else f": missed by {rpo_s - limit:.1f}s"),
                )
            )
    return out
