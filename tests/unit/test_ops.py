"""Backup, verify and restore against in-memory destinations and a fake engine."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from drbot.catalog import scan_catalog
from drbot.clock import FakeClock
from drbot.engines.base import DumpStream
from drbot.errors import (
    DatabaseError,
    IntegrityFailure,
    KeyProblem,
    LockHeld,
    NoRestorePoint,
    StorageUnavailable,
    UsageError,
)
from drbot.ops.backup import BackupSettings, run_backup
from drbot.ops.lock import policy_lock
from drbot.ops.restore import execute_restore, plan_restore
from drbot.ops.verify import run_verify
from drbot.pipeline.filekey import FileKeyProvider, generate_key_file
from drbot.storage import layout
from drbot.storage.memory import MemoryStorage
from tests.unit.fakes import FakeDump, FakeEngine

pytestmark = pytest.mark.unit

SETTINGS = BackupSettings(policy="shop", engine_name="postgresql", frame_size=4096)


@pytest.fixture
def keys(tmp_path: Path) -> FileKeyProvider:
    path = tmp_path / "k.key"
    generate_key_file(path)
    return FileKeyProvider(path)


def _stores() -> list[MemoryStorage]:
    return [
        MemoryStorage("primary", region="us-east-1"),
        MemoryStorage("replica", region="eu-west-1"),
    ]


def _data(n: int = 200_000) -> bytes:
    return os.urandom(n // 2) + b"x" * (n // 2)


def test_backup_writes_verified_copies_and_a_manifest_in_every_destination(
    keys: FileKeyProvider,
) -> None:
    """A backup stores every artifact and a manifest in both destinations and lists once."""
    stores = _stores()
    result = run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    assert result.destinations_ok == ("primary", "replica") and not result.partial
    for s in stores:
        assert layout.manifest_key("shop", result.backup_id) in s.objects
    scan = scan_catalog("shop", stores, keys)
    assert [b.backup_id for b in scan.backups] == [result.backup_id]
    assert scan.backups[0].destinations == ["primary", "replica"]
    assert run_verify("shop", stores, keys).ok


def test_stored_objects_contain_no_plaintext(keys: FileKeyProvider) -> None:
    """What destinations receive is ciphertext: the dump's bytes never appear in an object."""
    stores = _stores()
    marker = b"PLAINTEXT-MARKER-" * 100
    run_backup(SETTINGS, FakeEngine({"shop": marker}), stores, keys, FakeClock())
    for s in stores:
        for key, (data, _) in s.objects.items():
            if not key.endswith("manifest.json"):
                assert b"PLAINTEXT-MARKER" not in data


def test_a_failing_destination_makes_a_partial_backup_without_manifest_there(
    keys: FileKeyProvider,
) -> None:
    """When one destination fails mid-upload, the other completes and only it lists the backup."""
    stores = _stores()
    stores[1].fail_puts_after = 50_000
    result = run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    assert result.partial and result.destinations_ok == ("primary",)
    assert "replica" in result.destinations_failed
    assert layout.manifest_key("shop", result.backup_id) not in stores[1].objects
    assert scan_catalog("shop", stores, keys).backups[0].destinations == ["primary"]


def test_every_destination_failing_raises_and_leaves_nothing(keys: FileKeyProvider) -> None:
    """If no destination can hold the backup, it fails and no manifest exists anywhere."""
    stores = _stores()
    for s in stores:
        s.fail_puts_after = 10_000
    with pytest.raises(StorageUnavailable):
        run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    assert scan_catalog("shop", stores, keys).backups == []
    assert all(not s.objects for s in stores)


def test_a_failing_dump_leaves_no_backup_and_no_objects(keys: FileKeyProvider) -> None:
    """A dump that fails halfway raises, and nothing it stored remains in any destination."""
    stores = _stores()
    engine = FakeEngine({"shop": _data()}, fail_dump_after=100_000)
    with pytest.raises(DatabaseError):
        run_backup(SETTINGS, engine, stores, keys, FakeClock())
    assert all(not s.objects for s in stores)


def test_next_backup_removes_leftovers_of_an_interrupted_one(keys: FileKeyProvider) -> None:
    """Objects of a backup id without manifest are deleted by the next backup, not listed before."""
    stores = _stores()
    leftover = layout.artifact_key("shop", "20250101T000000Z-abcdef", "db/shop.pgdump")
    stores[0].objects[leftover] = (b"junk", FakeClock().now())
    scan = scan_catalog("shop", stores, keys)
    assert scan.backups == [] and scan.incomplete[0].backup_id == "20250101T000000Z-abcdef"
    run_backup(SETTINGS, FakeEngine({"shop": _data(5000)}), stores, keys, FakeClock())
    assert leftover not in stores[0].objects


