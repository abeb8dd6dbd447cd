"""Point-in-time restore planning: which base backup, which WAL, how far it reaches (pure).

The inputs are built directly: a catalog of physical (and logical) backups whose manifests carry
the base backup's positions, and WAL inventories of listed objects keyed by segment. Segment n
of timeline 1 is stored at `_at(n)` (n * 10 minutes after T0) unless a test says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from drbot.catalog import BackupEntry, CatalogScan, Copy
from drbot.engines.postgres.wal import Segment, Switch, parse_lsn
from drbot.errors import NoRestorePoint
from drbot.manifest import ArtifactRecord, Manifest
from drbot.ops.pitr import (
    PitrPlan,
    Target,
    WalFile,
    descendant_timeline,
    plan_pitr,
    recovery_settings,
    restorable_window,
)
from drbot.ops.walstore import WalInventory, WalScan
from drbot.pipeline.keys import WrappedKey
from drbot.storage import layout
from drbot.storage.base import ObjectInfo

pytestmark = pytest.mark.unit

SEG = 16 * 1024 * 1024
T0 = datetime(2026, 11, 23, 2, tzinfo=UTC)
B1 = "20261123T020000Z-aaaaaa"
B2 = "20261123T024000Z-bbbbbb"
NO_HISTORY: dict[int, list[Switch]] = {}


def _at(n: int) -> datetime:
    return T0 + timedelta(minutes=10 * n)


def _name(timeline: int, number: int) -> str:
    return Segment(timeline, number).name(SEG)


def _manifest(
    backup_id: str,
    completed_at: datetime,
    *,
    start: str = "0/2000028",
    stop: str = "0/2000100",
    timeline: int = 1,
    mode: str = "physical",
) -> Manifest:
    positions: dict[str, object] = {
        "system_identifier": "7301234567890123456",
        "segment_size": SEG,
        "timeline": timeline,
        "start_lsn": start,
        "stop_lsn": stop,
        "files": 1000,
        "data_bytes": 30_000_000,
        "backup_manifest_sha256": "ab" * 32,
    }
    return Manifest(
        policy="shop",
        backup_id=backup_id,
        type="full",
        mode=mode,
        engine="postgresql",
        source_version="16.4",
        started_at=completed_at - timedelta(minutes=5),
        completed_at=completed_at,
        destination="a",
        wrapped_key=WrappedKey("file:0011223344556677", b"\x01" * 60),
        compression={"algorithm": "zstd", "level": 3},
        encryption={"algorithm": "AES-256-GCM", "frame_size": 1 << 20},
        artifacts=(
            ArtifactRecord(
                "base.tar",
                "basebackup",
                f"shop/backups/{backup_id}/base.tar.zst.enc",
                4321,
                "cd" * 32,
                9999,
            ),
        ),
        positions=positions if mode == "physical" else {},
    )


def _entry(
    backup_id: str,
    completed_at: datetime,
    destinations: Iterable[str] = ("a",),
    *,
    start: str = "0/2000028",
    stop: str = "0/2000100",
    timeline: int = 1,
    mode: str = "physical",
) -> BackupEntry:
    m = _manifest(backup_id, completed_at, start=start, stop=stop, timeline=timeline, mode=mode)
    copies = tuple(Copy(d, dataclasses.replace(m, destination=d), b"k" * 32) for d in destinations)
    return BackupEntry(backup_id, copies)


def _catalog(*entries: BackupEntry) -> CatalogScan:
    return CatalogScan(list(entries), [], [], {})


def _obj(seg: Segment, at: datetime, *, partial: bool = False) -> ObjectInfo:
    key = layout.wal_segment_key("shop", seg.name(SEG), partial=partial)
    return ObjectInfo(key, 1000 + seg.number, at)


def _inventory(
    destination: str,
    full: Iterable[Segment],
    partial: Iterable[Segment] = (),
    times: dict[Segment, datetime] | None = None,
) -> WalInventory:
    times = times or {}
    inv = WalInventory(destination)
    for s in full:
        inv.segments[s] = _obj(s, times.get(s, _at(s.number)))
    for s in partial:
        inv.partials[s] = _obj(s, times.get(s, _at(s.number)), partial=True)
    return inv


def _wal(*inventories: WalInventory) -> WalScan:
    return WalScan({inv.destination: inv for inv in inventories}, {})


def _tl1(*numbers: int) -> list[Segment]:
    return [Segment(1, n) for n in numbers]


def _names(files: Iterable[WalFile]) -> list[str]:
    return [f.name for f in files]


def _plan(
    scan: CatalogScan,
    wal: WalScan,
    target: Target,
    histories: dict[int, list[Switch]] | None = None,
    from_destination: str | None = None,
) -> PitrPlan:
    return plan_pitr(
        scan,
        wal,
        histories if histories is not None else NO_HISTORY,
        policy="shop",
        target=target,
        from_destination=from_destination,
    )


def _time(t: datetime) -> Target:
    return Target("time", time=t)


def _lsn(text: str) -> Target:
    return Target("lsn", lsn=parse_lsn(text))


LATEST = Target("latest")

# -- the window ---------------------------------------------------------------------------------


def test_contiguous_wal_ending_in_a_partial_reaches_into_the_partial() -> None:
    """Segments 2-4 and a partial 5: the window runs through the partial, with no gap."""
    entry = _entry(B1, _at(0) + timedelta(minutes=5))
    wal = _wal(_inventory("a", _tl1(2, 3, 4), partial=_tl1(5)))
    w = restorable_window(entry, wal, NO_HISTORY)
    assert w.timeline == 1
    assert w.wal == (
        WalFile(_name(1, 2), 1002),
        WalFile(_name(1, 3), 1003),
        WalFile(_name(1, 4), 1004),
        WalFile(_name(1, 5), 1005, partial=True),
    )
    assert w.partial
    assert w.gap is None
    assert w.end_lsn == 5 * SEG  # complete WAL ends where the partial begins
    assert w.end_time == _at(5)


def test_a_complete_segment_is_preferred_to_a_stale_partial_of_it() -> None:
    """A partial left behind for a segment that is now complete does not end the window."""
    entry = _entry(B1, _at(0))
    wal = _wal(_inventory("a", _tl1(2, 3, 4), partial=_tl1(3)))
    w = restorable_window(entry, wal, NO_HISTORY)
    assert _names(w.wal) == [_name(1, 2), _name(1, 3), _name(1, 4)]
    assert not any(f.partial for f in w.wal)
    assert not w.partial
    assert w.end_lsn == 5 * SEG


def test_wal_is_united_across_destinations() -> None:
    """Segment 3 held only by destination b fills a's hole: no gap, newest time of any copy."""
    entry = _entry(B1, _at(0), destinations=("a", "b"))
    late = _at(9)
    wal = _wal(
        _inventory("a", _tl1(2, 4)),
        _inventory("b", _tl1(3, 4), times={Segment(1, 4): late}),
    )
    w = restorable_window(entry, wal, NO_HISTORY)
    assert _names(w.wal) == [_name(1, 2), _name(1, 3), _name(1, 4)]
    assert w.gap is None
    assert w.end_time == late


