"""Drills of MongoDB policies: a throwaway `mongod` in the sandbox, the policy's restore into
it (to the latest stored change, or a chosen moment), and the proof it worked.

The server runs inside the sandbox's work directory: data, log, and its unix socket. In a
docker sandbox (no network at all) drbot connects through that socket; in the process sandbox
the server also listens on a free port on 127.0.0.1, which is how drbot connects there. The
restore is the same code as `drbot restore` (plan, load, fingerprint, replay), so a passing
drill proves that command works for this policy's backups.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import structlog
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from drbot.catalog import CatalogScan
from drbot.drills.plan import CheckResult
from drbot.drills.sandbox import Session
from drbot.engines.mongodb.archive import EXACT
from drbot.engines.mongodb.client import connect
from drbot.errors import SandboxUnavailable
from drbot.ops.changestore import read_heartbeat, slices_in
from drbot.ops.mongo_restore import (
    MongoRestorePlan,
    MongoRestoreResult,
    execute_mongo_restore,
    plan_mongo_restore,
)
from drbot.ops.walstore import KeyCache
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

SANDBOX_PORT = 27017
"""The port inside a docker sandbox (its own network namespace, no interfaces but lo)."""
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Server:
    """A mongod running in a sandbox, and how drbot reaches it."""

    uri: str
    description: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sandbox_server(session: Session) -> Iterator[Server]:
    """Start an empty mongod in `session`'s work directory; it is stopped on exit (and in any
    case removed with the sandbox)."""
    work = session.workdir
    data, sock, logs = work / "data", work / "sock", work / "log"
    for d in (data, sock, logs):
        d.mkdir(mode=0o700)
    session.give(data, logs)
    session.give_socket_dir(sock)
    port = SANDBOX_PORT if session.kind == "docker" else _free_port()
    argv = [
        "mongod",
        "--dbpath", str(data),
        "--port", str(port),
        "--bind_ip", "127.0.0.1",
        "--unixSocketPrefix", str(sock),
        "--filePermissions", "0770",
        "--fork",
        "--logpath", str(logs / "mongod.log"),
    ]  # fmt: skip
    started = session.run(argv)
    if started.returncode != 0:
        raise SandboxUnavailable(
            f"mongod did not start in the {session.kind} sandbox: "
            f"{(started.stderr or started.stdout).strip()[-500:]}"
        )
    if session.kind == "docker":
        uri = f"mongodb://{quote(str(sock / f'mongodb-{port}.sock'), safe='')}"
    else:
        uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    _wait(uri)
    try:
        yield Server(uri, f"mongod in the {session.kind} sandbox")
    finally:
        stopped = session.run(["mongod", "--dbpath", str(data), "--shutdown"])
        if stopped.returncode != 0:
            log.warning("drill.mongod_stop_failed", error=stopped.stderr.strip()[-300:])


def _wait(uri: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client: MongoClient[dict[str, Any]]
            with MongoClient(uri, serverSelectionTimeoutMS=1000) as client:
                client.admin.command("ping")
            return
        except PyMongoError as exc:
            if time.monotonic() > deadline:
                raise SandboxUnavailable(f"mongod in the sandbox never answered: {exc}") from None
            time.sleep(0.2)


def plan(
    scan: CatalogScan,
    storage: Storage,
    *,
    policy: str,
    at: datetime | None,
    every_database: bool,
    keys: KeyCache,
) -> MongoRestorePlan:
    """The restore a drill of `storage` performs (a pure choice, like `drbot restore`'s)."""
    slices = {s.name: refs for s, refs in slices_in(policy, [storage])}
    return plan_mongo_restore(
        scan,
        slices,
        policy=policy,
        target="sandbox",
        occupied=[],
        at=at,
        from_destination=storage.name,
        every_database=every_database,
        heartbeat=read_heartbeat(policy, [storage], keys),
    )


def restore(
    server: Server,
    chosen: MongoRestorePlan,
    scan: CatalogScan,
    storage: Storage,
    keys: KeyCache,
) -> MongoRestoreResult:
    """Carry out the drill's restore into the sandbox server (what `drbot restore` does)."""
    raw = connect(server.uri)
    exact: MongoClient[dict[str, Any]] = MongoClient(
        server.uri, document_class=dict, tz_aware=True,
        datetime_conversion=EXACT.datetime_conversion,
    )  # fmt: skip
    try:
        return execute_mongo_restore(
            chosen, scan, {storage.name: storage}, keys, raw, exact, server.uri
        )
    finally:
        raw.close()
        exact.close()


def checks(chosen: MongoRestorePlan, result: MongoRestoreResult) -> list[CheckResult]:
    """What a MongoDB drill proves besides RTO and RPO."""
    reached = result.reached_at
    problems = [w for w in result.warnings if w not in chosen.warnings]
    return [
        CheckResult(
            "fingerprint",
            True,
            f"{len(result.collections)} collection(s), {result.documents} document(s) matched "
            f"the backup's per-collection counts and checksums",
        ),
        CheckResult(
            "restore_point",
            not problems,
            f"backup {chosen.backup_id} and {len(chosen.slices)} slice(s): "
            f"{result.events_applied} change(s) replayed; the data is as of {reached.isoformat()}"
            + ("" if not problems else "; but: " + "; ".join(problems)),
        ),
    ]