def test_verify_names_a_corrupt_object_and_its_destination(keys: FileKeyProvider) -> None:
    """A flipped bit in one copy is reported with destination and object key; the other is fine."""
    stores = _stores()
    result = run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    key = layout.artifact_key("shop", result.backup_id, "db/shop.pgdump")
    data, at = stores[0].objects[key]
    stores[0].objects[key] = (data[:1000] + bytes([data[1000] ^ 4]) + data[1001:], at)
    report = run_verify("shop", stores, keys)
    assert [(f.destination, f.key) for f in report.findings] == [("primary", key)]
    assert run_verify("shop", stores[1:], keys).ok


def test_an_edited_manifest_is_not_listed_and_is_reported(keys: FileKeyProvider) -> None:
    """A manifest changed after writing fails authentication: not listed, reported as integrity."""
    stores = _stores()
    result = run_backup(SETTINGS, FakeEngine({"shop": _data(5000)}), stores, keys, FakeClock())
    mkey = layout.manifest_key("shop", result.backup_id)
    raw, at = stores[0].objects[mkey]
    stores[0].objects[mkey] = (raw.replace(b'"level": 3', b'"level": 4'), at)
    scan = scan_catalog("shop", stores, keys)
    assert scan.backups[0].destinations == ["replica"]
    assert isinstance(scan.problems[0].error, IntegrityFailure)


def test_another_key_cannot_open_the_manifests(keys: FileKeyProvider, tmp_path: Path) -> None:
    """With another key, manifests are key problems and planning a restore raises KeyProblem."""
    stores = _stores()
    run_backup(SETTINGS, FakeEngine({"shop": _data(5000)}), stores, keys, FakeClock())
    other = tmp_path / "other.key"
    generate_key_file(other)
    scan = scan_catalog("shop", stores, FileKeyProvider(other))
    assert scan.backups == [] and all(isinstance(p.error, KeyProblem) for p in scan.problems)
    with pytest.raises(KeyProblem):
        plan_restore(scan, policy="shop", target="t", target_state="empty")


def test_restore_falls_back_to_the_next_destination_on_a_corrupt_copy(
    keys: FileKeyProvider,
) -> None:
    """A corrupt primary copy makes restore read the replica; the loaded bytes are the dump's."""
    stores = _stores()
    data = _data()
    result = run_backup(SETTINGS, FakeEngine({"shop": data}), stores, keys, FakeClock())
    key = layout.artifact_key("shop", result.backup_id, "db/shop.pgdump")
    raw, at = stores[0].objects[key]
    stores[0].objects[key] = (raw[:-10] + bytes(b ^ 1 for b in raw[-10:]), at)
    scan = scan_catalog("shop", stores, keys)
    plan = plan_restore(scan, policy="shop", target="t", target_state="empty")
    assert plan.sources == ("primary", "replica")
    target = FakeEngine({})
    res = execute_restore(plan, scan, {s.name: s for s in stores}, target, "t", FakeClock())
    assert res.source == "replica" and "primary" in res.failed_sources
    assert target.loaded["t"] == data
    assert res.fingerprint_checked and res.mismatches == []


def test_restore_from_only_a_corrupt_copy_fails_and_loads_nothing(keys: FileKeyProvider) -> None:
    """With --from naming the corrupt copy, restore raises IntegrityFailure, drops what it made."""
    stores = _stores()
    result = run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    key = layout.artifact_key("shop", result.backup_id, "db/shop.pgdump")
    raw, at = stores[0].objects[key]
    stores[0].objects[key] = (raw[:5000] + bytes([raw[5000] ^ 0xFF]) + raw[5001:], at)
    scan = scan_catalog("shop", stores, keys)
    plan = plan_restore(
        scan, policy="shop", target="t", target_state="empty", from_destination="primary"
    )
    target = FakeEngine({})
    with pytest.raises(IntegrityFailure):
        execute_restore(plan, scan, {s.name: s for s in stores}, target, "t", FakeClock())
    assert target.loaded == {} and target.created == set()


