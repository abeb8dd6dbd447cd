"""Key lifecycle as a person runs it: rotate, check before retiring, restore with the new key
alone, refuse unusable keys without writing, and shred one policy's keys but no other's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import Env

pytestmark = pytest.mark.e2e


def _policy(e2e: Env, name: str = "shop") -> Path:
    return Path(e2e.env["DRBOT_POLICIES"]) / f"{name}.yaml"


def _objects(e2e: Env) -> dict[str, str]:
    """Every object in both buckets with its ETag, as S3 itself reports them."""
    out = {}
    for i, region in enumerate(("us-east-1", "eu-west-1")):
        resp = e2e.client(region).list_objects_v2(Bucket=e2e.buckets[i])
        out.update({f"{i}:{o['Key']}": o["ETag"] for o in resp.get("Contents", [])})
    return out


def test_rotate_then_check_then_restore_with_the_new_key_alone(e2e: Env) -> None:
    keys = Path(e2e.env["DRBOT_KEY_DIR"])
    old, new = keys / "shop.key", keys / "shop-2027.key"
    for _ in range(2):
        assert e2e.run("backup", "--policy", "shop").returncode == 0
    assert e2e.run("keys", "generate", "--out", str(new)).returncode == 0
    before = _objects(e2e)

    held = e2e.run("keys", "check", "--policy", "shop", "--key", f"file:{old}")
    assert held.returncode == 18, held.stderr
    assert held.stdout.count("backup ") == 4  # two backups, two destinations

    # The recommended order names the key in the policy first (every process then opens
    # both); a dry run with the key not named yet warns about the other order.
    early = e2e.run("keys", "rotate", "--policy", "shop", "--to", f"file:{new}", "--dry-run")
    assert early.returncode == 0 and "does not name" in early.stderr
    _policy(e2e).write_text(
        _policy(e2e)
        .read_text()
        .replace(
            "  key: file:${DRBOT_KEY_DIR}/shop.key",
            "  key: file:${DRBOT_KEY_DIR}/shop-2027.key\n"
            "  previous_keys:\n    - file:${DRBOT_KEY_DIR}/shop.key",
        )
    )
    dry = e2e.run("keys", "rotate", "--policy", "shop", "--to", f"file:{new}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "To re-wrap: 4 manifest(s)" in dry.stdout and _objects(e2e) == before

    res = e2e.run("keys", "rotate", "--policy", "shop", "--to", f"file:{new}")
    assert res.returncode == 0, res.stderr
    assert "Re-wrapped 4 manifest(s)" in res.stdout
    after = _objects(e2e)
    changed = {k for k in before if after[k] != before[k]}
    assert changed and all(k.endswith("/manifest.json") for k in changed)  # no data object
    again = e2e.run("keys", "rotate", "--policy", "shop", "--json")  # --to: the policy's key
    assert again.returncode == 0 and json.loads(again.stdout)["manifests_rewrapped"] == 0

    free = e2e.run("keys", "check", "--policy", "shop", "--key", f"file:{old}", "--json")
    assert free.returncode == 0, free.stderr
    assert json.loads(free.stdout)["remaining"] == 0

    # The old key leaves the policy and is destroyed: restores still work.
    _policy(e2e).write_text(
        _policy(e2e)
        .read_text()
        .replace("  previous_keys:\n    - file:${DRBOT_KEY_DIR}/shop.key\n", "")
    )
    assert "previous_keys" not in _policy(e2e).read_text()
    old.unlink()
    e2e.pg.create_database("shop_rotated")
    restored = e2e.run("restore", "--policy", "shop", "--to", e2e.pg.uri("shop_rotated"), "--yes")
    assert restored.returncode == 0, restored.stderr
    with psycopg.connect(e2e.pg.uri("shop_rotated")) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (5000,)
    events = json.loads(e2e.run("audit", "show", "--json").stdout)
    assert [e for e in events if e["action"] == "key.rotated"]


def test_an_unusable_new_key_is_refused_and_nothing_is_written(e2e: Env) -> None:
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    before = _objects(e2e)
    keys = Path(e2e.env["DRBOT_KEY_DIR"])
    text = _policy(e2e).read_text()

    def name_key(new: str) -> None:
        _policy(e2e).write_text(
            text.replace(
                "  key: file:${DRBOT_KEY_DIR}/shop.key",
                f"  key: file:{new}\n  previous_keys:\n    - file:${{DRBOT_KEY_DIR}}/shop.key",
            )
        )

    name_key("/nonexistent/k.key")
    missing = e2e.run("keys", "rotate", "--policy", "shop")
    assert missing.returncode == 12, missing.stderr
    loose = keys / "loose.key"
    assert e2e.run("keys", "generate", "--out", str(loose)).returncode == 0
    os.chmod(loose, 0o644)
    name_key(str(loose))
    too_open = e2e.run("keys", "rotate", "--policy", "shop")
    assert too_open.returncode == 12, too_open.stderr
    assert "loose.key" in too_open.stderr
    # the old key is the wrong one: nothing opens, nothing is written
    other = keys / "other.key"
    assert e2e.run("keys", "generate", "--out", str(other)).returncode == 0
    new = keys / "new.key"
    assert e2e.run("keys", "generate", "--out", str(new)).returncode == 0
    _policy(e2e).write_text(
        text.replace(
            "  key: file:${DRBOT_KEY_DIR}/shop.key",
            f"  key: file:{new}\n  previous_keys: [file:{other}]",
        )
    )
    wrong_old = e2e.run("keys", "rotate", "--policy", "shop")
    assert wrong_old.returncode == 12, wrong_old.stderr
    assert _objects(e2e) == before


def test_shredding_one_policy_leaves_its_backups_unreadable_and_others_intact(e2e: Env) -> None:
    keys = Path(e2e.env["DRBOT_KEY_DIR"])
    assert e2e.run("keys", "generate", "--out", str(keys / "other.key")).returncode == 0
    _policy(e2e, "other").write_text(
        _policy(e2e)
        .read_text()
        .replace("name: shop", "name: other")
        .replace("shop.key", "other.key")
        .replace("/shop\n", "/other\n")
    )
    for name in ("shop", "other"):
        assert e2e.run("backup", "--policy", name).returncode == 0

    wrong = e2e.run("keys", "shred", "--policy", "shop", "--confirm", "shp")
    assert wrong.returncode == 2 and (keys / "shop.key").exists()
    res = e2e.run("keys", "shred", "--policy", "shop", "--confirm", "shop")
    assert res.returncode == 0, res.stderr
    assert not (keys / "shop.key").exists()

    gone = e2e.run("restore", "--policy", "shop", "--to", e2e.pg.uri("shop_x"), "--yes")
    assert gone.returncode == 12, gone.stderr
    e2e.pg.create_database("other_ok")
    ok = e2e.run("restore", "--policy", "other", "--to", e2e.pg.uri("other_ok"), "--yes")
    assert ok.returncode == 0, ok.stderr
    events = json.loads(e2e.run("audit", "show", "--json").stdout)
    shredded = [e for e in events if e["action"] == "key.shredded"]
    assert shredded and shredded[-1]["policy"] == "shop"

    # a key two policies share is never shredded
    _policy(e2e, "third").write_text(
        _policy(e2e, "other").read_text().replace("name: other", "name: third")
    )
    shared = e2e.run("keys", "shred", "--policy", "other", "--confirm", "other")
    assert shared.returncode == 2 and "also uses" in shared.stderr
    assert (keys / "other.key").exists()


def test_shred_refuses_while_data_stays_wrapped_by_a_key_the_policy_dropped(e2e: Env) -> None:
    # Rotation re-wraps manifests only: data objects keep the original key's wrapping, so
    # shredding the current key alone would leave everything readable with the old one.
    keys = Path(e2e.env["DRBOT_KEY_DIR"])
    old, new = keys / "shop.key", keys / "shop-2027.key"
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    assert e2e.run("keys", "generate", "--out", str(new)).returncode == 0
    text = _policy(e2e).read_text()
    rotated = text.replace("  key: file:${DRBOT_KEY_DIR}/shop.key", f"  key: file:{new}")
    _policy(e2e).write_text(
        rotated.replace("  key: ", f"  previous_keys:\n    - file:{old}\n  key: ")
    )
    assert e2e.run("keys", "rotate", "--policy", "shop").returncode == 0
    _policy(e2e).write_text(rotated)  # the old key retired from the policy, but not destroyed

    refused = e2e.run("keys", "shred", "--policy", "shop", "--confirm", "shop")
    assert refused.returncode == 2, refused.stderr
    assert "also wrapped by file:" in refused.stderr and new.exists()

    _policy(e2e).write_text(
        rotated.replace("  key: ", f"  previous_keys:\n    - file:{old}\n  key: ")
    )
    res = e2e.run("keys", "shred", "--policy", "shop", "--confirm", "shop")
    assert res.returncode == 0, res.stderr
    assert not old.exists() and not new.exists()
    again = e2e.run("keys", "shred", "--policy", "shop", "--confirm", "shop")  # idempotent
    assert again.returncode == 0, again.stderr
    assert "already destroyed" in again.stdout


def test_rotating_before_the_policy_names_the_key_works_and_says_what_to_do(e2e: Env) -> None:
    # The order: rotate --to NEW first, then change the policy.
    keys = Path(e2e.env["DRBOT_KEY_DIR"])
    new = keys / "shop-2027.key"
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    assert e2e.run("keys", "generate", "--out", str(new)).returncode == 0
    res = e2e.run("keys", "rotate", "--policy", "shop", "--to", f"file:{new}")
    assert res.returncode == 0, res.stderr
    assert "Next: set encryption.key:" in res.stdout and "does not name" in res.stderr
    _policy(e2e).write_text(_policy(e2e).read_text().replace("shop.key", "shop-2027.key"))
    e2e.pg.create_database("shop_after")
    restored = e2e.run("restore", "--policy", "shop", "--to", e2e.pg.uri("shop_after"), "--yes")
    assert restored.returncode == 0, restored.stderr
