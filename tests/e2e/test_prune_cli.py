"""drbot prune as a person runs it: the plan with a reason for every keep, then the deletion,
recorded in the audit trail, in both regions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import Env

pytestmark = pytest.mark.e2e


def test_prune_shows_its_plan_then_deletes_what_the_rules_let_go(e2e: Env) -> None:
    policy = Path(e2e.env["DRBOT_POLICIES"]) / "shop.yaml"
    policy.write_text(policy.read_text() + "retention:\n  keep_last: 2\n")
    for _ in range(4):  # two to keep, two to delete
        assert e2e.run("backup", "--policy", "shop").returncode == 0
    ids = [r["id"] for r in json.loads(e2e.run("list", "--policy", "shop", "--json").stdout)]
    before = (e2e.objects(0), e2e.objects(1))

    dry = e2e.run("prune", "--policy", "shop", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"keep    {ids[-1]}  newest backup; last 1 of 2" in dry.stdout
    assert f"keep    {ids[-2]}  last 2 of 2" in dry.stdout
    assert f"delete  {ids[0]}" in dry.stdout and "nothing was deleted" in dry.stdout
    assert (e2e.objects(0), e2e.objects(1)) == before

    refused = e2e.run("prune", "--policy", "shop")  # no terminal, no --yes
    assert refused.returncode == 2

    res = e2e.run("prune", "--policy", "shop", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert sorted(out["deleted"]) == sorted(ids[:2])
    listed = [r["id"] for r in json.loads(e2e.run("list", "--policy", "shop", "--json").stdout)]
    assert listed == ids[2:]
    for bucket in (0, 1):
        assert not [k for k in e2e.objects(bucket) if ids[0] in k or ids[1] in k]

    events = json.loads(e2e.run("audit", "show", "--policy", "shop", "--json").stdout)
    actions = [e["action"] for e in events]
    assert actions.count("prune.deleted") == 2 and "prune.completed" in actions
    planned = [e for e in events if e["action"] == "prune.planned"]
    assert planned[-1]["details"]["keep"][ids[-1]] == ["newest backup", "last 1 of 2"]