def test_plan_restore_picks_and_refuses_as_documented(keys: FileKeyProvider) -> None:
    """The plan takes the latest backup, honours --backup/--database, refuses unsafe targets."""
    stores = _stores()
    clock = FakeClock()
    engine = FakeEngine({"shop": b"a" * 100, "crm": b"b" * 100})
    first = run_backup(SETTINGS, engine, stores, keys, clock)
    clock.advance(3600)
    second = run_backup(SETTINGS, engine, stores, keys, clock)
    scan = scan_catalog("shop", stores, keys)
    with pytest.raises(UsageError, match=r"--database|2 databases"):
        plan_restore(scan, policy="shop", target="t", target_state="empty")
    plan = plan_restore(scan, policy="shop", target="t", target_state="empty", database="crm")
    assert plan.backup_id == second.backup_id
    assert [a.name for a in plan.artifacts] == ["db/crm.pgdump"]
    plan = plan_restore(
        scan,
        policy="shop",
        target="t",
        target_state="empty",
        database="shop",
        backup_id=first.backup_id,
        with_globals=True,
    )
    assert plan.backup_id == first.backup_id
    assert [a.name for a in plan.artifacts] == ["globals.sql", "db/shop.pgdump"]
    with pytest.raises(UsageError, match="not empty"):
        plan_restore(scan, policy="shop", target="t", target_state="not-empty", database="shop")
    with pytest.raises(NoRestorePoint):
        plan_restore(scan, policy="shop", target="t", target_state="empty", backup_id="nope")
    with pytest.raises(NoRestorePoint):
        plan_restore(scan, policy="shop", target="t", target_state="empty", database="hr")


def test_no_backups_means_no_restore_point(keys: FileKeyProvider) -> None:
    """Planning a restore with nothing stored raises NoRestorePoint (exit 10)."""
    scan = scan_catalog("shop", _stores(), keys)
    with pytest.raises(NoRestorePoint) as err:
        plan_restore(scan, policy="shop", target="t", target_state="empty")
    assert err.value.exit_code == 10


def test_policy_lock_is_exclusive(tmp_path: Path) -> None:
    """A second holder of one policy's lock gets LockHeld (exit 11); another policy does not."""
    with policy_lock(tmp_path, "shop"):
        with pytest.raises(LockHeld) as err, policy_lock(tmp_path, "shop"):
            pass
        assert err.value.exit_code == 11
        with policy_lock(tmp_path, "crm"):
            pass
    with policy_lock(tmp_path, "shop"):
        pass


class _ReadsFail(MemoryStorage):
    """Once `broken`, lists fine but cannot read artifacts: a region going down mid-verify."""

    broken = False

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        if not self.broken or key.endswith(layout.MANIFEST_NAME):
            return super().open(key, offset=offset, length=length)
        raise StorageUnavailable(f"{self.url}: connection reset (simulated)")


def test_verify_reports_a_destination_that_fails_midway_as_unreachable(
    keys: FileKeyProvider,
) -> None:
    """Unreadable is not corrupt: no finding (13), an unreachable entry (15) instead."""
    primary = _ReadsFail("primary", region="us-east-1")
    stores = [primary, MemoryStorage("replica")]
    run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    primary.broken = True
    report = run_verify("shop", stores, keys)
    assert report.findings == []
    assert list(report.unreachable) == ["primary"]
    assert "connection reset" in report.unreachable["primary"]
    assert not report.ok


def test_a_copy_missing_an_artifact_is_not_listed_and_is_reported(keys: FileKeyProvider) -> None:
    """An artifact deleted behind drbot's back: that copy cannot restore, so it is not listed."""
    stores = _stores()
    result = run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    key = layout.artifact_key("shop", result.backup_id, "db/shop.pgdump")
    del stores[0].objects[key]
    scan = scan_catalog("shop", stores, keys)
    assert scan.backups[0].destinations == ["replica"]
    assert [(p.destination, p.key) for p in scan.problems] == [("primary", key)]
    assert "missing" in str(scan.problems[0].error)


class _ManifestReadBackFails(MemoryStorage):
    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        if key.endswith(layout.MANIFEST_NAME):
            raise StorageUnavailable(f"{self.url}: read timed out (simulated)")
        return super().open(key, offset=offset, length=length)


def test_a_manifest_that_fails_read_back_is_removed(keys: FileKeyProvider) -> None:
    """The run reports the destination failed, so list must not show the backup there."""
    stores = [_ManifestReadBackFails("primary"), MemoryStorage("replica")]
    result = run_backup(SETTINGS, FakeEngine({"shop": _data()}), stores, keys, FakeClock())
    assert result.partial
    assert result.destinations_ok == ("replica",)
    assert layout.manifest_key("shop", result.backup_id) not in stores[0].objects


