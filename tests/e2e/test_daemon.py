"""`drbot daemon` as a process against real PostgreSQL and the S3 server: schedules, WAL
streaming, retention, a drill, /metrics and /readyz; SIGTERM in the middle of a backup; two
daemons on one policy; a webhook told once of a failure and once of its recovery."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from drbot.engines.postgres.localserver import LocalPostgres, free_port
from tests.e2e.conftest import DRBOT, Env

pytestmark = pytest.mark.e2e

DAEMON_POLICY = """\
version: 1
name: {name}
source:
  kind: postgresql
  uri: ${{{uri_var}}}
  partial_interval: 2s
schedule:
  full: "{full}"
  incremental: continuous
  drill: "{drill}"
  verify: "{verify}"
retention:
  keep_last: 2
encryption:
  key: file:${{DRBOT_KEY_DIR}}/shop.key
destinations:
  - name: primary
    url: s3://{bucket1}/{name}
    region: us-east-1
  - name: replica
    url: s3://{bucket2}/{name}
    region: eu-west-1
targets:
  rpo: 10m
  rto: 10m
drill:
  sandbox: process
  checks:
    - sql: "select count(*) > 0 from writes"
      database: app
"""


class Daemon:
    """One `drbot daemon` process with its own HTTP port."""

    def __init__(self, e2e: Env, *, name: str = "d", **env: str) -> None:
        self.port = free_port()
        self.log = e2e.tmp / f"daemon-{name}-{self.port}.log"
        self.env = {
            **e2e.env,
            "DRBOT_HTTP": f"127.0.0.1:{self.port}",
            "DRBOT_LOG_LEVEL": "info",
            **env,
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [DRBOT, "daemon"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except URLError as exc:
            code = getattr(exc, "code", 0)
            body = exc.read().decode() if hasattr(exc, "read") else str(exc)
            return code, body
        except (ConnectionError, OSError) as exc:
            return 0, str(exc)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = self.get("/metrics")
        if status != 200:
            return {}
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def wait_for(self, what: str, ok: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            assert self.proc.poll() is None, f"daemon exited: {self.output()[-3000:]}"
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def source() -> Iterator[LocalPostgres]:
    """A cluster of its own (the daemon streams its WAL through a slot), with a writer."""
    server = LocalPostgres()
    server.start()
    server.create_database("app")
    server.execute(
        "app",
        # Random hex: a base backup that does not compress to nothing, so it uploads in parts.
        "create table writes (id bigserial primary key, at timestamptz default now(), "
        "pad text); insert into writes (pad) select string_agg(md5(random()::text), '') "
        "from generate_series(1, 60000) i, generate_series(1, 16) j group by i",
    )
    try:
        yield server
    finally:
        server.stop()
        server.remove()


def _policy(e2e: Env, name: str, **schedule: str) -> None:
    text = DAEMON_POLICY.format(
        name=name,
        uri_var="APP_DB_URI",
        bucket1=e2e.buckets[0],
        bucket2=e2e.buckets[1],
        full=schedule.get("full", "@every 20s"),
        drill=schedule.get("drill", "@every 25s"),
        verify=schedule.get("verify", "@every 30s"),
    )
    policies = Path(e2e.env["DRBOT_POLICIES"])
    (policies / "shop.yaml").unlink(missing_ok=True)
    (policies / f"{name}.yaml").write_text(text)


def _writer(uri: str, stop: threading.Event) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        while not stop.wait(0.2):
            conn.execute("insert into writes (pad) values ('x')")


def test_daemon_backs_up_streams_prunes_drills_and_stops_cleanly_mid_backup(
    e2e: Env, source: LocalPostgres
) -> None:
    _policy(e2e, "app")
    e2e.env["APP_DB_URI"] = source.uri("app")
    stop = threading.Event()
    writer = threading.Thread(target=_writer, args=(source.uri("app"), stop), daemon=True)
    writer.start()
    daemon = Daemon(
        e2e,
        DRBOT_LEASE_TTL="6",
        DRBOT_GRACE_PERIOD="0.1",
        DRBOT_CHECK_INTERVAL="5",
        DRBOT_AUDIT_SHIP_INTERVAL="20",
    )
    try:
        v = daemon.value
        daemon.wait_for("/healthz", lambda: daemon.get("/healthz")[0] == 200, 30)
        # The first full backup runs at once (none ever ran), then prune; WAL streams.
        daemon.wait_for(
            "a full backup, a retention pass and a connected streamer",
            lambda: (
                v("drbot_job_runs_total", policy="app", job="full", outcome="ok") >= 1
                and v("drbot_job_runs_total", policy="app", job="prune", outcome="ok") >= 1
                and v("drbot_streamer_up", policy="app") == 1
            ),
            120,
        )
        daemon.wait_for("/readyz", lambda: daemon.get("/readyz")[0] == 200, 60)
        ready = json.loads(daemon.get("/readyz")[1])
        assert ready["policies"]["app"]["lease"] == "held"
        assert ready["policies"]["app"]["streamer_connected"] is True
        daemon.wait_for(
            "a passing drill and a verify",
            lambda: (
                v("drbot_drill_last_passed", policy="app") == 1
                and v("drbot_job_runs_total", policy="app", job="verify", outcome="ok") >= 1
            ),
            150,
        )
        m = daemon.metrics()
        assert m[("drbot_lease_held", frozenset({("policy", "app")}))] == 1
        assert m[("drbot_drill_last_rto_seconds", frozenset({("policy", "app")}))] > 0
        assert m[("drbot_backup_last_stored_bytes", frozenset({("policy", "app")}))] > 0
        # WAL streams, so the newest restorable point is seconds old, not a backup's age.
        daemon.wait_for("the RPO measured", lambda: v("drbot_rpo_seconds", policy="app") > 0, 30)
        assert v("drbot_rpo_seconds", policy="app") < 60
        assert ("drbot_streamer_lag_seconds", frozenset({("policy", "app")})) in m
        summaries = [e for e in daemon.events() if e.get("event") == "job.completed"]
        assert {e["job"] for e in summaries} >= {"full", "prune", "drill", "verify"}
        full = next(e for e in summaries if e["job"] == "full")
        assert full["stored_bytes"] > 0 and full["duration_s"] > 0 and full["backup_id"]

        # SIGTERM while a full backup uploads: grace 0.1 s, then it is interrupted cleanly.
        client = e2e.client("us-east-1")
        daemon.wait_for(
            "a multipart upload in progress",
            lambda: bool(client.list_multipart_uploads(Bucket=e2e.buckets[0]).get("Uploads")),
            60,
        )
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        stop.set()
        daemon.stop(signal.SIGKILL)
    events = daemon.events()
    stopped = [e for e in events if e.get("event") == "daemon.stopped"]
    assert stopped and stopped[0]["graceful"] is True
    aborted = [e for e in events if e.get("event") == "job.aborting"]
    assert aborted, "the running backup should have been interrupted after the grace period"

    # Nothing half-complete: every listed backup verifies, no upload is left behind.
    listed = e2e.run("list", "--policy", "app", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert 1 <= len(rows) <= 3
    verified = e2e.run("verify", "--policy", "app", "--json", timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for index, bucket in enumerate(e2e.buckets):
        client = e2e.client(("us-east-1", "eu-west-1")[index])
        assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    shown = e2e.run("audit", "show", "--json", "--last", "500")
    events = json.loads(shown.stdout)
    actions = [ev["action"] for ev in events]
    for action in ("daemon.started", "lease.acquired", "backup.completed", "drill.completed"):
        assert action in actions, action
    assert actions[-1] == "daemon.stopped" or "daemon.stopped" in actions[-5:]
    failed = [ev for ev in events if ev["action"] == "backup.failed"]
    assert failed and failed[-1]["details"]["exit_code"] == 130

    # The trail was shipped while running and once more at the stop: the anchor in each
    # region is the trail's last event, after daemon.stopped.
    ships = [e for e in daemon.events() if e.get("job") == "audit-ship"]
    assert len(ships) >= 2 and all(e["outcome"] == "ok" for e in ships), ships
    last_stop = max(i for i, a in enumerate(actions) if a == "daemon.stopped")
    assert actions[last_stop + 1] == "audit.shipping"  # then this test's own commands
    for index in (0, 1):
        anchors = [k for k in e2e.objects(index) if "/anchors/" in k]
        newest = max(int(k.rsplit("/", 1)[1].removesuffix(".json")) for k in anchors)
        assert newest == events[last_stop + 1]["seq"]
    for destination in ("primary", "replica"):
        res = e2e.run("audit", "verify", "--from", destination)
        assert res.returncode == 0, res.stdout + res.stderr


LOGICAL_POLICY = """\
version: 1
name: {name}
source:
  kind: postgresql
  mode: logical
  uri: ${{SHOP_DB_URI}}
  databases: [{database}]
