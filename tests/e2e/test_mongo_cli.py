"""MongoDB through the drbot command: full backups, change-stream slices, point-in-time
restores compared with snapshots the test took, and the failures a person can meet.

Every test runs against the server `tests/fixtures/mongo.py` found (the report header and each
test's `mongo_server` property say which: a real mongod, or SecantusDB).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo import MongoClient

from tests.e2e.conftest import DRBOT
from tests.fixtures.mongo import MongoServer
from tests.fixtures.mongo_workload import (
    Workload,
    checkpoint,
    checkpoint_precise,
    differences,
    snapshot,
)
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.e2e
RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)

POLICY = """\
version: 1
name: orders
source:
  kind: mongodb
  uri: ${{ORDERS_MONGO_URI}}
  databases: [{database}]
  partial_interval: {interval}
schedule:
  incremental: continuous
encryption:
  key: file:${{DRBOT_KEY_DIR}}/orders.key
destinations:
  - name: primary
    url: s3://{bucket1}/orders
    region: us-east-1
  - name: replica
    url: s3://{bucket2}/orders
    region: eu-west-1
targets:
  rpo: 1m
  rto: 30m
"""


@dataclass
class MongoEnv:
    tmp: Path
    source: MongoServer
    target: MongoServer
    database: str
    s3: S3Server
    buckets: tuple[str, str]
    env: dict[str, str] = field(default_factory=dict)
    streamers: list[subprocess.Popen[str]] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DRBOT, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        res = self.run(*args)
        assert res.returncode == 0, f"drbot {' '.join(args)}: {res.returncode}\n{res.stderr}"
        return res

    def client(self) -> MongoClient[dict[str, Any]]:
        return self.source.client()

    def start_streamer(self) -> subprocess.Popen[str]:
        log = open(self.tmp / f"streamer-{len(self.streamers)}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [DRBOT, "changes", "stream", "--policy", "orders"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        self.streamers.append(proc)
        return proc

    def stop_streamer(self, proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> int:
        proc.send_signal(sig)
        return proc.wait(timeout=60)

    def streamer_log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp.glob("streamer-*.log")))

    def slices(self) -> int:
        """How many slices continue the newest backup (`drbot list`)."""
        rows = json.loads(self.ok("list", "--policy", "orders", "--json").stdout)
        return int(rows[-1]["restorable"]["slices"]) if rows and rows[-1]["restorable"] else 0

    def reach(self) -> Timestamp | None:
        """How far the newest backup and its slices can be restored to (`drbot list`)."""
        rows = json.loads(self.ok("list", "--policy", "orders", "--json").stdout)
        if not rows or rows[-1]["restorable"] is None:
            return None
        secs, _, inc = rows[-1]["restorable"]["to_cluster_time"].partition(".")
        return Timestamp(int(secs), int(inc))

    def restore(self, *extra: str) -> dict[str, Any]:
        self.target.drop_user_databases()
        res = self.ok(
            "restore", "--policy", "orders", "--to", self.target.uri, "--yes", "--json", *extra
        )
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    def events(self) -> list[dict[str, Any]]:
        trail = self.tmp / "state" / "audit" / "trail.jsonl"
        return [json.loads(line) for line in trail.read_text().splitlines() if line.strip()]


def make_env(
    tmp_path: Path,
    source: MongoServer,
    target: MongoServer,
    s3: S3Server,
    database: str,
    *,
    interval: str = "1s",
) -> MongoEnv:
    buckets = (s3.make_bucket("us-east-1"), s3.make_bucket("eu-west-1"))
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "orders.yaml").write_text(
        POLICY.format(database=database, bucket1=buckets[0], bucket2=buckets[1], interval=interval)
    )
    keys = tmp_path / "keys"
    keys.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DRBOT_"))}
    env.update(
        AWS_ENDPOINT_URL=s3.endpoint_url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        ORDERS_MONGO_URI=source.uri,
        DRBOT_KEY_DIR=str(keys),
        DRBOT_POLICIES=str(policies),
        DRBOT_STATE_DIR=str(tmp_path / "state"),
        DRBOT_LOG_FORMAT="json",
    )
    e = MongoEnv(tmp_path, source, target, database, s3, buckets, env)
    e.ok("keys", "generate", "--out", str(keys / "orders.key"))
    return e


@pytest.fixture
def menv(
    tmp_path: Path,
    mongo_server: MongoServer,
    mongo_target: MongoServer,
    mongo_db: str,
    s3_server: S3Server,
) -> Any:
    e = make_env(tmp_path, mongo_server, mongo_target, s3_server, mongo_db)
    yield e
    for proc in e.streamers:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_slices_past(e: MongoEnv, ts: Timestamp, timeout: float = 60) -> None:
    """Wait until the stored slices reach cluster time `ts`."""
    deadline = time.monotonic() + timeout
    reach = None
    while time.monotonic() < deadline:
        reach = e.reach()
        if reach is not None and (reach.time, reach.inc) >= (ts.time, ts.inc):
            return
        time.sleep(0.5)
    raise AssertionError(f"slices reach {reach}, never {ts}\n{e.streamer_log()}")


def test_point_in_time_restores_of_a_random_workload_match_snapshots(menv: MongoEnv) -> None:
    """A full backup taken while the workload runs, then the streamer: restores to several
    moments give exactly the state the test saw then, and --latest the final state."""
    e = menv
    seed = int(os.environ.get("DRBOT_TEST_SEED", "0")) or int(uuid.uuid4().int % 10_000)
    print(f"workload seed {seed} against {e.source.kind}")
    client = e.client()
    work = Workload(client, e.database, seed)
    work.seed_data()
    backup = subprocess.Popen(
        [DRBOT, "backup", "--policy", "orders", "--json"],
        env=e.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    work.renames = False  # a rename during the dump fails the backup (tested on its own)
    while backup.poll() is None:  # the dump reads while the workload writes
        work.run(5)
    work.renames = True
    out, err = backup.communicate()
    assert backup.returncode == 0, err
    positions = json.loads(out)["positions"]
    assert positions["consistent_time"] and positions["end_token"]
    work.run(30)
    streamer = e.start_streamer()
    moments = []
    for _ in range(3):
        work.run(40)
        moments.append(checkpoint_precise(client, e.database))  # writes go on at once
    work.run(25)
    final_ts, final = checkpoint(client, e.database)
    wait_for_slices_past(e, final_ts)
    assert e.stop_streamer(streamer) == 130, e.streamer_log()
    assert work.ops > 150 and len(work.by_kind) >= 10, work.by_kind

    for ts, wall, expected in moments:
        # to the millisecond: writes that followed within the same second are not included
        result = e.restore("--at", wall.isoformat())["result"]
        assert not differences(expected, snapshot(e.target.client(), e.database)), (
            ts,
            differences(expected, snapshot(e.target.client(), e.database)),
        )
        assert result["fingerprint_checked"] is True
        assert result["reached"].split(".")[0] == str(ts.time)
        assert result["reached_at"] == wall.isoformat()  # the moment asked for, to the ms

    result = e.restore("--latest")["result"]
    assert not differences(final, snapshot(e.target.client(), e.database))
    assert result["events_applied"] > 0
    # --latest loses nothing the streamer had shipped: the data is as of the final write
    secs, _, inc = result["reached"].partition(".")
    assert (int(secs), int(inc)) >= (final_ts.time, final_ts.inc)

    verify = e.ok("verify", "--policy", "orders", "--json")
    assert json.loads(verify.stdout)["ok"] is True


def _every_bson_type() -> list[dict[str, Any]]:
    import re
    import uuid as uuidlib

    from bson import Binary, Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex
    from bson.datetime_ms import DatetimeMS

    return [
        {
            "_id": ObjectId(),
            "decimal": Decimal128("-1234567890.123456789012345678901234"),
            "decimal_zero": Decimal128("-0.00"),
            "decimal_exp": Decimal128("1E-6000"),
            "when": datetime(2026, 11, 23, 14, 5, 0, 123000, tzinfo=UTC),
            "pre_epoch": DatetimeMS(-1),
            "far": DatetimeMS(253402300799999),  # 9999-12-31T23:59:59.999Z
            "bin0": Binary(b"\x00\x01\xff", 0),
            "uuid": Binary(uuidlib.UUID(int=7).bytes, 4),
            "md5": Binary(b"0123456789abcdef", 5),
            "user": Binary(b"custom", 128),
            "regex": Regex("^a.*b$", "imsx"),
            "pyregex": re.compile("x+", re.IGNORECASE),
            "ts": Timestamp(123456, 7),
            "int32": 7,
            "int64": Int64(7),
            "double": 7.0,
            "negzero": -0.0,
            "nan": float("nan"),
            "min": MinKey(),
            "max": MaxKey(),
            "code": Code("function () { return x; }"),
            "code_scope": Code("function () { return y; }", {"y": 1}),
            "ref": DBRef("other", ObjectId(), "db2", extra="field"),
            "nested": {"a": [1, [2, [3, {"deep": [None, True, "é"]}]]], "empty": {}, "list": []},
            "dotted.name": 1,
        },
        # near the 16 MiB limit: one document of about 15.9 MiB
        {"_id": "big", "blob": Binary(os.urandom(15 * 1024 * 1024 + 900_000), 0)},
    ]


def test_every_bson_type_and_collection_option_round_trips_exactly(menv: MongoEnv) -> None:
    e = menv
    client = e.client()
    db = client[e.database]
    db["types"].insert_many(_every_bson_type())
    db.create_collection("capped", capped=True, size=1 << 20, max=100)
    db["capped"].insert_many([{"_id": i} for i in range(120)])
    db.create_collection(
        "validated",
        validator={"$jsonSchema": {"bsonType": "object", "required": ["name"]}},
        validationLevel="moderate",
    )
    db["validated"].insert_one({"name": "ok"})
    db.create_collection("collated", collation={"locale": "en", "strength": 2})
    db["collated"].insert_many([{"_id": 1, "s": "A"}, {"_id": 2, "s": "a"}])
    db.create_collection("clustered", clusteredIndex={"key": {"_id": 1}, "unique": True})
    db["clustered"].insert_many([{"_id": i, "v": i} for i in range(10)])
    db.create_collection(
        "metrics", timeseries={"timeField": "t", "metaField": "m", "granularity": "seconds"}
    )
    db["metrics"].insert_many(
        [
            {"t": datetime(2026, 11, 23, 0, 0, i, tzinfo=UTC), "m": {"s": i % 2}, "v": i}
            for i in range(20)
        ]
    )
    db["orders"].insert_many(
        [{"_id": i, "a": i % 7, "b": -i, "p": i % 3, "c": datetime.now(UTC)} for i in range(500)]
    )
    db["orders"].create_index([("a", 1), ("b", -1)], name="a_b")
    db["orders"].create_index("b", unique=True)
    db["orders"].create_index("p", partialFilterExpression={"p": {"$gt": 0}}, name="partial_p")
    db["orders"].create_index("c", expireAfterSeconds=3600 * 24 * 365)
    db.create_collection("big_orders", viewOn="orders", pipeline=[{"$match": {"a": 6}}])
    expected = snapshot(client, e.database)
    raw_before = {d["_id"]: d.raw for d in db["types"].with_options(codec_options=RAW).find()}

    e.ok("backup", "--policy", "orders")
    result = e.restore()["result"]

    target = e.target.client()
    assert not differences(expected, snapshot(target, e.database))
    raw_after = {
        d["_id"]: d.raw for d in target[e.database]["types"].with_options(codec_options=RAW).find()
    }
    assert raw_after == raw_before  # byte for byte, field order and types included
    assert result["documents"] == sum(
        db[name].count_documents({}) for name in db.list_collection_names() if name != "big_orders"
    )
    assert set(result["collections"]) >= {
        f"{e.database}.{n}"
        for n in (
            "types",
            "capped",
            "validated",
            "collated",
            "clustered",
            "metrics",
            "orders",
            "big_orders",
        )
    }
    # the options act as options in the restored deployment, not just as stored text
    tdb = target[e.database]
    with pytest.raises(Exception, match=r"[Vv]alidation"):
        tdb["validated"].insert_one({"no_name": 1})
    # (SecantusDB ignores a collection's default collation in queries: compare with the source)
    assert tdb["collated"].count_documents({"s": "a"}) == db["collated"].count_documents({"s": "a"})
    assert tdb["big_orders"].count_documents({}) == len([i for i in range(500) if i % 7 == 6])


def test_streamer_killed_mid_slice_resumes_without_gap_or_duplicate(
    tmp_path: Path,
    mongo_server: MongoServer,
    mongo_target: MongoServer,
    mongo_db: str,
    s3_server: S3Server,
) -> None:
    """SIGKILL while the streamer holds unshipped events: the restart reads them again from
    the last stored position, so every write is replayed exactly once."""
    e = make_env(tmp_path, mongo_server, mongo_target, s3_server, mongo_db, interval="30s")
    client = e.client()
    db = client[e.database]
    db["c"].insert_many([{"_id": i, "n": 0} for i in range(50)])
    e.ok("backup", "--policy", "orders")
    first = e.start_streamer()
    time.sleep(2)  # resumed and waiting
    for i in range(40):
        db["c"].update_one({"_id": i}, {"$inc": {"n": 1}})  # not idempotent if replayed twice
    time.sleep(2)  # read into the 30 s slice, not shipped
    first.kill()
    assert first.wait(timeout=30) == -signal.SIGKILL
    assert e.slices() == 0, "nothing may have been shipped before the kill"
    for i in range(20):
        db["c"].insert_one({"_id": 100 + i, "n": i})
    second = e.start_streamer()
    ts, expected = checkpoint(client, e.database)
    time.sleep(2)
    assert e.stop_streamer(second) == 130, e.streamer_log()  # ships what it holds on stop
    reach = e.reach()
    assert reach is not None and (reach.time, reach.inc) >= (ts.time, ts.inc)

    result = e.restore("--latest")["result"]
    assert not differences(expected, snapshot(e.target.client(), e.database))
    # 40 updates + 20 inserts + the checkpoint's marker: each exactly once
    assert result["events_applied"] == 61, result
    assert result["events_by_type"] == {"update": 40, "insert": 21}, result
    assert json.loads(e.ok("verify", "--policy", "orders", "--json").stdout)["ok"] is True


def test_lost_change_history_is_a_gap_answered_by_a_full_backup(
    tmp_path: Path, mongo_target: MongoServer, s3_server: S3Server
) -> None:
    """The streamer resumes from a token the server no longer has: it reports the gap (audit
    trail), takes a new full backup, resumes from it, and verify names the gap."""
    from tests.fixtures.mongo import SECANTUSD, server_kind

    if server_kind() != "secantus":
        pytest.skip(
            "needs a server that drops its change history on demand (SecantusDB's "
            "secantusAdmin.pruneOplog); with mongod this is proven by hand, see docs/design.md"
        )
    assert SECANTUSD.exists()
    source = MongoServer("secantus", extra=["--oplog-max-entries", "10"])
    source.start()
    try:
        database = f"t_{uuid.uuid4().hex[:10]}"
        e = make_env(tmp_path, source, mongo_target, s3_server, database)
        db = e.client()[database]
        db["c"].insert_many([{"_id": i} for i in range(5)])
        e.ok("backup", "--policy", "orders")
        streamer = e.start_streamer()
        db["c"].insert_one({"_id": "before-gap"})
        ts, _ = checkpoint(e.client(), database)
        wait_for_slices_past(e, ts)
        assert e.stop_streamer(streamer) == 130
        for i in range(30):  # while nothing streams
            db["c"].insert_one({"_id": f"lost-{i}"})
        source.prune_history()

        streamer = e.start_streamer()
        deadline = time.monotonic() + 60
        while len(json.loads(e.ok("list", "--policy", "orders", "--json").stdout)) < 2:
            assert time.monotonic() < deadline, e.streamer_log()
            time.sleep(0.5)
        db["c"].insert_one({"_id": "after-gap"})
        ts, expected = checkpoint(e.client(), database)
        wait_for_slices_past(e, ts)
        assert e.stop_streamer(streamer) == 130
        assert "taking a new full backup" in e.streamer_log()
        gaps = [ev for ev in e.events() if ev["action"] == "changes.gap"]
        assert len(gaps) == 1 and "history" in gaps[0]["details"]["error"], gaps
        assert [ev["action"] for ev in e.events()].count("backup.completed") == 2

        e.restore("--latest")
        assert not differences(expected, snapshot(e.target.client(), database))
        res = e.run("verify", "--policy", "orders")
        assert res.returncode == 13, res.stderr
        assert "are missing: restores from backup" in res.stderr
    finally:
        source.remove()


def test_refusals_name_the_problem(menv: MongoEnv) -> None:
    e = menv
    db = e.client()[e.database]
    db["c"].insert_many([{"_id": i} for i in range(10)])
    res = e.run("restore", "--policy", "orders", "--to", e.target.uri, "--yes")
    assert res.returncode == 10, res.stderr  # nothing backed up yet
    assert "no complete MongoDB backup" in res.stderr
    e.ok("backup", "--policy", "orders")
    e.restore()
    # the target now holds the data: refused without --drop, replaced with it
    res = e.run("restore", "--policy", "orders", "--to", e.target.uri, "--yes")
    assert res.returncode == 2 and "--drop" in res.stderr, res.stderr
    db["c"].insert_one({"_id": "new"})
    e.ok("backup", "--policy", "orders")
    res = e.ok("restore", "--policy", "orders", "--to", e.target.uri, "--yes", "--drop")
    assert e.target.client()[e.database]["c"].count_documents({}) == 11
    res = e.run(
        "restore",
        "--policy",
        "orders",
        "--to",
        e.target.uri,
        "--at",
        "2001-01-01T00:00:00Z",
        "--drop",
        "--yes",
    )
    assert res.returncode == 10 and "earliest restorable moment" in res.stderr, res.stderr
    res = e.run("restore", "--policy", "orders", "--to-dir", str(e.tmp / "x"))
    assert res.returncode == 2 and "--to-dir" in res.stderr, res.stderr
    res = e.run("restore", "--policy", "orders", "--to", e.target.uri, "--ns", "nosuch.c")
    assert res.returncode == 2 and "no database 'nosuch'" in res.stderr, res.stderr


def test_unreachable_source_and_standalone_server(menv: MongoEnv, tmp_path: Path) -> None:
    from tests.fixtures.mongo import server_kind

    e = menv
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = dict(
        e.env, ORDERS_MONGO_URI=f"mongodb://127.0.0.1:{closed}/?serverSelectionTimeoutMS=500"
    )
    res = subprocess.run(
        [DRBOT, "backup", "--policy", "orders"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 14, res.stderr
    assert f"127.0.0.1:{closed}" in res.stderr and "cannot reach MongoDB" in res.stderr
    if server_kind() != "secantus":
        pytest.skip("a standalone server is started here only with SecantusDB (--standalone)")
    standalone = MongoServer("secantus", extra=["--standalone"])
    standalone.start()
    try:
        env = dict(e.env, ORDERS_MONGO_URI=standalone.uri)
        for args in (["backup", "--policy", "orders"], ["changes", "stream", "--policy", "orders"]):
            res = subprocess.run(
                [DRBOT, *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert res.returncode == 16, (args, res.stderr)
            assert "standalone server" in res.stderr and "no change streams" in res.stderr
    finally:
        standalone.remove()


def test_a_damaged_slice_is_read_from_the_other_destination(menv: MongoEnv) -> None:
    e = menv
    client = e.client()
    db = client[e.database]
    db["c"].insert_many([{"_id": i, "n": 0} for i in range(20)])
    e.ok("backup", "--policy", "orders")
    streamer = e.start_streamer()
    for i in range(20):
        db["c"].update_one({"_id": i}, {"$set": {"n": i}})
    ts, expected = checkpoint(client, e.database)
    wait_for_slices_past(e, ts)
    assert e.stop_streamer(streamer) == 130

    def slice_keys(region: str, bucket: str) -> list[str]:
        listed = e.s3.client("s3", region).list_objects_v2(Bucket=bucket)
        return sorted(o["Key"] for o in listed["Contents"] if "/changes/" in o["Key"])

    def damage(region: str, bucket: str, key: str) -> None:
        s3 = e.s3.client("s3", region)
        body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        body[len(body) // 2] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    primary = slice_keys("us-east-1", e.buckets[0])
    assert primary == slice_keys("eu-west-1", e.buckets[1]) and primary
    damage("us-east-1", e.buckets[0], primary[0])
    e.restore("--latest")
    assert not differences(expected, snapshot(e.target.client(), e.database))

    damage("eu-west-1", e.buckets[1], primary[0])
    e.target.drop_user_databases()
    res = e.run("restore", "--policy", "orders", "--to", e.target.uri, "--yes", "--latest")
    assert res.returncode == 13, res.stderr
    assert primary[0].split("/")[-1] in res.stderr
    # nothing half-restored is left behind
    assert (
        e.database not in e.target.client().list_database_names()
        or not e.target.client()[e.database].list_collection_names()
    )
    res = e.run("verify", "--policy", "orders")
    assert res.returncode == 13 and res.stderr.count("BAD") == 2, res.stderr


def test_drill_restores_into_a_throwaway_server_and_keeps_the_evidence(
    tmp_path: Path,
    mongo_server: MongoServer,
    mongo_target: MongoServer,
    mongo_db: str,
    s3_server: S3Server,
) -> None:
    """`drbot drill` in the process sandbox. There is no mongod on these machines: the
    sandbox's `mongod` is tests/fixtures/mongod_shim.py running SecantusDB (with a real
    mongod on PATH that one is used). The docker sandbox (an image such as mongo:7) cannot be
    provisioned here."""
    import shutil as sh

    from tests.fixtures.mongod_shim import install

    e = make_env(tmp_path, mongo_server, mongo_target, s3_server, mongo_db)
    db = e.client()[e.database]
    db["c"].insert_many([{"_id": i, "n": i} for i in range(100)])
    e.ok("backup", "--policy", "orders")
    real = sh.which("mongod")
    if real is None:  # no server program: the drill cannot start, and says why
        res = e.run("drill", "--policy", "orders", "--sandbox", "process")
        assert res.returncode == 17, res.stderr
        assert "needs the mongod program" in res.stderr, res.stderr
    bin_dir = Path(real).parent if real else install(tmp_path / "bin")
    policy = e.tmp / "policies" / "orders.yaml"
    policy.write_text(
        policy.read_text().replace(
            "  partial_interval: 1s\n", f"  partial_interval: 1s\n  bin_dir: {bin_dir}\n"
        )
        + "drill:\n  sandbox: process\n"
    )
    streamer = e.start_streamer()
    db["c"].update_many({}, {"$inc": {"n": 1}})
    ts, _ = checkpoint(e.client(), e.database)
    wait_for_slices_past(e, ts)
    assert e.stop_streamer(streamer) == 130

    before = set(Path("/tmp").glob("drbot-drill-*"))
    res = e.run("drill", "--policy", "orders", "--json", timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["passed"] is True and out["sandbox"] == "process", out
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["fingerprint"]["passed"]
    assert "1 collection(s), 100 document(s)" in checks["fingerprint"]["detail"]
    # the 100 updates and the checkpoint's marker, all after the backup
    assert checks["restore_point"]["passed"], checks
    assert "101 change(s) replayed" in checks["restore_point"]["detail"], checks
    assert {"rto", "rpo"} <= set(checks) and out["rto_s"] > 0
    assert out["stored_in"] == ["primary", "replica"] or out["stored_in"] == ["primary"]
    assert "drill.completed" in [ev["action"] for ev in e.events()]
    assert set(Path("/tmp").glob("drbot-drill-*")) == before  # the sandbox is gone


def test_daemon_takes_the_backup_runs_the_streamer_and_measures_the_rpo(menv: MongoEnv) -> None:
    """`drbot daemon` with a MongoDB policy: the missed full backup at start, the supervised
    `drbot changes stream`, the RPO from the stored slices, and a clean stop."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    from drbot.engines.postgres.localserver import free_port

    e = menv
    policy = e.tmp / "policies" / "orders.yaml"
    policy.write_text(
        policy.read_text().replace(
            "  incremental: continuous\n",
            '  incremental: continuous\n  full: "@every 1h"\n  verify: null\n',
        )
    )
    db = e.client()[e.database]
    db["c"].insert_many([{"_id": i} for i in range(50)])
    port = free_port()
    env = dict(e.env, DRBOT_HTTP=f"127.0.0.1:{port}", DRBOT_CHECK_INTERVAL="2")
    log = e.tmp / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [DRBOT, "daemon"], env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def metric(name: str) -> float | None:
        try:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels.get("policy") == "orders":
                    return float(sample.value)
        return None

    def wait(what: str, ok: Any, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            assert daemon.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what}:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)

    try:
        wait("a backup", lambda: e.reach() is not None)
        wait("the streamer", lambda: metric("drbot_streamer_up") == 1.0)
        for i in range(20):
            db["c"].update_one({"_id": i}, {"$set": {"touched": True}})
        ts, expected = checkpoint(e.client(), e.database)
        wait_for_slices_past(e, ts)
        wait("an RPO measured after the slices", lambda: (metric("drbot_rpo_seconds") or 1e9) < 30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=120)
    assert code == 0, log.read_text()[-3000:]
    e.restore("--latest")
    assert not differences(expected, snapshot(e.target.client(), e.database))
    assert "changes.stream_started" in [ev["action"] for ev in e.events()]