def test_without_wal_the_window_is_the_base_backup_itself() -> None:
    """No archived WAL: the window ends at the backup's stop position and completion time."""
    entry = _entry(B1, _at(1))
    w = restorable_window(entry, _wal(_inventory("a", [])), NO_HISTORY)
    assert w.wal == ()
    assert (w.end_lsn, w.end_time, w.partial, w.gap) == (0x2000100, _at(1), False, None)


def test_wal_before_the_base_backup_is_not_part_of_its_window() -> None:
    """Segments before the backup's start are neither used nor a gap."""
    entry = _entry(B2, _at(3), start="0/4000028", stop="0/4000100")
    w = restorable_window(entry, _wal(_inventory("a", _tl1(1, 2, 4, 5))), NO_HISTORY)
    assert _names(w.wal) == [_name(1, 4), _name(1, 5)]
    assert w.gap is None


def test_a_missing_segment_before_later_wal_is_a_gap_named_by_its_file_name() -> None:
    """Segments 2, 3, then 5, 6: the window stops at 3 and the gap is segment 4."""
    entry = _entry(B1, _at(0))
    w = restorable_window(entry, _wal(_inventory("a", _tl1(2, 3, 5, 6))), NO_HISTORY)
    assert _names(w.wal) == [_name(1, 2), _name(1, 3)]
    assert w.gap == "000000010000000000000004"
    assert w.end_lsn == 4 * SEG
    assert w.end_time == _at(3)
    assert not w.partial