class _TrackedDump(FakeDump):
    """A dump that notes when its producer is closed (pg_dump would be killed then)."""

    closed = False

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from super().chunks()
        finally:
            _TrackedDump.closed = True


class _TrackedEngine(FakeEngine):
    def full_dumps(self) -> list[DumpStream]:
        dumps = super().full_dumps()
        return [
            _TrackedDump(d.name, d.kind, d.database, d.data, d.fail_after, d.fp)
            if isinstance(d, FakeDump) and d.kind == "pg_dump"
            else d
            for d in dumps
        ]


def test_a_failed_backup_stops_its_dump_at_once(keys: FileKeyProvider) -> None:
    """The dump holds a snapshot and locks on the source: it ends when the backup fails, not
    whenever the exception's traceback is freed (pytest keeps it alive here)."""
    stores = _stores()
    for s in stores:
        s.fail_puts_after = 10_000
    _TrackedDump.closed = False
    # Incompressible and large, so the destinations fail while the dump is still running.
    data = os.urandom(48 << 20)
    with pytest.raises(StorageUnavailable) as failure:
        run_backup(SETTINGS, _TrackedEngine({"shop": data}), stores, keys, FakeClock())
    assert failure.value is not None
    assert _TrackedDump.closed


def test_verify_sample_reads_the_newest_and_random_others(keys: FileKeyProvider) -> None:
    """--sample N checks the newest backup and N-1 others; a corrupt one outside is not read."""
    stores = _stores()
    clock = FakeClock()
    ids = []
    for _ in range(5):
        ids.append(run_backup(SETTINGS, FakeEngine({"shop": _data(3000)}), stores, keys, clock))
        clock.advance(3600)
    backup_ids = [r.backup_id for r in ids]
    report = run_verify("shop", stores, keys, sample=2, rng=random.Random(7))
    assert len(report.backups) == 2
    assert backup_ids[-1] in report.backups
    assert report.ok
    # Damage one backup the sample did not pick: the sample cannot see it, a full verify can.
    unpicked = next(b for b in backup_ids if b not in report.backups)
    key = layout.artifact_key("shop", unpicked, "db/shop.pgdump")
    data, at = stores[0].objects[key]
    stores[0].objects[key] = (data[:100] + bytes([data[100] ^ 1]) + data[101:], at)
    again = run_verify("shop", stores, keys, sample=2, rng=random.Random(7))
    assert again.backups == report.backups
    assert again.ok
    assert not run_verify("shop", stores, keys).ok
    assert len(run_verify("shop", stores, keys, sample=9).backups) == 5


class _CancelNotedDump(FakeDump):
    cancelled: ClassVar[list[str]] = []

    def cancel(self) -> None:
        _CancelNotedDump.cancelled.append(self.name)


class _FailingFirstEngine(FakeEngine):
    """The first database's dump fails; a later dump (a MongoDB backup's change follower,
    started by full_dumps) must be stopped too, though it was never read."""

    def full_dumps(self) -> list[DumpStream]:
        return [
            _CancelNotedDump(d.name, d.kind, d.database, d.data, d.fail_after, d.fp)
            for d in super().full_dumps()
            if isinstance(d, FakeDump)
        ]


def test_a_failed_backup_stops_every_dump_the_engine_started(keys: FileKeyProvider) -> None:
    _CancelNotedDump.cancelled = []
    engine = _FailingFirstEngine({"a": _data(), "b": _data()}, fail_dump_after=1)
    with pytest.raises(DatabaseError):
        run_backup(SETTINGS, engine, _stores(), keys, FakeClock())
    assert sorted(_CancelNotedDump.cancelled) == ["db/a.pgdump", "db/b.pgdump", "globals.sql"]


def test_backups_started_within_one_second_are_listed_in_the_order_they_started(
    keys: FileKeyProvider,
) -> None:
    """Ids name the second only; the catalog (and so `list` and restore's "newest") orders by
    the start time, not by the ids' random suffixes."""
    stores = _stores()
    clock = FakeClock()
    ids = []
    for _ in range(6):
        engine = FakeEngine({"shop": _data(5000)})
        ids.append(run_backup(SETTINGS, engine, stores, keys, clock).backup_id)
        clock.advance(0.1)
    assert len({backup_id.split("-")[0] for backup_id in ids}) == 1  # all in one second
    assert [b.backup_id for b in scan_catalog("shop", stores, keys).backups] == ids
