"""Retention as a pure planner: which backups (and which WAL) to keep, each keep with its reason.

The rules (`retention:` in a policy) are restic's: `keep_last N` keeps the N newest backups;
`keep_daily N` keeps, for each of the last N days (UTC, by the time the backup started) that
have a backup, the newest backup of that day; `keep_weekly` (ISO weeks), `keep_monthly` and
`keep_yearly` alike. Each rule counts on its own (a backup kept by one rule still counts for
the others). A backup kept by any rule is kept; the newest backup is always kept.

Two more things keep a backup the rules would let go:

- object lock: a backup whose objects in some destination are still under retention (their
  last write plus the destination's `object_lock.days`) is reported as deletable from that date
  and kept until then: drbot never tries to delete a locked object;
- nothing else: backups do not depend on each other (each logical dump and each base backup
  stands alone); WAL does depend on base backups: WAL older than the start of the oldest kept
  base backup restores nothing and is deleted; everything from there on is kept. When kept
  base backups disagree on the WAL segment size, no WAL is deleted.

`plan_retention` only decides; `drbot.ops.prune.execute_prune` carries a plan out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from drbot.policy.schema import Retention


@dataclass(frozen=True)
class BackupFacts:
    """What retention needs to know of one complete backup."""

    backup_id: str
    started_at: datetime
    """When the backup started (its id's time): the day, week, month and year it counts for."""
    mode: str
    """'physical' or 'logical'."""
    start_segment: int | None = None
    """Physical: the WAL segment number its base backup starts in (needs WAL from there)."""
    segment_size: int | None = None
    """Physical: the cluster's WAL segment size, which gives segment numbers their meaning."""
    locked_until: datetime | None = None
    """The latest object-lock retention among its objects in any destination, if any."""


@dataclass
class RetentionPlan:
    keep: dict[str, list[str]] = field(default_factory=dict)
    """Backup id -> why it is kept (one reason per rule that keeps it)."""
    delete: list[str] = field(default_factory=list)
    locked: dict[str, datetime] = field(default_factory=dict)
    """Backups the rules let go but object lock holds: id -> when they become deletable."""
    wal_before_segment: int | None = None
    """Delete WAL segments numbered below this (None: keep all WAL)..."""
    wal_segment_size: int | None = None
    """... in segments of this size (the kept base backups' own)."""


_PERIODS: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_daily", "daily", lambda t: t.strftime("%Y-%m-%d")),
    ("keep_weekly", "weekly", lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2])),
    ("keep_monthly", "monthly", lambda t: t.strftime("%Y-%m")),
    ("keep_yearly", "yearly", lambda t: t.strftime("%Y")),
)


def plan_retention(
    backups: Sequence[BackupFacts], rules: Retention, now: datetime
) -> RetentionPlan:
    """Decide what to keep and delete. Pure: reads only its arguments."""
    newest_first = sorted(backups, key=lambda b: (b.started_at, b.backup_id), reverse=True)
    plan = RetentionPlan()

    def keep(b: BackupFacts, why: str) -> None:
        plan.keep.setdefault(b.backup_id, []).append(why)

    if newest_first:
        keep(newest_first[0], "newest backup")
    for i, b in enumerate(newest_first[: rules.keep_last or 0]):
        keep(b, f"last {i + 1} of {rules.keep_last}")
    for attr, label, bucket_of in _PERIODS:
        n = getattr(rules, attr) or 0
        seen: list[str] = []
        for b in newest_first:
            bucket = bucket_of(b.started_at.astimezone(UTC))
            if bucket in seen:
                continue
            if len(seen) == n:
                break
            seen.append(bucket)
            keep(b, f"{label} {bucket}")
    for b in newest_first:
        if b.backup_id in plan.keep:
            continue
        if b.locked_until is not None and b.locked_until > now:
            plan.locked[b.backup_id] = b.locked_until
            keep(b, f"object lock until {b.locked_until.isoformat()}")
            continue
        plan.delete.append(b.backup_id)
    kept = [
        b
        for b in backups
        if b.backup_id in plan.keep and b.mode == "physical" and b.start_segment is not None
    ]
    sizes = {b.segment_size for b in kept}
    if kept and len(sizes) == 1 and None not in sizes:
        plan.wal_before_segment = min(b.start_segment for b in kept if b.start_segment)
        plan.wal_segment_size = sizes.pop()
    return plan


LOCK_MARGIN = timedelta(days=1)
"""S3 sets an object's retention from the writer's clock when the upload starts, which the
listing's time does not show exactly: drbot waits a day longer than its estimate."""


def lock_end(last_write: datetime, days: int | None) -> datetime | None:
    """When an object written at `last_write` surely left a `days`-day object lock."""
    return None if days is None else last_write + timedelta(days=days) + LOCK_MARGIN