def test_a_missing_first_segment_is_a_gap() -> None:
    """If the backup's own start segment is missing, nothing can be replayed: a gap at it."""
    entry = _entry(B1, _at(0))
    w = restorable_window(entry, _wal(_inventory("a", _tl1(3, 4))), NO_HISTORY)
    assert w.wal == ()
    assert w.gap == "000000010000000000000002"


def test_the_gap_name_crosses_the_low_digits_boundary() -> None:
    """A hole at segment 0x100 is named as PostgreSQL names it (high part 1, low part 0)."""
    entry = _entry(B1, _at(0), start="0/FE000028", stop="0/FE000100")
    w = restorable_window(entry, _wal(_inventory("a", _tl1(0xFE, 0xFF, 0x101))), NO_HISTORY)
    assert _names(w.wal) == ["0000000100000000000000FE", "0000000100000000000000FF"]
    assert w.gap == "000000010000000100000000"


# -- targets across a gap -----------------------------------------------------------------------


def _gap_case() -> tuple[CatalogScan, WalScan]:
    return _catalog(_entry(B1, _at(0))), _wal(_inventory("a", _tl1(2, 3, 5, 6)))


def test_a_time_after_a_gap_is_refused_naming_the_gap() -> None:
    """WAL after a hole is unusable: a target time only reached beyond it is no restore point."""
    scan, wal = _gap_case()
    with pytest.raises(
        NoRestorePoint, match="WAL is missing from segment 000000010000000000000004"
    ):
        _plan(scan, wal, _time(_at(6)))


def test_a_time_before_a_gap_is_planned_and_the_gap_reported() -> None:
    """A target the WAL reaches before the hole is planned; the plan still names the hole."""
    scan, wal = _gap_case()
    plan = _plan(scan, wal, _time(_at(3)))
    assert plan.backup_id == B1
    assert _names(plan.wal) == [_name(1, 2), _name(1, 3)]
    assert plan.gap == "000000010000000000000004"
    assert plan.window_end == _at(3)


def test_an_lsn_after_a_gap_is_refused_and_one_before_it_is_planned() -> None:
    """WAL positions past the end of the complete WAL are refused; up to it they are planned."""
    scan, wal = _gap_case()
    with pytest.raises(NoRestorePoint, match="reaches only 0/4000000"):
        _plan(scan, wal, _lsn("0/5000010"))
    with pytest.raises(NoRestorePoint):
        _plan(scan, wal, _lsn("0/4000001"))
    assert _plan(scan, wal, _lsn("0/4000000")).gap == "000000010000000000000004"


def test_latest_is_never_refused_for_a_gap() -> None:
    """'latest' restores as far as the WAL goes, reporting the gap."""
    scan, wal = _gap_case()
    plan = _plan(scan, wal, LATEST)
    assert plan.wal_range == (_name(1, 2), _name(1, 3))
    assert plan.gap == "000000010000000000000004"


def test_an_lsn_inside_a_trailing_partial_is_planned() -> None:
    """A position within the partial segment may be there: it is planned."""
    scan = _catalog(_entry(B1, _at(0)))
    wal = _wal(_inventory("a", _tl1(2, 3), partial=_tl1(4)))
    plan = _plan(scan, wal, _lsn("0/4000100"))
    assert plan.wal[-1] == WalFile(_name(1, 4), 1004, partial=True)


def test_an_lsn_past_the_end_of_a_trailing_partial_is_refused() -> None:
    """A partial segment 4 holds nothing at or after 0/5000000: a target there is unreachable."""
    scan = _catalog(_entry(B1, _at(0)))
    wal = _wal(_inventory("a", _tl1(2, 3), partial=_tl1(4)))
    with pytest.raises(NoRestorePoint):
        _plan(scan, wal, _lsn("0/9000000"))


# -- choosing the base backup ---------------------------------------------------------------


