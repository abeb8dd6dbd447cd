"""Drill planning and evidence as pure logic: destination rotation, restore-point picks,
target checks, and signed records that show any change."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drbot.drills.plan import pick_destination, pick_logical_backup, pick_time, target_checks
from drbot.drills.record import read_history, record_ok, seal_record, store_record
from drbot.errors import NoRestorePoint, UsageError
from drbot.storage.memory import MemoryStorage
from tests.unit.test_pitr_plan import _entry
from tests.unit.test_policy import problems_of, shop_data, write

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 1, tzinfo=UTC)
DESTS = ["east", "west", "north"]


def test_rotation_walks_every_destination_in_policy_order() -> None:
    seen, last = [], None
    for _ in range(4):
        last = pick_destination(DESTS, "rotate", None, last)
        seen.append(last)
    assert seen == ["east", "west", "north", "east"]
    # a destination no longer in the policy starts the rotation over
    assert pick_destination(DESTS, "rotate", None, "gone") == "east"


def test_from_option_and_a_fixed_setting_win_over_rotation() -> None:
    assert pick_destination(DESTS, "rotate", "north", "east") == "north"
    assert pick_destination(DESTS, "west", None, "west") == "west"
    with pytest.raises(UsageError, match="unknown destination 'south'"):
        pick_destination(DESTS, "rotate", "south", None)


def test_random_pick_stays_inside_the_window_and_the_restorable_range() -> None:
    rng = random.Random(7)
    now = T0 + timedelta(days=30)
    earliest, newest = T0 + timedelta(days=25), now - timedelta(minutes=1)
    picks = [pick_time(now, earliest, newest, timedelta(days=7), rng) for _ in range(500)]
    assert all(earliest <= p <= newest for p in picks)
    assert min(picks) < earliest + timedelta(hours=12)  # the whole range gets used
    assert max(picks) > newest - timedelta(hours=12)
    # a window shorter than the chain: never older than the window
    short = [pick_time(now, earliest, newest, timedelta(hours=1), rng) for _ in range(100)]
    assert all(p >= now - timedelta(hours=1) for p in short)
    # nothing restorable inside the window: the newest point
    assert pick_time(now, newest, newest, timedelta(hours=1), rng) == newest


def test_logical_pick_is_the_newest_dump_not_after_the_moment() -> None:
    backups = [
        _entry(f"2026110{d}T000000Z-00000{d}", T0 + timedelta(days=d), mode="logical")
        for d in (1, 2, 3)
    ]
    assert pick_logical_backup(backups, None).backup_id.startswith("20261103")
    at = backups[1].manifest.started_at + timedelta(hours=1)
    assert pick_logical_backup(backups, at).backup_id == backups[1].backup_id
    with pytest.raises(NoRestorePoint, match="no backup is as old as"):
        pick_logical_backup(backups, backups[0].manifest.started_at - timedelta(seconds=1))
    with pytest.raises(NoRestorePoint):
        pick_logical_backup([], None)


def test_targets_pass_at_the_limit_and_name_the_miss() -> None:
    ok = target_checks(
        rto_s=60.0, rpo_s=300.0, rto_target=timedelta(minutes=1), rpo_target=timedelta(minutes=5)
    )
    assert [(c.name, c.passed) for c in ok] == [("rto", True), ("rpo", True)]
    missed = target_checks(
        rto_s=61.5, rpo_s=None, rto_target=timedelta(minutes=1), rpo_target=timedelta(minutes=5)
    )
    assert not missed[0].passed and "missed by 1.5s" in missed[0].detail
    assert not missed[1].passed and "unknown" in missed[1].detail
    assert target_checks(rto_s=1e9, rpo_s=1e9, rto_target=None, rpo_target=None) == []


def _record(**extra: Any) -> dict[str, Any]:
    return {"drill_id": "20261123T100000Z-abcdef", "policy": "shop", "destination": "east",
            "passed": True, "rto_s": 12.5, **extra}  # fmt: skip


def test_a_sealed_record_verifies_and_any_change_shows() -> None:
    key = Ed25519PrivateKey.generate()
    env = seal_record(_record(), key)
    assert record_ok(env) and record_ok(env, key.public_key())
    edited = {**env, "record": _record(passed=False)}
    assert not record_ok(edited)
    resealed_by_other = seal_record(_record(passed=False), Ed25519PrivateKey.generate())
    assert record_ok(resealed_by_other)  # self-consistent, but not ours:
    assert not record_ok(resealed_by_other, key.public_key())
    assert not record_ok({"record": _record()})


def test_history_merges_copies_and_lists_a_tampered_copy_apart(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    east, west = MemoryStorage("east"), MemoryStorage("west")
    env = seal_record(_record(), key)
    stored = store_record(env, tmp_path, [east, west])
    assert stored.destinations == ("east", "west") and stored.local is not None
    entries, down = read_history("shop", tmp_path, [east, west], key.public_key())
    assert down == {}
    (entry,) = entries
    assert entry.signature_ok and entry.found_in == ("local", "east", "west")
    # someone rewrites the copy in west to say something else
    forged = seal_record(_record(passed=False), Ed25519PrivateKey.generate())
    west.put("shop/drills/20261123T100000Z-abcdef.json", [json.dumps(forged).encode()])
    entries, _ = read_history("shop", tmp_path, [east, west], key.public_key())
    assert sorted((e.found_in, e.signature) for e in entries) == [
        (("local", "east"), "ok"),
        (("west",), "other-key"),
    ]
    # an edited copy that kept the old signature is damaged, not merely foreign
    edited = {**env, "record": _record(passed=False)}
    west.put("shop/drills/20261123T100000Z-abcdef.json", [json.dumps(edited).encode()])
    entries, _ = read_history("shop", tmp_path, [east, west], key.public_key())
    assert ("west",) in [e.found_in for e in entries if e.signature == "bad"]


def test_drill_policy_fields_are_checked(tmp_path: Path) -> None:
    data = shop_data()
    data["drill"] = {
        "pick": {"random_within": "7d"},
        "memory": "512m",
        "cpus": 1.5,
        "checks": [{"sql": "select true"}, {"name": "orders", "sql": "select true"}],
    }
    from drbot.policy.load import load_policy
    from tests.unit.test_policy import ENV

    policy = load_policy(write(tmp_path, "ok.yaml", data), ENV)
    assert [c.name for c in policy.drill.checks] == ["check-1", "orders"]
    assert policy.drill.pull is False and policy.drill.timeout == timedelta(hours=2)
    data["drill"] = {
        "memory": "lots",
        "checks": [{"name": "a", "sql": "select 1"}, {"name": "a", "sql": "select 2"}],
        "pick": "oldest",
    }
    problems = "\n".join(problems_of(write(tmp_path, "bad.yaml", data)))
    assert "drill.memory" in problems
    assert "check name 'a' is used more than once" in problems
    assert "drill.pick" in problems
