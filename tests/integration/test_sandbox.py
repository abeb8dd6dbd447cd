"""Sandboxes and drill checks against real parts: a container with no network, a sweep that
spares live drills, and policy checks that can neither write nor reach the host."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

import psycopg
import pytest

from drbot.drills import checks as chk
from drbot.drills.docker_sandbox import LABEL, LABEL_OWNER, LABEL_WORKDIR, DockerSandbox
from drbot.drills.process_sandbox import ProcessSandbox
from drbot.engines.postgres.localserver import LocalPostgres, find_bin_dir
from drbot.errors import SandboxUnavailable
from drbot.policy.schema import Check
from tests.fixtures.docker import drill_containers

pytestmark = pytest.mark.integration


def test_a_docker_sandbox_has_only_loopback_and_leaves_nothing(docker_image: str) -> None:
    sandbox = DockerSandbox()
    with sandbox.provision(policy="t", major=15) as session:
        assert session.description == docker_image
        nets = session.run(["ls", "/sys/class/net"])
        assert nets.returncode == 0 and nets.stdout.split() == ["lo"]
        assert session.run(["id", "-un"]).stdout.strip() == "postgres"
        assert session.run(["sh", "-c", "command -v postgres"]).returncode == 0
        # the work directory is the same path on both sides
        (session.workdir / "probe").write_text("x")
        assert session.run(["cat", str(session.workdir / "probe")]).stdout == "x"
        workdir = session.workdir
        assert len(drill_containers()) == 1
    assert not drill_containers()
    assert not workdir.exists()


def test_the_sweep_spares_live_drills_and_removes_abandoned_ones(
    docker_image: str, tmp_path: Path
) -> None:
    import docker

    client = docker.from_env()
    dead = subprocess.Popen(["true"])
    dead.wait()
    owners = {"live": os.getpid(), "abandoned": dead.pid}
    made = {}
    for what, pid in owners.items():
        workdir = tmp_path / f"drbot-drill-{what}"
        workdir.mkdir()
        made[what] = client.containers.run(
            docker_image,
            ["tail", "-f", "/dev/null"],
            detach=True,
            network_mode="none",
            labels={
                LABEL: "drill",
                LABEL_WORKDIR: str(workdir),
                LABEL_OWNER: f"{socket.gethostname()}:{pid}",
            },
        )
    try:
        assert DockerSandbox().sweep() == 1
        assert sorted(drill_containers()) == [made["live"].name]
        assert not (tmp_path / "drbot-drill-abandoned").exists()
    finally:
        for container in made.values():
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)


def test_the_process_sandbox_refuses_binaries_of_another_major() -> None:
    sandbox = ProcessSandbox(find_bin_dir(None, "postgres"))
    with (
        pytest.raises(SandboxUnavailable, match="PostgreSQL 99") as caught,
        sandbox.provision(policy="t", major=99),
    ):
        pass
    assert "postgresql-99" in (caught.value.hint or "")


def test_policy_checks_can_neither_write_nor_run_programs(
    pg_server: LocalPostgres, pg_database: str, tmp_path: Path
) -> None:
    pg_server.execute(pg_database, "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
    marker = tmp_path / "escaped"
    role = chk.check_role(pg_server.socket_dir, "postgres", pg_database, port=pg_server.port)
    checks = [
        Check(name="ok", sql="SELECT count(*) = 2 FROM t"),
        Check(name="program", sql=f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'"),
        Check(name="two", sql="SELECT true; SELECT true"),
        Check(name="write", sql="WITH d AS (DELETE FROM t RETURNING 1) SELECT true"),
        Check(name="not-bool", sql="SELECT 'someone@example.com'"),
        Check(name="null", sql="SELECT NULL::boolean"),
    ]
    results = {
        r.name: r
        for r in chk.custom_checks(
            pg_server.socket_dir, role, checks, pg_database, port=pg_server.port
        )
    }
    assert results["ok"].passed and results["ok"].detail == "returned true"
    assert not results["program"].passed and "must be superuser" in results["program"].detail
    assert not marker.exists()
    assert not results["two"].passed and "multiple commands" in results["two"].detail
    assert not results["write"].passed
    assert not results["not-bool"].passed
    assert "example.com" not in results["not-bool"].detail
    assert results["not-bool"].detail == "returned a str, not a boolean true"
    assert results["null"].detail == "returned null, not true"
    with psycopg.connect(pg_server.uri(pg_database)) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)  # nothing was deleted