def _two_backups() -> tuple[CatalogScan, WalScan]:
    """B1 completed at _at(0) + 5 min (WAL from segment 2), B2 at _at(4) (from segment 4)."""
    b1 = _entry(B1, _at(0) + timedelta(minutes=5), destinations=("a", "b"))
    b2 = _entry(B2, _at(4), start="0/4000028", stop="0/4000100")
    # Listed newest first, to show the choice does not depend on the catalog's order.
    return _catalog(b2, b1), _wal(_inventory("a", _tl1(2, 3, 4, 5, 6, 7)))


@pytest.mark.parametrize(
    ("at", "chosen", "first"),
    [
        (_at(0) + timedelta(minutes=5), B1, 2),  # completed exactly then
        (_at(3), B1, 2),
        (_at(4) - timedelta(seconds=1), B1, 2),
        (_at(4), B2, 4),  # completed exactly then
        (_at(7), B2, 4),
    ],
)
def test_a_time_target_uses_the_newest_backup_completed_by_then(
    at: datetime, chosen: str, first: int
) -> None:
    """The chosen base backup completed at or before the target, and no later one did."""
    scan, wal = _two_backups()
    plan = _plan(scan, wal, _time(at))
    assert plan.backup_id == chosen
    assert plan.wal[0].name == _name(1, first)
    assert plan.wal[-1].name == _name(1, 7)


def test_a_time_before_every_backup_is_refused_naming_the_oldest() -> None:
    """Nothing can be restored to a moment before the first base backup completed."""
    scan, wal = _two_backups()
    with pytest.raises(NoRestorePoint, match=f"no base backup of shop ends before .*{B1}"):
        _plan(scan, wal, _time(_at(0)))


def test_a_time_beyond_the_wal_is_refused() -> None:
    """A target later than the newest stored WAL is not reached."""
    scan, wal = _two_backups()
    with pytest.raises(NoRestorePoint, match="reaches only about"):
        _plan(scan, wal, _time(_at(7) + timedelta(seconds=1)))


@pytest.mark.parametrize(
    ("lsn", "chosen"),
    [("0/2000100", B1), ("0/40000FF", B1), ("0/4000100", B2), ("0/7FFFFFF", B2)],
)
def test_an_lsn_target_uses_the_newest_backup_stopped_by_then(lsn: str, chosen: str) -> None:
    """The chosen base backup stopped at or before the target position."""
    scan, wal = _two_backups()
    plan = _plan(scan, wal, _lsn(lsn))
    assert plan.backup_id == chosen
    assert plan.target.lsn == parse_lsn(lsn)


def test_an_lsn_before_every_backup_stopped_is_refused() -> None:
    """A position inside the first backup (before it became consistent) is no restore point."""
    scan, wal = _two_backups()
    with pytest.raises(NoRestorePoint, match="ends before 0/20000FF"):
        _plan(scan, wal, _lsn("0/20000FF"))


def test_latest_uses_the_newest_backup_and_records_its_facts() -> None:
    """'latest' restores the newest base backup with all the WAL after it."""
    scan, wal = _two_backups()
    plan = _plan(scan, wal, LATEST)
    assert plan.backup_id == B2
    assert plan.policy == "shop"
    assert plan.timeline == 1
    assert plan.sources == ("a",)
    assert plan.base_bytes == 4321
    assert _names(plan.wal) == [_name(1, n) for n in (4, 5, 6, 7)]
    assert plan.wal_bytes == 1004 + 1005 + 1006 + 1007
    assert plan.histories == ()
    assert plan.window_end == _at(7)
    assert plan.gap is None
    assert plan.system_identifier == 7301234567890123456
    assert plan.segment_size == SEG
    assert plan.stop_lsn == 0x4000100


def test_from_a_destination_restricts_and_orders_the_sources() -> None:
    """--from picks among that destination's backups and tries it first."""
    scan, wal = _two_backups()
    plan = _plan(scan, wal, LATEST, from_destination="b")
    assert plan.backup_id == B1  # B2 has no copy in b
    assert plan.sources == ("b", "a")
    plan = _plan(scan, wal, LATEST, from_destination="a")
    assert (plan.backup_id, plan.sources) == (B2, ("a",))
    assert _plan(scan, wal, _time(_at(3)), from_destination="a").sources == ("a", "b")


def test_from_a_destination_without_backups_is_refused() -> None:
    """A destination holding no physical base backup has no restore point."""
    scan, wal = _two_backups()
    with pytest.raises(NoRestorePoint, match="no complete physical base backup in c"):
        _plan(scan, wal, LATEST, from_destination="c")


