"""Shipping the audit trail: segments join into the trail, anchors catch cuts and rewrites."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from drbot.audit.ship import check_anchors, fetch_shipped, ship_trail, trail_id
from drbot.audit.trail import TRAIL_NAME, FileAuditTrail, load_signing_key
from drbot.audit.verify import verify_trail
from drbot.clock import FakeClock
from drbot.errors import IntegrityFailure
from drbot.storage import layout
from drbot.storage.memory import MemoryStorage

pytestmark = pytest.mark.unit


def _trail(tmp_path: Path, events: int) -> FileAuditTrail:
    trail = FileAuditTrail(tmp_path, FakeClock(datetime(2026, 11, 23, tzinfo=UTC)), actor="t@h")
    for i in range(events):
        trail.record("backup.completed", policy="shop", subject={"n": i})
    return trail


def _verify_shipped(storage: MemoryStorage, trail: FileAuditTrail) -> list[str]:
    public = load_signing_key(trail.key_path).public_key()
    data, anchors = fetch_shipped(storage, public)
    report = verify_trail(data, public)
    check_anchors(report, anchors, public)
    return [p.kind for p in report.problems]


def test_shipped_segments_join_into_the_trail_and_verify(tmp_path: Path) -> None:
    trail = _trail(tmp_path, 5)
    key = load_signing_key(trail.key_path)
    stores = [MemoryStorage("primary"), MemoryStorage("replica")]
    first = ship_trail(tmp_path, stores, key, FakeClock())
    assert first.anchored_seq == 5
    assert not first.failed
    trail.record("verify.completed", policy="shop")
    trail.record("restore.completed", policy="shop")
    second = ship_trail(tmp_path, stores, key, FakeClock())
    assert second.anchored_seq == 7
    local = (tmp_path / TRAIL_NAME).read_bytes()
    assert second.shipped_bytes["primary"] == len(local) - first.shipped_bytes["primary"]
    for store in stores:
        data, anchors = fetch_shipped(store, key.public_key())
        assert data == local
        assert [a.seq for a in anchors] == [5, 7]
        assert _verify_shipped(store, trail) == []
    # Nothing new: nothing sent, and the anchor for the head is not written twice.
    assert ship_trail(tmp_path, stores, key, FakeClock()).shipped_bytes == {
        "primary": 0,
        "replica": 0,
    }


def test_cutting_the_tail_everywhere_but_the_anchor_is_detected(tmp_path: Path) -> None:
    """Segments deleted and the local file cut: the (object-locked) anchor still shows it."""
    trail = _trail(tmp_path, 3)
    key = load_signing_key(trail.key_path)
    store = MemoryStorage("primary")
    ship_trail(tmp_path, [store], key, FakeClock())
    trail.record("backup.failed", policy="shop", outcome="failed")
    ship_trail(tmp_path, [store], key, FakeClock())
    tid = trail_id(key.public_key())
    last = max(k for k in store.objects if layout.parse_audit_segment_key(tid, k))
    del store.objects[last]
    assert _verify_shipped(store, trail) == ["truncated"]


def test_a_deleted_middle_segment_is_missing_bytes(tmp_path: Path) -> None:
    trail = _trail(tmp_path, 2)
    key = load_signing_key(trail.key_path)
    store = MemoryStorage("primary")
    for _ in range(3):
        trail.record("verify.completed", policy="shop")
        ship_trail(tmp_path, [store], key, FakeClock())
    tid = trail_id(key.public_key())
    segments = sorted(k for k in store.objects if layout.parse_audit_segment_key(tid, k))
    del store.objects[segments[1]]
    with pytest.raises(IntegrityFailure, match="are missing"):
        fetch_shipped(store, key.public_key())


def test_a_rewritten_history_contradicts_its_anchor(tmp_path: Path) -> None:
    """Even the key holder cannot rewrite shipped history: the anchor keeps the old hash."""
    trail = _trail(tmp_path, 4)
    key = load_signing_key(trail.key_path)
    store = MemoryStorage("primary")
    ship_trail(tmp_path, [store], key, FakeClock())
    # Rewrite: a fresh trail with the same key and as many events, different content.
    other = tmp_path / "rewritten"
    other.mkdir()
    forged = FileAuditTrail(
        other, FakeClock(datetime(2026, 11, 23, tzinfo=UTC)), key_path=trail.key_path, actor="t@h"
    )
    for i in range(4):
        forged.record("backup.completed", policy="shop", subject={"n": i + 5})  # same length
    tid = trail_id(key.public_key())
    segment = next(k for k in store.objects if layout.parse_audit_segment_key(tid, k))
    store.objects[segment] = ((other / TRAIL_NAME).read_bytes(), store.objects[segment][1])
    assert len(store.objects[segment][0]) == len((tmp_path / TRAIL_NAME).read_bytes())
    assert _verify_shipped(store, trail) == ["rewritten"]


def test_a_local_trail_that_was_cut_is_not_shipped_over_the_stored_one(tmp_path: Path) -> None:
    trail = _trail(tmp_path, 4)
    key = load_signing_key(trail.key_path)
    store = MemoryStorage("primary")
    ship_trail(tmp_path, [store], key, FakeClock())
    path = tmp_path / TRAIL_NAME
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:2]) + b"\n")
    result = ship_trail(tmp_path, [store], key, FakeClock())
    assert "cut or replaced" in result.failed["primary"]
    assert _verify_shipped(store, trail) == []


def test_a_broken_local_trail_is_not_spread(tmp_path: Path) -> None:
    trail = _trail(tmp_path, 3)
    key = load_signing_key(trail.key_path)
    path = tmp_path / TRAIL_NAME
    path.write_bytes(path.read_bytes().replace(b'"n":1', b'"n":9'))
    with pytest.raises(IntegrityFailure, match="fails verification"):
        ship_trail(tmp_path, [MemoryStorage("primary")], key, FakeClock())


def test_an_older_anchor_copied_over_a_newer_one_is_caught(tmp_path: Path) -> None:
    """Overwriting the newest anchor with an older, validly signed one would hide a cut."""
    trail = _trail(tmp_path, 3)
    key = load_signing_key(trail.key_path)
    store = MemoryStorage("primary")
    ship_trail(tmp_path, [store], key, FakeClock())
    trail.record("verify.completed", policy="shop")
    ship_trail(tmp_path, [store], key, FakeClock())
    tid = trail_id(key.public_key())
    old, new = layout.audit_anchor_key(tid, 3), layout.audit_anchor_key(tid, 4)
    store.objects[new] = store.objects[old]
    with pytest.raises(IntegrityFailure, match="anchors were moved"):
        fetch_shipped(store, key.public_key())


def test_a_destination_without_the_trail_does_not_verify(tmp_path: Path) -> None:
    trail = _trail(tmp_path, 1)
    key = load_signing_key(trail.key_path)
    with pytest.raises(IntegrityFailure, match="no audit trail segments"):
        fetch_shipped(MemoryStorage("primary"), key.public_key())