def test_a_scheduled_incremental_catches_up_and_stops(menv: MongoEnv) -> None:
    """`drbot changes stream --once` (what the daemon runs for a cron schedule.incremental)."""
    e = menv
    db = e.client()[e.database]
    db["c"].insert_many([{"_id": i} for i in range(10)])
    e.ok("backup", "--policy", "orders")
    for i in range(10):
        db["c"].update_one({"_id": i}, {"$set": {"v": i}})
    ts, expected = checkpoint(e.client(), e.database)
    res = e.ok("changes", "stream", "--policy", "orders", "--once", "--json")
    out = json.loads(res.stdout)
    assert out["events_shipped"] == 11 and out["slices_shipped"] == 1, out
    assert out["archived_at"] is not None  # caught up, and said so (heartbeat)
    reach = e.reach()
    assert reach is not None and (reach.time, reach.inc) >= (ts.time, ts.inc)
    again = json.loads(e.ok("changes", "stream", "--policy", "orders", "--once", "--json").stdout)
    assert again["events_shipped"] == 0  # nothing new: nothing shipped twice
    e.restore("--latest")
    assert not differences(expected, snapshot(e.target.client(), e.database))
    assert [ev["action"] for ev in e.events()].count("changes.stream_stopped") == 2


def test_a_second_backup_taken_while_the_streamer_runs_changes_nothing_restored(
    menv: MongoEnv,
) -> None:
    """The streamer runs across a new full backup: a moment before it restores from the first
    backup through the slices, a moment after it from the second, both exactly."""
    e = menv
    client = e.client()
    work = Workload(client, e.database, 4242)
    work.seed_data()
    work.renames = False  # a rename during a dump fails that backup (tested on its own)
    e.ok("backup", "--policy", "orders")
    streamer = e.start_streamer()
    work.run(40)
    before = checkpoint_precise(client, e.database)
    # The streamer has resumed from the first backup (a streamer starting with no slices
    # resumes from the newest backup: started after the second, it would begin there).
    wait_for_slices_past(e, before[0])
    backup = subprocess.Popen([DRBOT, "backup", "--policy", "orders"], env=e.env)
    while backup.poll() is None:  # the second dump reads while the workload writes
        work.run(3)
    assert backup.returncode == 0
    work.run(40)
    after = checkpoint_precise(client, e.database)
    work.run(20)
    ts, _, final = checkpoint_precise(client, e.database)
    wait_for_slices_past(e, ts)
    assert e.stop_streamer(streamer) == 130
    backups = [r["id"] for r in json.loads(e.ok("list", "--policy", "orders", "--json").stdout)]
    assert len(backups) == 2
    for (_, wall, expected), backup_id in ((before, backups[0]), (after, backups[1])):
        out = e.restore("--at", wall.isoformat())
        assert out["plan"]["backup_id"] == backup_id
        assert not differences(expected, snapshot(e.target.client(), e.database))
    e.restore("--latest")
    assert not differences(final, snapshot(e.target.client(), e.database))