def test_a_logical_backup_is_never_chosen() -> None:
    """A newer logical dump cannot start WAL replay: the newest physical backup is used."""
    scan, wal = _two_backups()
    logical = _entry("20261123T030000Z-cccccc", _at(6), mode="logical")
    plan = _plan(_catalog(*scan.backups, logical), wal, LATEST)
    assert plan.backup_id == B2
    assert _plan(_catalog(*scan.backups, logical), wal, _time(_at(7))).backup_id == B2


def test_only_logical_backups_is_no_restore_point() -> None:
    """Without a physical base backup there is nothing to replay WAL onto."""
    logical = _entry("20261123T030000Z-cccccc", _at(6), mode="logical")
    with pytest.raises(NoRestorePoint, match="no complete physical base backup"):
        _plan(_catalog(logical), _wal(_inventory("a", _tl1(2, 3))), LATEST)


# -- timelines --------------------------------------------------------------------------------

SWITCH = 0x4000100  # timeline 2 began inside segment 4
HISTORY = {2: [Switch(1, SWITCH, "no recovery target specified")]}


def _switched_wal(*, old: Iterable[int] = (2, 3, 4), new: Iterable[int] = (4, 5, 6)) -> WalScan:
    segs = [Segment(1, n) for n in old] + [Segment(2, n) for n in new]
    return _wal(_inventory("a", segs))


def test_the_wal_path_switches_timelines_at_the_switch_segment() -> None:
    """The segment holding the switch and all after it come from timeline 2; before, from 1."""
    scan = _catalog(_entry(B1, _at(0)))
    plan = _plan(scan, _switched_wal(), LATEST, HISTORY)
    assert plan.timeline == 2
    assert _names(plan.wal) == [
        "000000010000000000000002",
        "000000010000000000000003",
        "000000020000000000000004",
        "000000020000000000000005",
        "000000020000000000000006",
    ]
    assert plan.histories == ("00000002.history",)
    assert plan.gap is None


def test_a_switch_at_a_segment_boundary_starts_the_new_timeline_at_that_segment() -> None:
    """With the switch at 0/4000000 exactly, segment 3 is timeline 1's and 4 timeline 2's."""
    scan = _catalog(_entry(B1, _at(0)))
    history = {2: [Switch(1, 4 * SEG, "")]}
    plan = _plan(scan, _switched_wal(old=(2, 3), new=(4, 5)), LATEST, history)
    assert _names(plan.wal) == [_name(1, 2), _name(1, 3), _name(2, 4), _name(2, 5)]


def test_the_old_timelines_switch_segment_does_not_stand_in_for_the_new_ones() -> None:
    """Timeline 1's copy of segment 4 is not timeline 2's: without it the path stops, a gap."""
    entry = _entry(B1, _at(0))
    w = restorable_window(entry, _switched_wal(new=(5, 6)), HISTORY)
    assert w.timeline == 2
    assert _names(w.wal) == [_name(1, 2), _name(1, 3)]
    assert w.gap == "000000020000000000000004"


def test_an_explicit_timeline_is_followed() -> None:
    """Asked for timeline 1, the window stays on it past the switch and sees no gap."""
    entry = _entry(B1, _at(0))
    w = restorable_window(entry, _switched_wal(), HISTORY, timeline=1)
    assert w.timeline == 1
    assert _names(w.wal) == [_name(1, 2), _name(1, 3), _name(1, 4)]
    assert w.gap is None


def test_a_backup_taken_on_the_new_timeline_replays_only_its_segments() -> None:
    """A base backup of the promoted server starts on timeline 2 and needs its history file."""
    scan = _catalog(_entry(B2, _at(5), start="0/5000028", stop="0/5000100", timeline=2))
    plan = _plan(scan, _switched_wal(old=(2, 3, 4, 5, 6)), LATEST, HISTORY)
    assert plan.timeline == 2
    assert _names(plan.wal) == [_name(2, 5), _name(2, 6)]
    assert plan.histories == ("00000002.history",)


