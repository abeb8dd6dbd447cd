"""The physical path as a person types it: backup of the cluster, list, restore into a
directory and start it, and the errors that steer people between --to and --to-dir."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import Env
from tests.fixtures.pg import stop_restored_server

pytestmark = pytest.mark.e2e

CLUSTER_POLICY = """\
version: 1
name: cluster
source:
  kind: postgresql              # mode: physical is the default
  uri: ${{SHOP_DB_URI}}
encryption:
  key: file:${{DRBOT_KEY_DIR}}/shop.key
destinations:
  - name: primary
    url: s3://{bucket1}/cluster
    region: us-east-1
  - name: replica
    url: s3://{bucket2}/cluster
    region: eu-west-1
"""


def _run_as() -> list[str]:
    return ["--run-as", "postgres"] if os.geteuid() == 0 else []


def test_physical_backup_restores_into_a_directory_and_starts(e2e: Env) -> None:
    (Path(e2e.env["DRBOT_POLICIES"]) / "cluster.yaml").write_text(
        CLUSTER_POLICY.format(bucket1=e2e.buckets[0], bucket2=e2e.buckets[1])
    )
    res = e2e.run("backup", "--policy", "cluster")
    assert res.returncode == 0, res.stderr
    assert "cluster on timeline 1" in res.stdout

    listed = e2e.run("list", "--policy", "cluster", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["mode"] == "physical"
    assert row["positions"]["stop_lsn"]
    assert row["restorable"]["gap"] is None

    wrong = e2e.run("restore", "--policy", "cluster", "--to", e2e.pg.uri("x"), "--yes")
    assert wrong.returncode == 2
    assert "--to-dir" in wrong.stderr

    base = Path(tempfile.mkdtemp(prefix="drbot-e2e-"))
    base.chmod(0o755)  # the restored server may run as `postgres`
    target = base / "restored"
    try:
        dry = e2e.run(
            "restore", "--policy", "cluster", "--to-dir", str(target), "--dry-run", *_run_as()
        )
        assert dry.returncode == 0, dry.stderr
        assert "Dry run: nothing was written." in dry.stdout
        assert not target.exists()

        res = e2e.run(
            "restore", "--policy", "cluster", "--to-dir", str(target), "--latest", "--start",
            "--yes", "--json", *_run_as(),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["started"] and out["timeline"] == 2
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{out['port']}/{e2e.database}"
        ) as conn:
            row2 = conn.execute("SELECT count(*) FROM orders").fetchone()
            assert row2 is not None and row2[0] == 5000
        # the recovery settings are gone: a restart does not recover again
        auto = (target / "postgresql.auto.conf").read_text()
        assert "restore_command" not in auto

        again = e2e.run("restore", "--policy", "cluster", "--to-dir", str(target), *_run_as())
        assert again.returncode == 2  # never into a non-empty directory
        assert "not empty" in again.stderr

        trail = e2e.run("audit", "show", "--policy", "cluster", "--json")
        events = json.loads(trail.stdout)
        completed = [e for e in events if e["action"] == "restore.completed"]
        assert completed and completed[-1]["details"]["data_dir"] == str(target)
        assert [e for e in events if e["action"] == "restore.refused"]  # the non-empty one
    finally:
        stop_restored_server(target)
        shutil.rmtree(base, ignore_errors=True)