schedule:
  full: "@every 3s"
  verify: null
encryption:
  key: file:${{DRBOT_KEY_DIR}}/shop.key
destinations:
  - name: primary
    url: {url1}
    {region1}
  - name: replica
    url: {url2}
    {region2}
alerts:
  webhook: {webhook}
  interval: 1h
"""


def _logical(e2e: Env, name: str, *, local: bool, webhook: str = "null") -> str:
    if local:
        urls = [f"file://{e2e.tmp}/dest/{name}-{i}" for i in (1, 2)]
        for url in urls:
            Path(url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        regions = ["", ""]
    else:
        urls = [f"s3://{bucket}/{name}" for bucket in e2e.buckets]
        regions = ["region: us-east-1", "region: eu-west-1"]
    return LOGICAL_POLICY.format(
        name=name,
        database=e2e.database,
        url1=urls[0],
        url2=urls[1],
        region1=regions[0],
        region2=regions[1],
        webhook=webhook,
    )


def _drbot_children(marker: str) -> list[int]:
    """Pids of `python -m drbot ...` processes whose environment mentions `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"-m\x00drbot" in cmdline and marker.encode() in environ:
            found.append(int(proc.name))
    return found


def test_two_daemons_on_one_policy_only_one_acts_and_the_other_takes_over(e2e: Env) -> None:
    (Path(e2e.env["DRBOT_POLICIES"]) / "shop.yaml").write_text(_logical(e2e, "shop", local=False))
    a = Daemon(e2e, name="a", DRBOT_STATE_DIR=str(e2e.tmp / "a"), DRBOT_LEASE_TTL="3")
    b = Daemon(e2e, name="b", DRBOT_STATE_DIR=str(e2e.tmp / "b"), DRBOT_LEASE_TTL="3")
    try:
        runs = ("drbot_job_runs_total",)

        def backups(d: Daemon) -> float:
            return d.value(*runs, policy="shop", job="full", outcome="ok")

        a.wait_for("a holder", lambda: a.value("drbot_lease_held", policy="shop") == 1
                   or b.value("drbot_lease_held", policy="shop") == 1, 30)  # fmt: skip
        holder, waiter = (a, b) if a.value("drbot_lease_held", policy="shop") == 1 else (b, a)
        holder.wait_for("two backups by the holder", lambda: backups(holder) >= 2, 60)
        assert waiter.value("drbot_lease_held", policy="shop") == 0
        assert backups(waiter) == 0
        assert waiter.value("drbot_job_skipped_total", policy="shop", job="full",
                            reason="lease_not_held") >= 1  # fmt: skip
        ready = json.loads(waiter.get("/readyz")[1])
        assert ready["policies"]["shop"]["lease"] == "waiting"

        # The holder freezes (SIGSTOP: alive, renewing nothing). Its pid is alive, so only
        # expiry hands over: the waiter takes the lease after one TTL (3 s) plus ticks.
        before = backups(holder)
        holder.proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        waiter.wait_for("the takeover", lambda: waiter.value("drbot_lease_held", policy="shop")
                        == 1, 20)  # fmt: skip
        # The waiter counts a TTL from when it first read the holder's last renewal, which
        # may precede the freeze by one renewal interval (the policy loop turns each second).
        assert 3 - 1.5 <= time.monotonic() - frozen_at < 3 + 2 + 2.5
        waiter.wait_for("backups by the new holder", lambda: backups(waiter) >= 1, 30)
        # Thawed, the old holder finds its lease taken and stops acting.
        holder.proc.send_signal(signal.SIGCONT)
        holder.wait_for("the old holder to let go", lambda: holder.value("drbot_lease_held",
                        policy="shop") == 0, 15)  # fmt: skip
        time.sleep(4)
        assert backups(holder) <= before + 1  # at most a run that was already under way
        assert waiter.value("drbot_lease_held", policy="shop") == 1

        # The old holder dies without a word (SIGKILL): no job of it outlives it.
        marker = holder.env["DRBOT_STATE_DIR"]
        holder.stop(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _drbot_children(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _drbot_children(marker), "jobs of a killed daemon must not outlive it"
        assert waiter.stop(signal.SIGTERM) == 0
    finally:
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGKILL)
    verified = e2e.run("verify", "--policy", "shop")
    assert verified.returncode == 0, verified.stderr


class _Webhook:
    """A webhook receiver on 127.0.0.1 that keeps every JSON body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0K3N"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def states(self) -> list[tuple[str, str]]:
        return [(b["drbot"]["kind"], b["drbot"]["state"]) for b in self.bodies]


def test_a_failing_job_alerts_once_and_once_more_on_recovery_and_sighup_reloads(
    e2e: Env,
) -> None:
    hook = _Webhook()
    policies = Path(e2e.env["DRBOT_POLICIES"])
    (policies / "shop.yaml").write_text(_logical(e2e, "shop", local=True, webhook=hook.url))
    # The database disappears: every backup fails (exit 14) until it is back.
    e2e.pg.execute("postgres", f'alter database "{e2e.database}" rename to "{e2e.database}_away"')
    daemon = Daemon(e2e, name="alerts", DRBOT_LEASE_TTL="3")
    try:
        fails = ("drbot_job_failures_total",)
        daemon.wait_for(
            "three failed backups",
            lambda: (
                daemon.value(*fails, policy="shop", job="full", reason="database_unreachable") >= 3
            ),
            60,
        )
        assert hook.states() == [("job_failed:full", "firing")]
        body = hook.bodies[0]
        assert "shop" in body["text"] and "full backup failed" in body["text"]
        e2e.pg.execute(
            "postgres", f'alter database "{e2e.database}_away" rename to "{e2e.database}"'
        )
        daemon.wait_for(
            "a backup again",
            lambda: (
                daemon.value("drbot_job_runs_total", policy="shop", job="full", outcome="ok") >= 2
            ),
            60,
        )
        assert hook.states() == [("job_failed:full", "firing"), ("job_failed:full", "resolved")]
        assert "T0K3N" not in daemon.output(), "the webhook URL holds a secret: never logged"

        # SIGHUP after an edit: the policy keeps its lease and running jobs (no interruption,
        # no alert); a new policy is picked up; an invalid file is refused, the old set kept.
        shop = policies / "shop.yaml"
        shop.write_text(shop.read_text() + "# edited\n")
        daemon.wait_for(
            "a backup running",
            lambda: daemon.value("drbot_job_running", policy="shop", job="full") == 1,
            20,
        )
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(
            "the reload",
            lambda: any(e.get("event") == "daemon.reloaded" for e in daemon.events()),
            20,
        )
        ok_before = daemon.value("drbot_job_runs_total", policy="shop", job="full", outcome="ok")
        daemon.wait_for(
            "a backup under the edited policy",
            lambda: (
                daemon.value("drbot_job_runs_total", policy="shop", job="full", outcome="ok")
                > ok_before
            ),
            30,
        )
        assert not [e for e in daemon.events() if e.get("event") == "job.interrupted"]
        assert daemon.value("drbot_lease_held", policy="shop") == 1
        assert len(hook.bodies) == 2
        (policies / "second.yaml").write_text(_logical(e2e, "second", local=True))
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for("two policies", lambda: daemon.value("drbot_policies") == 2, 20)
        (policies / "broken.yaml").write_text("version: 1\nname: broken\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_for(
            "the reload refused",
            lambda: any(e.get("event") == "daemon.reload_refused" for e in daemon.events()),
            20,
        )
        assert daemon.value("drbot_policies") == 2
        assert daemon.get("/healthz")[0] == 200
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.stop(signal.SIGKILL)
        hook.server.shutdown()
