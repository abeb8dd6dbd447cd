"""Physical backups, WAL streaming and point-in-time restore against real parts, under load.

One source server (its own: a physical backup copies the whole cluster) takes a steady write
load: a counter table, one row per transaction. Commit timestamps are tracked by the server
(track_commit_timestamp), so "the rows committed at or before T" is exact, not estimated.
drbot streams WAL into S3 in two regions while the load runs; the streamer is SIGKILLed and
restarted mid-way. Restores run through the `drbot` command and start real servers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from drbot.engines.postgres.localserver import LocalPostgres
from tests.fixtures.pg import stop_restored_server
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.integration

DRBOT = str(Path(sys.executable).parent / "drbot")
PARTIAL_INTERVAL_S = 2
POLICY = """\
version: 1
name: pitr
source:
  kind: postgresql
  uri: ${{SRC_URI}}
  partial_interval: {interval}s
schedule:
  incremental: continuous
encryption:
  key: file:{key}
destinations:
  - name: east
    url: s3://{bucket1}/pitr
    region: us-east-1
  - name: west
    url: s3://{bucket2}/pitr
    region: eu-west-1
"""


class Writer(threading.Thread):
    """One row per transaction, about every 10 ms, until stopped."""

    def __init__(self, uri: str) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.stop = threading.Event()
        self.seq = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = 0.0
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.uri, autocommit=True) as conn:
                    while not self.stop.is_set():
                        conn.execute("INSERT INTO counter (seq) VALUES (%s)", (self.seq + 1,))
                        self.seq += 1
                        time.sleep(0.01)
            except psycopg.OperationalError as exc:
                # the source restarting: keep trying for a while, as an application would
                deadline = deadline or time.monotonic() + 30
                if time.monotonic() > deadline:
                    self.error = exc
                    return
                time.sleep(0.2)
            except BaseException as exc:  # surfaced by the test
                self.error = exc
                return


@dataclass
class Scenario:
    pg: LocalPostgres
    s3: S3Server
    buckets: tuple[str, str]
    base: Path
    env: dict[str, str]
    writer: Writer
    streamer: subprocess.Popen[str] | None = None
    marks: dict[str, datetime] = field(default_factory=dict)
    started_servers: list[Path] = field(default_factory=list)

    def drbot(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DRBOT, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def start_streamer(self) -> None:
        self.streamer = subprocess.Popen(
            [DRBOT, "wal", "stream", "--policy", "pitr"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def commits(self) -> list[tuple[int, datetime]]:
        """(seq, commit time) of every row on the source, by commit time."""
        with psycopg.connect(self.pg.uri(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT seq, pg_xact_commit_timestamp(xmin) FROM counter ORDER BY 2, 1"
            ).fetchall()
        return [(int(r[0]), r[1]) for r in rows]

    def restore(self, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        target = self.base / f"restore-{uuid.uuid4().hex[:8]}"
        res = self.drbot(
            "restore", "--policy", "pitr", "--to-dir", str(target), "--start", "--yes", "--json",
            *(["--run-as", "postgres"] if os.geteuid() == 0 else []),
            *args,
        )  # fmt: skip
        if res.returncode == 0:
            self.started_servers.append(target)
        return res, target

    def restored_seqs(self, port: int) -> set[int]:
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True
        ) as conn:
            return {int(r[0]) for r in conn.execute("SELECT seq FROM counter").fetchall()}

    def stop_restored(self, target: Path) -> None:
        stop_restored_server(target)


def _server_dir() -> Path:
    # The restored servers run as `postgres` when the tests run as root: it must reach them.
    path = Path(tempfile.mkdtemp(prefix="drbot-pitr-"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def scenario(s3_server: S3Server) -> Iterator[Scenario]:
    """Full backup + streamed WAL under load, with a SIGKILLed streamer restarted mid-way."""
    base = _server_dir()
    pg = LocalPostgres(base / "source")
    pg.start()
    pg.execute("postgres", "ALTER SYSTEM SET track_commit_timestamp = on")
    # No commits but the test's own: autovacuum's would land at unpredictable moments.
    pg.execute("postgres", "ALTER SYSTEM SET autovacuum = off")
    pg.stop()
    pg.start()
    pg.execute(
        "postgres",
        "CREATE TABLE counter (seq bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
    )
    buckets = (s3_server.make_bucket("us-east-1"), s3_server.make_bucket("eu-west-1"))
    policies = base / "policies"
    policies.mkdir()
    key = base / "pitr.key"
    (policies / "pitr.yaml").write_text(
        POLICY.format(interval=PARTIAL_INTERVAL_S, key=key, bucket1=buckets[0], bucket2=buckets[1])
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DRBOT_", "PG"))}
    env.update(
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        SRC_URI=pg.uri(),
        DRBOT_POLICIES=str(policies),
        DRBOT_STATE_DIR=str(base / "state"),
        DRBOT_AUDIT_DIR=str(base / "audit"),
        DRBOT_LOG_FORMAT="json",
    )
    writer = Writer(pg.uri())
    sc = Scenario(pg, s3_server, buckets, base, env, writer)
    try:
        assert sc.drbot("keys", "generate", "--out", str(key)).returncode == 0
        writer.start()
        sc.start_streamer()
        time.sleep(2)
        backup = sc.drbot("backup", "--policy", "pitr", "--json")
        assert backup.returncode == 0, backup.stderr
        sc.marks["backup_done"] = datetime.now(UTC)
        for _ in range(3):  # several complete segments, and WAL inside each
            time.sleep(1.5)
            pg.execute("postgres", "SELECT pg_switch_wal()")
        time.sleep(1.5)
        sc.marks["before_kill"] = datetime.now(UTC)
        assert sc.streamer is not None
        sc.streamer.send_signal(signal.SIGKILL)
        sc.streamer.wait()
        time.sleep(3)  # writes continue while no streamer runs
        pg.execute("postgres", "SELECT pg_switch_wal()")
        time.sleep(1)
        sc.start_streamer()
        time.sleep(3)
        sc.marks["after_restart"] = datetime.now(UTC)
        time.sleep(2)
        # The database restarts under the streamer: it reconnects and resumes without a gap.
        pg.stop()
        pg.start()
        time.sleep(4)
        sc.marks["after_db_restart"] = datetime.now(UTC)
        time.sleep(2)
        yield sc
    finally:
        writer.stop.set()
        writer.join(timeout=10)
        if sc.streamer is not None and sc.streamer.poll() is None:
            sc.streamer.terminate()
            sc.streamer.wait(timeout=30)
        for target in sc.started_servers:
            sc.stop_restored(target)
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def _expected_at(commits: list[tuple[int, datetime]], at: datetime) -> set[int]:
    return {seq for seq, ts in commits if ts <= at}


def test_latest_under_load_loses_at_most_the_partial_interval(scenario: Scenario) -> None:
    assert scenario.writer.error is None
    assert scenario.writer.is_alive()
    # The disaster: from this moment nothing more reaches the archive (the source may burn).
    assert scenario.streamer is not None
    scenario.streamer.send_signal(signal.SIGKILL)
    scenario.streamer.wait()
    disaster = datetime.now(UTC)
    try:
        res, target = scenario.restore("--latest")
    finally:
        scenario.start_streamer()
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    restored = scenario.restored_seqs(out["port"])
    commits = dict(scenario.commits())
    newest_restored = max(commits[s] for s in restored)
    # The age of the newest restorable point at the disaster: what a continuous policy promises
    # to bound by its partial interval (plus the time to ship one).
    rpo = (disaster - newest_restored).total_seconds()
    print(f"measured RPO under load: {rpo:.2f}s; restore took {out['elapsed_s']:.2f}s")
    assert 0 <= rpo <= PARTIAL_INTERVAL_S + 3, rpo
    # Nothing is missing in the middle: the restored rows are a prefix by commit time.
    ordered = [s for s, _ in scenario.commits()]
    assert set(ordered[: len(restored)]) == restored
    assert out["restore_point"] is not None
    assert datetime.fromisoformat(out["restore_point"]) == newest_restored
    scenario.stop_restored(target)


def _pitr_exactly(scenario: Scenario, at: datetime) -> None:
    res, target = scenario.restore("--at", at.isoformat())
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    restored = scenario.restored_seqs(out["port"])
    expected = _expected_at(scenario.commits(), at)
    assert restored == expected, (
        f"missing {sorted(expected - restored)[:5]}, extra {sorted(restored - expected)[:5]}"
    )
    scenario.stop_restored(target)


def test_pitr_to_an_exact_commit_includes_it_and_nothing_after(scenario: Scenario) -> None:
    commits = scenario.commits()
    after_backup = [ts for _, ts in commits if ts > scenario.marks["backup_done"]]
    _pitr_exactly(scenario, after_backup[len(after_backup) // 4])


def test_pitr_across_the_killed_streamer(scenario: Scenario) -> None:
    # Between the SIGKILL and the restart no streamer ran: that WAL came through the slot.
    during_outage = scenario.marks["before_kill"] + timedelta(seconds=2)
    _pitr_exactly(scenario, during_outage)
    plan = scenario.drbot(
        "restore", "--policy", "pitr", "--to-dir", str(scenario.base / "dry"), "--dry-run",
        "--json", *(["--run-as", "postgres"] if os.geteuid() == 0 else []),
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["plan"]["gap"] is None


def test_pitr_after_the_source_restarted_under_the_streamer(scenario: Scenario) -> None:
    _pitr_exactly(scenario, scenario.marks["after_db_restart"])


def test_pitr_inside_the_newest_partial_segment(scenario: Scenario) -> None:
    scenario.writer.stop.set()
    scenario.writer.join(timeout=10)
    time.sleep(PARTIAL_INTERVAL_S * 2 + 1)  # the last partial has been shipped
    commits = scenario.commits()
    # a moment between two commits, a few rows before the end
    at = commits[-5][1] + (commits[-4][1] - commits[-5][1]) / 2
    _pitr_exactly(scenario, at)


def test_pitr_to_a_quiet_moment_after_the_last_commit(scenario: Scenario) -> None:
    # The writer has stopped (previous test) and the archive was written since: a moment after
    # the last commit is covered, although no commit after it exists for recovery to stop at.
    commits = scenario.commits()
    at = commits[-1][1] + timedelta(seconds=1)
    res, target = scenario.restore("--at", at.isoformat())
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert scenario.restored_seqs(out["port"]) == {s for s, _ in commits}
    # Nothing committed after `at` (autovacuum is off): recovery found no commit to stop at,
    # and drbot replayed everything, which a heartbeat allowed.
    with psycopg.connect(scenario.pg.uri(), autocommit=True) as conn:
        row = conn.execute("SELECT timestamp FROM pg_last_committed_xact()").fetchone()
    assert row is not None and row[0] <= at
    assert out["replayed_all"] is True
    scenario.stop_restored(target)


def test_verify_passes_and_list_shows_how_far_each_backup_restores(scenario: Scenario) -> None:
    res = scenario.drbot("verify", "--policy", "pitr", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"]
    assert report["checked_objects"] > 10  # base backup copies and every WAL object
    listed = scenario.drbot("list", "--policy", "pitr", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["mode"] == "physical"
    assert row["positions"]["timeline"] == 1
    window = row["restorable"]
    assert window["gap"] is None
    assert window["to_partial_segment"] is True
    assert datetime.fromisoformat(window["to_time"]) > scenario.marks["after_restart"]


def _wal_keys(scenario: Scenario) -> list[str]:
    east = scenario.s3.client("s3", "us-east-1")
    listing = east.list_objects_v2(Bucket=scenario.buckets[0], Prefix="pitr/pitr/wal/00000001/")
    return sorted(o["Key"] for o in listing["Contents"] if ".partial" not in o["Key"])


class _Archive:
    """Damage WAL objects in both regions, and put them back afterwards."""

    def __init__(self, scenario: Scenario) -> None:
        self.clients = [
            (scenario.s3.client("s3", "us-east-1"), scenario.buckets[0]),
            (scenario.s3.client("s3", "eu-west-1"), scenario.buckets[1]),
        ]
        self.saved: list[tuple[Any, str, str, bytes]] = []

    def save(self, index: int, key: str) -> bytes:
        client, bucket = self.clients[index]
        body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        self.saved.append((client, bucket, key, body))
        return body

    def delete(self, index: int, key: str) -> None:
        self.save(index, key)
        client, bucket = self.clients[index]
        client.delete_object(Bucket=bucket, Key=key)

    def corrupt(self, index: int, key: str) -> None:
        body = bytearray(self.save(index, key))
        body[len(body) // 2] ^= 0xFF
        client, bucket = self.clients[index]
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    def restore(self) -> None:
        for client, bucket, key, body in reversed(self.saved):
            client.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_missing_segment_is_a_named_gap_and_pitr_past_it_is_refused(
    scenario: Scenario,
) -> None:
    full = _wal_keys(scenario)
    victim = full[len(full) // 2]
    name = victim.rsplit("/", 1)[1].split(".")[0]
    archive = _Archive(scenario)
    try:
        archive.delete(0, victim)  # one region only: verify names it; restores still work
        res = scenario.drbot("verify", "--policy", "pitr", "--json")
        assert res.returncode == 13, res.stdout + res.stderr
        problems = json.loads(res.stdout)["problems"]
        assert [p["destination"] for p in problems] == ["east"]
        assert name in problems[0]["problem"]
        dry = scenario.drbot(
            "restore", "--policy", "pitr", "--to-dir", str(scenario.base / "dry"), "--dry-run",
            "--json", "--at", scenario.marks["after_restart"].isoformat(),
            *(["--run-as", "postgres"] if os.geteuid() == 0 else []),
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        archive.delete(1, victim)  # now gone everywhere
        res, target = scenario.restore("--at", scenario.marks["after_restart"].isoformat())
        assert res.returncode == 10, (res.returncode, res.stderr)
        assert name in res.stderr
        assert not target.exists()
    finally:
        archive.restore()


def test_a_corrupt_wal_segment_stops_the_restore_and_leaves_no_server(
    scenario: Scenario,
) -> None:
    victim = _wal_keys(scenario)[-1]  # the newest complete segment: --latest needs it
    archive = _Archive(scenario)
    archive.corrupt(0, victim)
    archive.corrupt(1, victim)
    res, target = scenario.restore("--latest")
    assert res.returncode == 13, (res.returncode, res.stdout, res.stderr)
    assert victim.rsplit("/", 1)[1].split(".")[0] in res.stderr
    assert not target.exists()  # no promoted server, no half-restored directory
    leftovers = [p.name for p in scenario.base.iterdir() if p.name.endswith(("-staging", "-wal"))]
    assert not leftovers
    archive.restore()


def test_a_corrupt_base_backup_copy_falls_back_to_the_other_region(scenario: Scenario) -> None:
    """A flipped byte in the middle of the first region's base.tar stops the unpacking there
    (the reading thread's authentication failure reaches the unpacker) and the restore takes
    the other region's copy; with both damaged it fails and leaves nothing behind."""
    east = scenario.s3.client("s3", "us-east-1")
    listing = east.list_objects_v2(Bucket=scenario.buckets[0], Prefix="pitr/pitr/backups/")
    base = next(o["Key"] for o in listing["Contents"] if o["Key"].endswith("/base.tar.zst.enc"))
    archive = _Archive(scenario)
    archive.corrupt(0, base)
    try:
        res, target = scenario.restore("--latest")
        assert res.returncode == 0, res.stderr
        assert "restore.copy_failed" in res.stderr and "east" in res.stderr
        out = json.loads(res.stdout)
        assert out["source"] == "west"
        assert scenario.restored_seqs(out["port"])
        scenario.stop_restored(target)

        archive.corrupt(1, base)
        res, target = scenario.restore("--latest")
        assert res.returncode == 13, (res.returncode, res.stderr)
        assert "could be unpacked" in res.stderr
        assert not target.exists()
        leftovers = [p.name for p in scenario.base.iterdir() if p.name.endswith("-staging")]
        assert not leftovers
    finally:
        archive.restore()


def test_wal_fetch_and_push_for_restore_and_archive_commands(scenario: Scenario) -> None:
    name = _wal_keys(scenario)[1].rsplit("/", 1)[1].split(".")[0]
    got = scenario.base / "fetched" / name
    got.parent.mkdir()
    res = scenario.drbot("wal", "fetch", "--policy", "pitr", name, str(got))
    assert res.returncode == 0, res.stderr
    data = got.read_bytes()
    assert len(data) == 16 * 1024 * 1024
    # archive_command semantics: the same file again is fine, different content is refused
    assert scenario.drbot("wal", "push", "--policy", "pitr", str(got)).returncode == 0
    changed = bytearray(data)
    changed[-1] ^= 0xFF
    got.write_bytes(bytes(changed))
    res = scenario.drbot("wal", "push", "--policy", "pitr", str(got))
    assert res.returncode == 13, res.stderr
    assert "different content" in res.stderr
    # a segment stored under another segment's name is caught when fetched: exit 255 stops
    # recovery instead of letting the server replay the wrong WAL
    renamed = scenario.base / (name[:16] + "000000F0")
    renamed.write_bytes(data)
    assert scenario.drbot("wal", "push", "--policy", "pitr", str(renamed)).returncode == 0
    res = scenario.drbot("wal", "fetch", "--policy", "pitr", renamed.name, str(scenario.base / "x"))
    assert res.returncode == 255, res.stderr
    assert "holds the wrong WAL" in res.stderr
    # a file the archive does not have: exit 1, the normal end of recovery
    res = scenario.drbot("wal", "fetch", "--policy", "pitr", "00000009.history", str(got))
    assert res.returncode == 1, res.stderr
    res = scenario.drbot("wal", "push", "--policy", "pitr", str(scenario.base / "pitr.key"))
    assert res.returncode == 2, res.stderr  # not a WAL file name: refused, not "archived"
    for client, bucket in _Archive(scenario).clients:
        client.delete_object(Bucket=bucket, Key=f"pitr/pitr/wal/00000001/{renamed.name}.zst.enc")


def test_after_failover_streaming_continues_on_the_new_timeline(scenario: Scenario) -> None:
    # The old primary is gone: its streamer stops. A restore of it, promoted, takes over.
    assert scenario.streamer is not None
    scenario.streamer.terminate()
    scenario.streamer.wait(timeout=60)
    res, promoted_dir = scenario.restore("--latest")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["timeline"] == 2
    promoted_uri = f"postgresql://postgres@127.0.0.1:{out['port']}/postgres"
    scenario.env["SRC_URI"] = promoted_uri
    scenario.start_streamer()
    writer = Writer(promoted_uri)
    with psycopg.connect(promoted_uri, autocommit=True) as conn:
        row = conn.execute("SELECT max(seq) FROM counter").fetchone()
        assert row is not None
        writer.seq = int(row[0]) + 1000  # rows of the new timeline are easy to tell apart
    writer.start()
    try:
        time.sleep(3)
        with psycopg.connect(promoted_uri, autocommit=True) as conn:
            conn.execute("SELECT pg_switch_wal()")
        time.sleep(3)
    finally:
        writer.stop.set()
        writer.join(timeout=10)
    time.sleep(PARTIAL_INTERVAL_S * 2 + 1)
    with psycopg.connect(promoted_uri, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT seq, pg_xact_commit_timestamp(xmin) FROM counter ORDER BY 2, 1"
        ).fetchall()
    commits = [(int(r[0]), r[1]) for r in rows]
    new_rows = [(s, ts) for s, ts in commits if s > writer.seq - 100]
    assert len(new_rows) > 50
    at = new_rows[len(new_rows) // 2][1]
    res, target = scenario.restore("--at", at.isoformat())
    assert res.returncode == 0, res.stderr
    second = json.loads(res.stdout)
    assert second["plan"]["timeline"] == 2
    assert scenario.restored_seqs(second["port"]) == {s for s, ts in commits if ts <= at}
    assert second["timeline"] == 3
    scenario.stop_restored(target)
    scenario.streamer.terminate()
    scenario.streamer.wait(timeout=60)
    scenario.stop_restored(promoted_dir)


def test_a_lost_slot_is_a_gap_answered_with_a_new_full_backup(scenario: Scenario) -> None:
    # Back on the original source, with the streamer stopped, the slot is dropped and the WAL
    # it held is removed: the archive can never get it now.
    scenario.env["SRC_URI"] = scenario.pg.uri()
    if scenario.streamer is not None and scenario.streamer.poll() is None:
        scenario.streamer.terminate()
        scenario.streamer.wait(timeout=60)
    before = json.loads(scenario.drbot("list", "--policy", "pitr", "--json").stdout)
    scenario.pg.execute("postgres", "SELECT pg_drop_replication_slot('drbot_pitr')")
    for _ in range(4):
        scenario.pg.execute(
            "postgres", "INSERT INTO counter (seq) VALUES (-1 - (random() * 1e9)::int)"
        )
        scenario.pg.execute("postgres", "SELECT pg_switch_wal()")
        scenario.pg.execute("postgres", "CHECKPOINT")
    scenario.start_streamer()
    deadline = time.monotonic() + 60
    after = before
    while time.monotonic() < deadline and len(after) == len(before):
        time.sleep(1)
        after = json.loads(scenario.drbot("list", "--policy", "pitr", "--json").stdout)
    assert len(after) == len(before) + 1, "no new full backup after the gap"
    trail = json.loads(
        scenario.drbot("audit", "show", "--policy", "pitr", "--json", "--last", "200").stdout
    )
    gaps = [e for e in trail if e["action"] == "wal.gap"]
    assert gaps and gaps[-1]["outcome"] == "failed"
    assert gaps[-1]["subject"]["first_missing"].startswith("00000001")


def _archived_commits(scenario: Scenario, n: int = 3) -> datetime:
    """Commit `n` rows with the streamer running and wait until the archive reaches the last
    of them (whatever earlier tests left running); returns that commit's time."""
    if scenario.streamer is None or scenario.streamer.poll() is not None:
        scenario.start_streamer()
    for _ in range(n):
        scenario.pg.execute(
            "postgres", "INSERT INTO counter (seq) VALUES (-1 - (random() * 1e9)::int)"
        )
    last = scenario.commits()[-1][1]
    _wait_archived(scenario, last)
    return last


def _wait_archived(scenario: Scenario, moment: datetime, *, confirmed: bool = False) -> None:
    """Until `list` shows the archive reaching `moment` (with `confirmed`, proven by a streamer
    heartbeat: a partial segment stored after `moment` does not prove nothing followed it)."""
    field = "confirmed_time" if confirmed else "to_time"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = json.loads(scenario.drbot("list", "--policy", "pitr", "--json").stdout)
        window = rows[-1]["restorable"] if rows else None
        if window and window[field] and datetime.fromisoformat(window[field]) >= moment:
            return
        time.sleep(1)
    raise AssertionError(f"the archive never reached {moment.isoformat()} ({field})")


def _drill(scenario: Scenario, sandbox: str, *extra: str, checks: str = "") -> dict[str, Any]:
    """A drill of the streamed chain with these `drill.checks`, and its --json result."""
    policy = scenario.base / "policies" / "pitr.yaml"
    text = policy.read_text().split("targets:")[0]
    drill = "drill:\n  checks:\n" + checks if checks else ""
    policy.write_text(text + "targets:\n  rpo: 1m\n  rto: 10m\n" + drill)
    res = scenario.drbot(
        "drill", "--policy", "pitr", "--sandbox", sandbox, "--json", *extra, timeout=300
    )
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def _check_physical_drill(scenario: Scenario, out: dict[str, Any], last: datetime) -> None:
    assert out["passed"] is True
    checks = {c["name"]: c for c in out["checks"]}
    for name in ("base_backup", "wal_replay", "amcheck", "rows", "rto", "rpo"):
        assert checks[name]["passed"], checks[name]
    # The restore point is a real commit, no older than the last one the archive held before
    # the drill, and the archive was at most one partial interval (plus shipping) behind.
    commits = {ts for _seq, ts in scenario.commits()}
    reached = datetime.fromisoformat(out["restore_point"])
    assert reached in commits and reached >= last
    assert 0 <= out["rpo_s"] <= PARTIAL_INTERVAL_S + 3
    assert set(out["phases"]) >= {"provision", "fetch", "start", "checks"}
    assert not list(Path(tempfile.gettempdir()).glob("drbot-drill-*"))


def _rows_check(scenario: Scenario) -> str:
    n = len(scenario.commits())
    return f"    - name: rows\n      sql: SELECT count(*) >= {n} FROM counter\n"


def test_physical_drill_in_a_container_replays_the_streamed_wal(
    scenario: Scenario, docker_image: str
) -> None:
    from tests.fixtures.docker import drill_containers

    last = _archived_commits(scenario)
    out = _drill(scenario, "docker", checks=_rows_check(scenario))
    assert out["image"] == docker_image
    _check_physical_drill(scenario, out, last)
    assert not drill_containers()
    print(f"physical drill in docker: RTO {out['rto_s']}s, phases {out['phases']}")


def test_physical_drill_in_the_process_sandbox(scenario: Scenario) -> None:
    last = _archived_commits(scenario)
    out = _drill(scenario, "process", checks=_rows_check(scenario))
    assert out["sandbox"] == "process"
    _check_physical_drill(scenario, out, last)


def test_drill_at_a_quiet_moment_replays_everything(scenario: Scenario) -> None:
    # No commit after `at` exists for recovery to stop at; a heartbeat proves the archive was
    # complete then, so the drill replays it all, as `drbot restore` does.
    scenario.writer.stop.set()
    scenario.writer.join(timeout=10)
    at = _archived_commits(scenario) + timedelta(seconds=1)
    _wait_archived(scenario, at, confirmed=True)
    out = _drill(scenario, "process", "--at", at.isoformat())
    replay = {c["name"]: c for c in out["checks"]}["wal_replay"]
    assert replay["passed"] and "everything was replayed" in replay["detail"]
    assert datetime.fromisoformat(out["restore_point"]) <= at


def test_after_a_key_rotation_the_new_key_alone_restores_the_chain(scenario: Scenario) -> None:
    # Base backups and streamed WAL (segments, partials, histories, the heartbeat) written
    # under the old key; the rotation rewrites manifests only, and WAL through re-wrapped keys.
    last = _archived_commits(scenario)
    new = scenario.base / "pitr-2027.key"
    assert scenario.drbot("keys", "generate", "--out", str(new)).returncode == 0
    policy = scenario.base / "policies" / "pitr.yaml"
    old = scenario.base / "pitr.key"
    text = policy.read_text()
    policy.write_text(
        text.replace(f"key: file:{old}", f"key: file:{new}\n  previous_keys: [file:{old}]")
    )
    rotated = scenario.drbot("keys", "rotate", "--policy", "pitr")
    assert rotated.returncode == 0, rotated.stderr
    free = scenario.drbot("keys", "check", "--policy", "pitr", "--key", f"file:{old}")
    assert free.returncode == 0, free.stdout + free.stderr
    policy.write_text(text.replace(f"file:{old}", f"file:{new}"))  # the old key is retired
    res, target = scenario.restore("--latest")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    restored = scenario.restored_seqs(out["port"])
    assert {s for s, ts in scenario.commits() if ts <= last} <= restored
    scenario.stop_restored(target)
