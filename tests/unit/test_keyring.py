"""A policy's key ring and the pure rotation planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from drbot.errors import KeyProblem
from drbot.ops.rotate import KeyInventory, ManifestItem, WalGroup, plan_rotation, still_under
from drbot.pipeline.filekey import FileKeyProvider, generate_key_file
from drbot.pipeline.keyring import KeyRing
from drbot.pipeline.keys import WrappedKey

pytestmark = pytest.mark.unit


def _key(tmp_path: Path, name: str) -> FileKeyProvider:
    generate_key_file(tmp_path / name)
    return FileKeyProvider(tmp_path / name)


def test_the_ring_wraps_with_the_current_key_and_opens_with_whichever_made_it(
    tmp_path: Path,
) -> None:
    old, new, stranger = (_key(tmp_path, n) for n in ("old", "new", "stranger"))
    data_key, by_old = old.generate(None)
    ring = KeyRing(new, [old])
    assert ring.unwrap(by_old, None) == data_key
    assert ring.wrap(data_key, None).key_id == new.key_id(None)
    assert ring.key_id(None) == new.key_id(None)
    _, by_stranger = stranger.generate(None)
    with pytest.raises(KeyProblem, match=new.describe().split(":", 1)[1]):
        ring.unwrap(by_stranger, None)
    # a previous key whose file is gone does not hide what the current key opens
    (tmp_path / "old").unlink()
    _, by_new = new.generate(None)
    assert len(KeyRing(new, [FileKeyProvider(tmp_path / "old")]).unwrap(by_new, None)) == 32


def test_planning_skips_what_is_done_and_retirement_counts_what_is_left() -> None:
    to = {"east": "new-e", "west": "new-w"}
    w_old, w_done = WrappedKey("old", b"a"), WrappedKey("old", b"b")
    inv = KeyInventory(
        manifests=[
            ManifestItem("east", "b1", "old"),
            ManifestItem("east", "b2", "new-e"),
            ManifestItem("west", "b1", "old"),
        ],
        wal=[WalGroup("east", w_old, 3, "x"), WalGroup("west", w_done, 2, "y", "new-w")],
    )
    plan = plan_rotation(inv, to)
    assert [(m.destination, m.backup_id) for m in plan.manifests] == [
        ("east", "b1"),
        ("west", "b1"),
    ]
    assert [g.wrapped for g in plan.wal] == [w_old]
    assert (plan.done_manifests, plan.done_wal) == (1, 1)
    left = still_under(inv, {"east": {"old"}, "west": {"old"}})
    assert len(left.manifests) == 2 and [g.objects for g in left.wal] == [3]
