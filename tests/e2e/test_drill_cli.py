"""Drills as a person runs them: `drbot drill` into a real container with no network (and the
process sandbox), its exit codes, its evidence, and that nothing is left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import DRBOT, Env
from tests.fixtures.docker import drill_containers

pytestmark = pytest.mark.e2e


def _leftover_workdirs() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob("drbot-drill-*"))


def _add_drill(e2e: Env, text: str) -> None:
    path = Path(e2e.env["DRBOT_POLICIES"]) / "shop.yaml"
    path.write_text(path.read_text() + text)


def test_logical_drill_in_docker_passes_and_leaves_evidence(e2e: Env, docker_image: str) -> None:
    _add_drill(
        e2e,
        "drill:\n  checks:\n    - name: orders-present\n"
        "      sql: SELECT count(*) = 5000 FROM orders\n",
    )
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    res = e2e.run("drill", "--policy", "shop", "--json", timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["passed"] is True
    assert out["sandbox"] == "docker" and out["image"] == docker_image
    assert out["destination"] == "primary"
    assert out["rto_s"] > 0 and out["rpo_s"] >= 0
    names = {c["name"]: c for c in out["checks"]}
    assert names[f"fingerprint:{e2e.database}"]["passed"]
    assert names["amcheck"]["passed"] and "index" in names["amcheck"]["detail"]
    assert names["orders-present"]["passed"]
    assert names["rto"]["passed"] and names["rpo"]["passed"]
    assert set(out["phases"]) >= {"provision", "restore", "start", "checks"}
    assert sorted(out["stored_in"]) == ["primary", "replica"]
    assert not drill_containers() and not _leftover_workdirs()

    # rotate: the next drill proves the other region
    again = e2e.run("drill", "--policy", "shop", "--json", timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["destination"] == "replica"

    hist = e2e.run("drill", "history", "--policy", "shop", "--json")
    assert hist.returncode == 0, hist.stderr
    rows = json.loads(hist.stdout)
    assert [r["destination"] for r in rows] == ["primary", "replica"]
    assert all(r["signature"] == "ok" for r in rows)
    assert sorted(rows[0]["found_in"]) == ["local", "primary", "replica"]

    trail = json.loads(e2e.run("audit", "show", "--policy", "shop", "--json").stdout)
    done = [e for e in trail if e["action"] == "drill.completed"]
    assert len(done) == 2 and done[0]["details"]["record_sha256"]


def test_drill_misses_an_impossible_rto_and_a_false_check(e2e: Env, docker_image: str) -> None:
    path = Path(e2e.env["DRBOT_POLICIES"]) / "shop.yaml"
    path.write_text(
        path.read_text().replace("rto: 30m", "rto: 1s")
        + "drill:\n  checks:\n    - name: no-orders\n      sql: SELECT count(*) = 0 FROM orders\n"
    )
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    res = e2e.run("drill", "--policy", "shop", timeout=300)
    assert res.returncode == 20, res.stderr
    assert "rto:" in res.stderr and "target 1s" in res.stderr
    assert "no-orders: returned false, not true" in res.stderr
    assert "FAILED" in res.stdout
    assert not drill_containers() and not _leftover_workdirs()


def test_drill_of_a_corrupt_backup_is_an_integrity_failure(e2e: Env, docker_image: str) -> None:
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    client = e2e.client("us-east-1")
    (key,) = [k for k in e2e.objects(0) if k.endswith(".pgdump.zst.enc")]
    body = bytearray(client.get_object(Bucket=e2e.buckets[0], Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=e2e.buckets[0], Key=key, Body=bytes(body))
    res = e2e.run("drill", "--policy", "shop", "--from", "primary", "--json", timeout=300)
    assert res.returncode == 13, res.stderr
    out = json.loads(res.stdout)
    assert out["passed"] is False and out["error"]["exit_code"] == 13
    assert not drill_containers() and not _leftover_workdirs()


def test_interrupted_drill_leaves_nothing_behind(e2e: Env, docker_image: str) -> None:
    # A slow check keeps the drill running: a whole drill of this database takes about as long
    # as the pause below, and one that ends first is not interrupted at all.
    _add_drill(
        e2e,
        "drill:\n  checks:\n    - name: slow\n      sql: SELECT pg_sleep(60) IS NOT NULL\n",
    )
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    proc = e2e.popen("drill", "--policy", "shop")
    deadline = time.monotonic() + 60
    while not drill_containers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert drill_containers(), "the drill never started its container"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not drill_containers() and not _leftover_workdirs()
    hist = json.loads(e2e.run("drill", "history", "--policy", "shop", "--json").stdout)
    assert hist and hist[-1]["error"]["exit_code"] == 130


def test_sigint_interrupts_a_drill_started_with_sigint_ignored(e2e: Env) -> None:
    """A script's background job inherits SIGINT ignored; drbot still takes SIGINT as an
    interrupt (the daemon and people stop jobs with it) instead of running on to the end."""
    _add_drill(
        e2e,
        "drill:\n  checks:\n    - name: slow\n      sql: SELECT pg_sleep(60) IS NOT NULL\n",
    )
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    proc = subprocess.Popen(
        [DRBOT, "drill", "--policy", "shop", "--sandbox", "process"],
        env=e2e.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )
    assert proc.stderr is not None
    seen = ""
    for line in proc.stderr:
        seen += line
        if "Checking the restored data" in line:
            break
    time.sleep(1)  # inside the 60 s check
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + err
    assert time.monotonic() - started < 30, "the check ran on instead of being interrupted"
    assert not _leftover_workdirs()


def test_logical_drill_in_the_process_sandbox(e2e: Env) -> None:
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    res = e2e.run("drill", "--policy", "shop", "--sandbox", "process", "--json", timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["passed"] and out["sandbox"] == "process"
    assert not _leftover_workdirs()


def test_a_missing_image_is_named_and_never_pulled(e2e: Env, docker_image: str) -> None:
    _add_drill(e2e, "drill:\n  image: drbot-no-such-image:0\n")
    assert e2e.run("backup", "--policy", "shop").returncode == 0
    res = e2e.run("drill", "--policy", "shop", timeout=120)
    assert res.returncode == 17, res.stderr
    assert "drbot-no-such-image:0 is not on this Docker engine" in res.stderr
    assert "make images" in res.stderr
    assert not drill_containers() and not _leftover_workdirs()