def test_a_backup_after_the_fork_stays_on_its_own_timeline() -> None:
    """A backup of the old primary taken after timeline 2 forked off does not follow timeline 2."""
    entry = _entry(B2, _at(5), start="0/5000028", stop="0/5000100")
    w = restorable_window(entry, _switched_wal(old=(5, 6), new=(4, 5, 6)), HISTORY)
    assert w.timeline == 1
    assert _names(w.wal) == [_name(1, 5), _name(1, 6)]


def test_the_old_timeline_continuing_past_the_switch_is_not_a_gap() -> None:
    """After a failover the old primary may have archived more of timeline 1 than timeline 2
    holds yet; that WAL is not on the restore path, so the path's end is not a hole."""
    entry = _entry(B1, _at(0))
    wal = _wal(
        _inventory("a", [*_tl1(2, 3, 4, 5, 6), Segment(2, 4)], partial=[Segment(2, 5)]),
    )
    w = restorable_window(entry, wal, HISTORY)
    assert _names(w.wal) == [_name(1, 2), _name(1, 3), _name(2, 4), _name(2, 5)]
    assert w.gap is None


def test_descendant_timeline_without_history_is_the_base() -> None:
    """With no history files, recovery stays on the backup's timeline."""
    assert descendant_timeline(1, 0x2000100, {}) == 1
    assert descendant_timeline(3, 0x2000100, {}) == 3


def test_descendant_timeline_follows_a_timeline_forked_after_the_backup() -> None:
    """Timeline 2 forked from 1 after the backup stopped: it continues the backup."""
    assert descendant_timeline(1, 0x2000100, HISTORY) == 2
    assert descendant_timeline(1, SWITCH - 1, HISTORY) == 2


def test_descendant_timeline_ignores_a_timeline_forked_before_the_backup_stopped() -> None:
    """Timeline 2 forked before the backup's stop position: the backup is not in its past."""
    assert descendant_timeline(1, SWITCH + 1, HISTORY) == 1
    assert descendant_timeline(1, 0x9000000, HISTORY) == 1


def test_descendant_timeline_picks_the_newest_descendant() -> None:
    """Of several descendants, the highest timeline wins, whatever the dict order; a timeline
    that forked off before the backup stopped is skipped even when it is the highest."""
    chain = {
        3: [Switch(1, SWITCH, ""), Switch(2, 0x6000000, "")],
        2: [Switch(1, SWITCH, "")],
    }
    assert descendant_timeline(1, 0x2000100, chain) == 3
    assert descendant_timeline(1, 0x2000100, dict(reversed(chain.items()))) == 3
    assert descendant_timeline(2, 0x5000000, chain) == 3  # a backup taken on timeline 2
    assert descendant_timeline(2, 0x6000001, chain) == 2
    forked_early = {**chain, 4: [Switch(1, 0x2000000, "")]}
    assert descendant_timeline(1, 0x2000100, forked_early) == 3


# -- recovery settings ------------------------------------------------------------------------


def _settings(target: Target) -> dict[str, str]:
    scan = _catalog(_entry(B1, _at(0)))
    plan = _plan(scan, _switched_wal(), target, HISTORY)
    return recovery_settings(plan, "drbot wal-fetch %f %p")


def test_recovery_settings_always_cut_the_copy_off_from_the_source() -> None:
    """Every restore fetches through drbot, promotes at the end, never archives or replicates."""
    s = _settings(LATEST)
    assert s == {
        "restore_command": "drbot wal-fetch %f %p",
        "recovery_target_timeline": "2",
        "recovery_target_action": "promote",
        "archive_mode": "off",
        "primary_conninfo": "",
        "primary_slot_name": "",
    }


def test_recovery_settings_for_a_time_target() -> None:
    """A time target is written in ISO form with its offset, inclusive."""
    s = _settings(_time(_at(5)))
    assert s["recovery_target_time"] == "2026-11-23T02:50:00+00:00"
    assert s["recovery_target_inclusive"] == "on"
    assert "recovery_target_lsn" not in s
    assert s["recovery_target_timeline"] == "2"


def test_recovery_settings_for_an_lsn_target() -> None:
    """An LSN target is written as PostgreSQL writes positions, inclusive."""
    s = _settings(_lsn("0/50000A8"))
    assert s["recovery_target_lsn"] == "0/50000A8"
    assert s["recovery_target_inclusive"] == "on"
    assert "recovery_target_time" not in s
