"""drbot's container image: built by scripts/image.sh with no network and no registry, and
keeping what the Dockerfile promises (non-root, the PostgreSQL client tools, drbot's commands,
the daemon as entry point, a health check on /healthz)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from docker.errors import DockerException

if TYPE_CHECKING:
    from docker import DockerClient

# A cold build (Debian base by mmdebstrap, dependency wheels) takes a minute or two; a warm
# one, a few seconds.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "drbot:dev"
UID = 10001
PG_MAJOR = 15

STUB_DAEMON = """\
import http.server

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", 9187), Handler).serve_forever()
"""
"""Stands in for the daemon's HTTP port: 200 on /healthz only."""


SIZE_LIMIT = 400_000_000
"""On the slim base image.sh builds; larger on the drill stand-in, which has the server."""


@pytest.fixture(scope="module")
def client(docker_client: DockerClient) -> DockerClient:
    return docker_client


def _base(client: DockerClient) -> dict[str, str]:
    """BASE for scripts/image.sh: the drill stand-in `postgres:15` when it has Python (as
    scripts/images.sh now builds it), so a fresh machine builds one root filesystem, not two;
    otherwise image.sh's own slim base."""
    try:
        client.containers.run(
            "postgres:15", ["-c", "command -v python3"], entrypoint="sh",
            network_mode="none", remove=True,
        )  # fmt: skip
    except DockerException:
        return {}
    return {"BASE": "postgres:15", "WITH_SERVER": "1"}


@pytest.fixture(scope="module")
def image(client: DockerClient) -> str:
    """drbot:dev as scripts/image.sh builds it from this checkout (reusing what it can)."""
    global SIZE_LIMIT  # noqa: PLW0603 - the base decides what "small" can mean
    base = _base(client)
    if base:
        SIZE_LIMIT = 800_000_000  # the server (and its LLVM) comes with that base (~630 MB)
    try:
        done = subprocess.run(
            ["bash", "scripts/image.sh"],
            env={**os.environ, **base},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=840,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/image.sh did not finish in {exc.timeout}s")
    if done.returncode != 0:
        pytest.fail(f"scripts/image.sh failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return IMAGE


def run(client: DockerClient, image: str, argv: list[str], entrypoint: str | None = None) -> str:
    """Output of a throwaway container with no network, a read-only root and no capabilities."""
    out = client.containers.run(
        image,
        argv,
        entrypoint=entrypoint,
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        stdout=True,
        stderr=True,
        remove=True,
    )
    return out.decode()


def test_drbot_help_lists_this_checkouts_commands_as_a_non_root_user_with_no_network(
    client: DockerClient, image: str
) -> None:
    """`drbot --help` runs in the image, offline and unprivileged, listing every command."""
    from drbot.cli.main import COMMANDS

    out = run(client, image, ["--help"])
    listed = out.split("\nCommands:\n", 1)[1].split("\n\n", 1)[0]
    commands = {line.split()[0] for line in listed.splitlines() if line.startswith("  ")}
    assert {"daemon", "backup", "restore", "drill", "verify"} <= commands
    assert commands == set(COMMANDS)
    assert run(client, image, ["-u"], entrypoint="id").strip() == str(UID)
    assert run(client, image, ["-un"], entrypoint="id").strip() == "drbot"


def test_the_postgresql_client_tools_are_there_and_no_compiler_is(
    client: DockerClient, image: str
) -> None:
    """pg_dump, pg_restore, pg_basebackup and psql of PostgreSQL 15 are on PATH; gcc is not."""
    tools = ["pg_dump", "pg_restore", "pg_basebackup", "psql"]
    script = " && ".join(f"{tool} --version" for tool in tools)
    out = run(client, image, ["-c", f"{script} && ! command -v gcc cc"], entrypoint="sh")
    versions = out.splitlines()
    assert len(versions) == len(tools)
    for tool, line in zip(tools, versions, strict=True):
        assert line.startswith(f"{tool} (PostgreSQL) {PG_MAJOR}."), line


def test_the_fingerprints_c_loop_is_in_the_image(client: DockerClient, image: str) -> None:
    """drbot's wheel carries its compiled part (setup.py), built on this host for Python 3.11,
    and the image's Python loads it: logical backups do not fall back to the slower reader."""
    script = "import drbot.engines.postgres.archive as a; print(a._SUM_ROWS is not None)"
    assert run(client, image, ["-c", script], entrypoint="python3").strip() == "True"


def test_the_image_declares_the_daemon_a_non_root_user_and_a_health_check(
    client: DockerClient, image: str
) -> None:
    """The image config: ENTRYPOINT drbot, CMD daemon, numeric non-root USER, /healthz check."""
    attrs = client.images.get(image).attrs
    config = attrs["Config"]
    assert config["Entrypoint"] == ["drbot"]
    assert config["Cmd"] == ["daemon"]
    assert config["User"] == f"{UID}:{UID}"
    test = config["Healthcheck"]["Test"]
    assert test[0] == "CMD" and "/healthz" in test[-1]
    assert "9187/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["DRBOT_HTTP"] == "0.0.0.0:9187"
    assert env["DRBOT_STATE_DIR"] == "/var/lib/drbot"
    assert env["DRBOT_POLICIES"] == "/etc/drbot/policies"
    assert config["WorkingDir"] == "/var/lib/drbot"
    assert attrs["Size"] < SIZE_LIMIT, f"the image grew to {attrs['Size'] // 1_000_000} MB"


def test_the_health_check_asks_healthz_on_the_port_drbot_http_names(
    client: DockerClient, image: str
) -> None:
    """The HEALTHCHECK command passes against a server answering /healthz on DRBOT_HTTP's
    port, and fails when nothing answers on the port DRBOT_HTTP names."""
    test = client.images.get(image).attrs["Config"]["Healthcheck"]["Test"]
    check = list(test[1:])
    container = client.containers.run(
        image, ["-c", STUB_DAEMON], entrypoint="python3", network_mode="none", detach=True
    )
    try:
        deadline = time.monotonic() + 30
        while (code := container.exec_run(check).exit_code) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert code == 0, container.logs().decode()
        elsewhere = container.exec_run(check, environment={"DRBOT_HTTP": "0.0.0.0:9188"})
        assert elsewhere.exit_code != 0
    finally:
        container.remove(force=True)
