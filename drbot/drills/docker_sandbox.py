"""The docker sandbox: one throwaway container per drill, with no network at all.

The container runs only an idle process (under Docker's init, which reaps the server's
children); drbot runs each command in it with `exec`, as the image's `postgres` user. The
work directory is bind-mounted at its own path, and drbot reaches the server through the unix
socket there. Containers carry the label `drbot.sandbox=drill` plus their work directory, so
the sweep can remove any a crashed drill left behind. drbot never pulls an image unless the
policy says `drill.pull: true`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from drbot.drills.sandbox import Sandbox, Session, completed, make_workdir
from drbot.errors import SandboxUnavailable
from drbot.procs import pid_alive

if TYPE_CHECKING:
    import subprocess

    from docker import DockerClient
    from docker.models.containers import Container

log = structlog.get_logger(__name__)

LABEL = "drbot.sandbox"
LABEL_WORKDIR = "drbot.workdir"
LABEL_OWNER = "drbot.owner"
"""host:pid of the drbot process running the drill: the sweep leaves live drills alone."""
STALE_AFTER = timedelta(days=1)
"""A container of another host's drbot (a shared engine) is swept only when this old."""
DB_USERS = {"postgresql": "postgres", "mongodb": "mongodb"}
"""The server's user, as the official PostgreSQL and MongoDB images guarantee."""
DEFAULT_IMAGES = {"postgresql": "postgres:{major}", "mongodb": "mongo:{major}"}


class DockerSession:
    kind = "docker"

    def __init__(self, container: Container, workdir: Path, image: str, user: str) -> None:
        self.container = container
        self.workdir = workdir
        self.description = image
        self.user = user

    def run(self, argv: Sequence[str], *, root: bool = False) -> subprocess.CompletedProcess[str]:
        from docker.errors import DockerException

        try:
            code, output = self.container.exec_run(
                list(argv), user="root" if root else self.user, demux=True
            )
        except DockerException as exc:
            raise SandboxUnavailable(f"the drill container is gone: {exc}") from exc
        out, err = output if isinstance(output, tuple) else (output, None)
        return completed(argv, int(code or 0), out, err)

    def give(self, *paths: Path) -> None:
        self._root(["chown", "-R", f"{self.user}:{self.user}", *map(str, paths)])

    def give_socket_dir(self, path: Path) -> None:
        # The server's user owns it; drbot's own group may enter it (drbot need not be root),
        # nobody else may: the server trusts every connection on that socket.
        self._root(["chown", f"{self.user}:{os.getgid()}", str(path)])
        self._root(["chmod", "0750", str(path)])

    def _root(self, argv: list[str]) -> None:
        done = self.run(argv, root=True)
        if done.returncode != 0:
            raise SandboxUnavailable(
                f"{' '.join(argv[:2])} failed in the drill container: {done.stderr.strip()}"
            )


class DockerSandbox:
    kind = "docker"

    def __init__(
        self,
        *,
        image: str | None = None,
        pull: bool = False,
        cpus: float | None = None,
        memory: str | None = None,
        engine: str = "postgresql",
    ) -> None:
        self.engine = engine
        self.image = image
        self.pull = pull
        self.cpus = cpus
        self.memory = memory

    def image_for(self, major: int) -> str:
        return self.image or DEFAULT_IMAGES[self.engine].format(major=major)

    @contextmanager
    def provision(self, *, policy: str, major: int) -> Iterator[Session]:
        client = _client()
        image = self.image_for(major)
        self._ensure_image(client, image)
        workdir = make_workdir()
        container: Container | None = None
        try:
            container = _start(client, image, policy, workdir, self.cpus, self.memory)
            log.info("drill.sandbox_started", sandbox="docker", image=image, workdir=str(workdir))
            yield DockerSession(container, workdir, image, DB_USERS[self.engine])
        finally:
            _remove(container, workdir)

    def sweep(self) -> int:
        """Remove containers whose drbot process is gone (on this host), or that are older
        than a day (another host's, on a shared engine); never a drill that is still running."""
        client = _client()
        removed = 0
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            if not _abandoned(container):
                continue
            workdir = container.labels.get(LABEL_WORKDIR)
            _remove(container, Path(workdir) if workdir else None)
            removed += 1
        if removed:
            log.warning("drill.sandbox_swept", sandbox="docker", removed=removed)
        return removed

    def _ensure_image(self, client: DockerClient, image: str) -> None:
        from docker.errors import DockerException, ImageNotFound

        try:
            client.images.get(image)
            return
        except ImageNotFound:
            pass
        except DockerException as exc:
            raise SandboxUnavailable(f"cannot look up image {image}: {exc}") from exc
        if not self.pull:
            raise SandboxUnavailable(
                f"the drill image {image} is not on this Docker engine, and drbot does not "
                "pull during a drill unless told to",
                hint="build it (`make images` builds local stand-ins), load it, or set "
                "drill.pull: true in the policy",
            )
        try:
            log.info("drill.image_pull", image=image)
            client.images.pull(image)
        except DockerException as exc:
            raise SandboxUnavailable(f"could not pull the drill image {image}: {exc}") from exc


_: type[Sandbox] = DockerSandbox


def _client() -> DockerClient:
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        raise SandboxUnavailable(
            f"cannot reach the Docker engine: {exc}",
            hint="start it (dockerd --bridge=none), set DOCKER_HOST, or use drill.sandbox: process",
        ) from exc
    return client


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _abandoned(container: Container) -> bool:
    host, _, pid = container.labels.get(LABEL_OWNER, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return not pid_alive(int(pid))
    created = str(container.attrs.get("Created", ""))
    try:
        when = datetime.fromisoformat(created[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return False
    return datetime.now(UTC) - when > STALE_AFTER


def _start(
    client: DockerClient,
    image: str,
    policy: str,
    workdir: Path,
    cpus: float | None,
    memory: str | None,
) -> Container:
    from docker.errors import DockerException

    name = f"drbot-drill-{policy}-{secrets.token_hex(4)}"
    try:
        return client.containers.run(
            image,
            ["tail", "-f", "/dev/null"],
            name=name,
            detach=True,
            init=True,
            network_mode="none",
            labels={
                LABEL: "drill",
                LABEL_WORKDIR: str(workdir),
                LABEL_OWNER: _owner(),
                "drbot.policy": policy,
            },
            volumes={str(workdir): {"bind": str(workdir), "mode": "rw"}},
            mem_limit=memory,
            nano_cpus=int(cpus * 1e9) if cpus else None,
        )
    except BaseException as exc:
        # Interrupted (or failed) after the engine created it: do not leave it behind.
        with suppress(DockerException):
            client.containers.get(name).remove(force=True)
        if isinstance(exc, DockerException):
            raise SandboxUnavailable(
                f"could not start a drill container from {image}: {exc}"
            ) from exc
        raise


def _remove(container: Container | None, workdir: Path | None) -> None:
    """Remove the container and the work directory; never raises (it runs in `finally`)."""
    from docker.errors import DockerException

    if container is not None:
        if workdir is not None:
            # Files the server made belong to the container's user; root inside removes them
            # even when drbot itself is not root on the host.
            try:
                container.exec_run(["find", str(workdir), "-mindepth", "1", "-delete"], user="root")
            except DockerException as exc:
                log.debug("drill.sandbox_clean_skipped", error=str(exc))
        try:
            container.remove(force=True)
        except DockerException as exc:
            log.warning("drill.sandbox_remove_failed", container=container.name, error=str(exc))
    if workdir is not None and workdir.name.startswith("drbot-drill-"):
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            log.warning("drill.workdir_left", workdir=str(workdir), uid=os.geteuid())
