"""Carrying out a retention plan against in-memory destinations: manifests first, a prune cut
short never leaves a backup that looks complete, and the next cleanup finishes the job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from drbot.catalog import scan_catalog
from drbot.clock import FakeClock
from drbot.errors import StorageUnavailable
from drbot.ops.backup import BackupSettings, run_backup
from drbot.ops.cleanup import cleanup_incomplete
from drbot.ops.prune import execute_prune, gather_facts
from drbot.ops.retention import RetentionPlan, plan_retention
from drbot.pipeline.filekey import FileKeyProvider, generate_key_file
from drbot.policy.schema import Retention
from drbot.storage.memory import MemoryStorage
from tests.unit.fakes import FakeEngine

pytestmark = pytest.mark.unit

SETTINGS = BackupSettings(policy="shop", engine_name="postgresql", frame_size=4096)
START = datetime(2026, 11, 1, tzinfo=UTC)


class DiesOnDelete(MemoryStorage):
    """Fails the n-th delete, as if the process died or the network went away there."""

    def __init__(self, name: str, region: str, fail_at: int) -> None:
        super().__init__(name, region=region)
        self.deletes = 0
        self.fail_at = fail_at

    def delete(self, key: str) -> None:
        self.deletes += 1
        if self.deletes == self.fail_at:
            raise StorageUnavailable(f"{self.name}: gone while deleting {key}")
        super().delete(key)


def _setup(tmp_path: Path, fail_at: int = 0) -> tuple[list[MemoryStorage], FileKeyProvider]:
    generate_key_file(tmp_path / "k.key")
    keys = FileKeyProvider(tmp_path / "k.key")
    stores: list[MemoryStorage] = [
        DiesOnDelete("primary", "us-east-1", fail_at),
        MemoryStorage("replica", region="eu-west-1"),
    ]
    clock = FakeClock(START)
    for _ in range(4):
        run_backup(SETTINGS, FakeEngine({"shop": b"rows" * 1000}), stores, keys, clock)
        clock.advance(86400)
    return stores, keys


def _plan(
    stores: list[MemoryStorage], keys: FileKeyProvider, days: int | None = None
) -> tuple[RetentionPlan, dict[str, int | None]]:
    scan = scan_catalog("shop", stores, keys)
    locks: dict[str, int | None] = {s.name: days for s in stores}
    facts = gather_facts("shop", scan, stores, locks)
    return plan_retention(facts, Retention(keep_last=2), START + timedelta(days=5)), locks


def test_prune_deletes_every_object_of_the_backups_it_lets_go(tmp_path: Path) -> None:
    stores, keys = _setup(tmp_path)
    plan, locks = _plan(stores, keys)
    assert len(plan.delete) == 2
    result = execute_prune("shop", plan, stores, locks, START + timedelta(days=5))
    assert result.deleted == plan.delete and not result.failed
    for store in stores:
        assert not [k for k in store.objects if any(b in k for b in plan.delete)]
    assert [b.backup_id for b in scan_catalog("shop", stores, keys).backups] == sorted(plan.keep)


@pytest.mark.parametrize("fail_at", range(1, 7))  # 2 backups x 3 objects in primary
def test_a_prune_cut_short_never_leaves_a_backup_that_looks_complete(
    tmp_path: Path, fail_at: int
) -> None:
    stores, keys = _setup(tmp_path, fail_at)
    plan, locks = _plan(stores, keys)
    result = execute_prune("shop", plan, stores, locks, START + timedelta(days=5))
    assert result.failed  # the fault hit
    # No manifest is left whose artifacts are (partly) gone: the catalog would report it.
    scan = scan_catalog("shop", stores, keys)
    assert scan.problems == []
    assert len(scan.backups) >= 2
    # the next backup's cleanup removes what the cut-short prune left without a manifest
    cleanup_incomplete("shop", stores)
    dying = stores[0]
    assert isinstance(dying, DiesOnDelete)
    dying.fail_at = 0
    again, _ = _plan(stores, keys)
    execute_prune("shop", again, stores, locks, START + timedelta(days=5))
    left = {k.split("/")[2] for s in stores for k in s.objects if "/backups/" in k}
    assert left == set(again.keep)


def test_object_lock_keeps_a_backup_until_its_last_write_plus_the_lock(tmp_path: Path) -> None:
    stores, keys = _setup(tmp_path)
    plan, _locks = _plan(stores, keys, days=30)
    assert plan.delete == [] and len(plan.locked) == 2
    for until in plan.locked.values():
        assert until > START + timedelta(days=30)


def _wal_store(name: str) -> MemoryStorage:
    """WAL of a cluster with 1 MiB segments: numbers 0x1FFE..0x2002 cross into log file 2."""
    from drbot.engines.postgres.wal import Segment
    from drbot.storage import layout

    store = MemoryStorage(name, region="us-east-1")
    size = 1 << 20
    for number in range(0x1FFE, 0x2003):
        seg = Segment(1, number).name(size)
        store.objects[layout.wal_segment_key("shop", seg)] = (b"w", START)
    store.objects[layout.wal_segment_key("shop", Segment(1, 0x1FFF).name(size), partial=True)] = (
        b"p",
        START,
    )
    store.objects[layout.wal_history_key("shop", "00000002.history")] = (b"h", START)
    store.objects[layout.wal_heartbeat_key("shop")] = (b"b", START)
    return store


def test_wal_goes_below_the_cutoff_in_the_clusters_own_segment_size() -> None:
    from drbot.ops.retention import RetentionPlan

    store = _wal_store("primary")
    plan = RetentionPlan(keep={"x": ["newest backup"]}, wal_before_segment=0x2001,
                         wal_segment_size=1 << 20)  # fmt: skip
    result = execute_prune("shop", plan, [store], {"primary": None}, START + timedelta(days=1))
    left = sorted(k.rsplit("/", 1)[1] for k in store.objects)
    # 0x1FFE..0x2000 (and the partial 0x1FFF) are gone; 0x2001, 0x2002, history, heartbeat stay
    assert result.wal_deleted == 4
    assert left == [
        "000000010000000200000001.zst.enc",
        "000000010000000200000002.zst.enc",
        "00000002.history.zst.enc",
        "heartbeat.zst.enc",
    ]


def test_locked_wal_stays_and_no_wal_goes_when_a_backup_could_not_be_deleted() -> None:
    from drbot.ops.retention import RetentionPlan

    store = _wal_store("primary")
    plan = RetentionPlan(keep={"x": ["newest backup"]}, wal_before_segment=0x2001,
                         wal_segment_size=1 << 20)  # fmt: skip
    locked = execute_prune("shop", plan, [store], {"primary": 30}, START + timedelta(days=1))
    assert (locked.wal_deleted, locked.wal_locked) == (0, 4)
    failing = RetentionPlan(delete=["20261101T000000Z-abcdef"], wal_before_segment=0x2001,
                            wal_segment_size=1 << 20)  # fmt: skip
    broken = DiesOnDelete("primary", "us-east-1", fail_at=1)
    broken.objects.update(store.objects)
    broken.objects["shop/backups/20261101T000000Z-abcdef/manifest.json"] = (b"m", START)
    result = execute_prune("shop", failing, [broken], {"primary": None}, START + timedelta(days=9))
    assert result.failed and result.wal_deleted == 0
