"""Key rotation against real parts: S3 in two regions and KMS in both (moto's server), backups
of a real PostgreSQL database, WAL objects, and rotations killed at many points."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drbot.catalog import scan_catalog
from drbot.clock import SystemClock
from drbot.engines.postgres.engine import PostgresEngine
from drbot.engines.postgres.localserver import LocalPostgres
from drbot.errors import KeyProblem
from drbot.ops.backup import BackupSettings, run_backup
from drbot.ops.rotate import (
    check_new_key,
    execute_rotation,
    inventory,
    key_ids,
    plan_rotation,
    still_under,
)
from drbot.ops.verify import run_verify
from drbot.ops.walstore import KeyCache, WalShipper, read_wal_object
from drbot.pipeline.filekey import FileKeyProvider, generate_key_file
from drbot.pipeline.keyref import key_provider_from_ref
from drbot.pipeline.keyring import KeyRing
from drbot.pipeline.keys import KeyProvider
from drbot.storage import layout
from drbot.storage.base import ObjectInfo, PutResult, Storage
from drbot.storage.open import open_storage
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.integration

REGIONS = ("us-east-1", "eu-west-1")
POLICY = "rot"
WAL = [f"00000001000000000000000{i}" for i in (1, 2, 3)]
BUCKETS: dict[str, tuple[str, str, bool]] = {}
"""destination -> (bucket, region, object lock), for looking at objects from outside drbot."""


class Killed(BaseException):
    """What SIGKILL would do: nothing after this point runs, no cleanup."""


class Dying:
    """A Storage that dies after `left` calls to put/open (a process killed mid-rotation)."""

    def __init__(self, inner: Storage, budget: list[int]) -> None:
        self._inner = inner
        self._budget = budget
        self.name = inner.name
        self.region = inner.region
        self.url = inner.url

    def _tick(self) -> None:
        self._budget[0] -= 1
        if self._budget[0] < 0:
            raise Killed

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        self._tick()
        return self._inner.put(key, chunks)

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        self._tick()
        return self._inner.open(key, offset=offset, length=length)

    def stat(self, key: str) -> ObjectInfo:
        return self._inner.stat(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._inner.list(prefix)

    def delete(self, key: str) -> None:
        self._inner.delete(key)

    def abort_incomplete(self, prefix: str) -> int:
        return self._inner.abort_incomplete(prefix)

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        return self._inner.read_tagged(key)

    def put_if(self, key: str, data: bytes, *, expected: str | None) -> str:
        return self._inner.put_if(key, data, expected=expected)


def _file_keys(tmp_path: Path, *names: str) -> list[FileKeyProvider]:
    """A fresh key file for each name, as providers."""
    for name in names:
        generate_key_file(tmp_path / name)
    return [FileKeyProvider(tmp_path / name) for name in names]


def _kms_key(server: S3Server) -> str:
    alias = f"alias/drbot-rot-{uuid.uuid4().hex[:8]}"
    for region in REGIONS:
        kms = server.client("kms", region)
        key_id = kms.create_key(Description="drbot rotation test")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    return f"kms:{alias}"


def _storages(server: S3Server, *, lock_second: bool = False) -> list[Storage]:
    from drbot.storage.base import ObjectLock

    out = []
    BUCKETS.clear()
    for i, region in enumerate(REGIONS):
        locked = lock_second and i == 1
        bucket = server.make_bucket(region, object_lock=locked)
        BUCKETS[("east", "west")[i]] = (bucket, region, locked)
        out.append(
            open_storage(
                ("east", "west")[i],
                f"s3://{bucket}/{POLICY}",
                region=region,
                endpoint_url=server.endpoint_url,
                object_lock=ObjectLock(mode="governance", days=1) if locked else None,
            )
        )
    return out


def _backups(pg: LocalPostgres, storages: list[Storage], keys: KeyProvider, n: int) -> None:
    db = f"rot_{uuid.uuid4().hex[:8]}"
    pg.create_database(db)
    pg.execute(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    engine = PostgresEngine(pg.uri(db), [db])
    for i in range(n):
        pg.execute(
            db, f"INSERT INTO t SELECT g, md5(g::text) FROM generate_series({i}*100, {i}*100+99) g"
        )
        run_backup(
            BackupSettings(policy=POLICY, engine_name="postgresql"),
            engine,
            storages,
            keys,
            SystemClock(),
        )
    # WAL objects as the streamer writes them: one data key per streamer session
    shipper = WalShipper(POLICY, storages, keys)
    for name in WAL:
        assert shipper.put(layout.wal_segment_key(POLICY, name), name.encode() * 100) == {}


def _data_objects(server: S3Server, storages: list[Storage]) -> dict[str, Any]:
    """Every object but manifests and re-wrapped entries, seen from outside drbot: bytes
    digest, ETag, version and object-lock retention."""
    out: dict[str, Any] = {}
    for storage in storages:
        bucket, region, locked = BUCKETS[storage.name]
        s3 = server.client("s3", region)
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            key = item["Key"]
            if key.endswith("manifest.json") or layout.REWRAP_PREFIX in key:
                continue
            got = s3.get_object(Bucket=bucket, Key=key)
            digest = hashlib.sha256(got["Body"].read()).hexdigest()
            lock = (got.get("ObjectLockMode"), got.get("ObjectLockRetainUntilDate"))
            assert locked == bool(lock[0]), key
            out[f"{storage.name}:{key}"] = (digest, got["ETag"], got.get("VersionId"), lock)
    return out


def _everything_opens(storages: list[Storage], keys: KeyProvider, *, verify: bool = True) -> None:
    """Every manifest opens (what rotation changes) and every WAL object; with `verify`, every
    backup also decrypts and checks out as a restore reads it (the data key comes from the
    manifest, so between kills the manifests are what can break). These WAL stand-ins are not
    real segments, so WAL is checked here, not by verify."""
    scan = scan_catalog(POLICY, storages, keys)
    assert not scan.problems and len(scan.backups) >= 1
    for backup in scan.backups if verify else ():
        report = run_verify(POLICY, storages, keys, backup_id=backup.backup_id)
        assert report.ok and report.checked_objects == 2 * len(storages), report.findings
    cache = KeyCache(keys)
    for storage in storages:
        for name in WAL:
            data = read_wal_object(storage, layout.wal_segment_key(POLICY, name), cache)
            assert data == name.encode() * 100


def test_rotation_from_a_key_file_to_kms_touches_no_data_object(
    aws_env: S3Server, pg_server: LocalPostgres, tmp_path: Path
) -> None:
    (old,) = _file_keys(tmp_path, "old.key")
    new = key_provider_from_ref(_kms_key(aws_env))
    storages = _storages(aws_env, lock_second=True)
    _backups(pg_server, storages, old, 2)
    before = _data_objects(aws_env, storages)

    to_ids = check_new_key(new, storages)
    assert to_ids["east"] != to_ids["west"] and ":kms:us-east-1:" in to_ids["east"]
    plan = plan_rotation(inventory(POLICY, storages, KeyRing(new, [old])), to_ids)
    assert len(plan.manifests) == 4 and len(plan.wal) == 2  # one streamer key per destination
    done = execute_rotation(POLICY, plan, storages, old, new)
    assert done.failed == {} and (done.manifests, done.wal_groups) == (4, 2)

    # bytes, ETags, versions and object-lock retention of every data object are unchanged
    after = _data_objects(aws_env, storages)
    assert after == before and any(v[3][0] for v in after.values())
    # the new key alone opens everything; the old one is needed by nothing
    _everything_opens(storages, new)
    left = still_under(inventory(POLICY, storages, new), key_ids(old, storages))
    assert left.manifests == [] and left.wal == [] and left.problems == []
    assert plan_rotation(inventory(POLICY, storages, new), to_ids).empty  # nothing left
    # and the old key file, alone, no longer opens the manifests
    scan = scan_catalog(POLICY, storages, old)
    assert not scan.backups
    assert scan.problems and all(isinstance(p.error, KeyProblem) for p in scan.problems)


def test_a_rotation_killed_anywhere_completes_on_rerun_and_everything_always_opens(
    aws_env: S3Server, pg_server: LocalPostgres, tmp_path: Path
) -> None:
    old, new = _file_keys(tmp_path, "old.key", "new.key")
    storages = _storages(aws_env)
    _backups(pg_server, storages, old, 6)
    before = _data_objects(aws_env, storages)
    either = KeyRing(new, [old])
    rng = random.Random(20261123)
    to_ids = check_new_key(new, storages)
    kills = 0
    while True:
        plan = plan_rotation(inventory(POLICY, storages, either), to_ids)
        if plan.empty:
            break
        budget = [rng.randint(0, 3)]
        dying: list[Storage] = [Dying(s, budget) for s in storages]
        try:
            execute_rotation(POLICY, plan, dying, old, new)
        except Killed:
            kills += 1
            # at every point, one of the two keys opens it (and, now and then, all data too)
            _everything_opens(storages, either, verify=kills % 5 == 0)
            continue
        assert kills < 200
    assert kills >= 20, kills
    _everything_opens(storages, new)
    assert _data_objects(aws_env, storages) == before
    left = still_under(inventory(POLICY, storages, new), key_ids(old, storages))
    assert left.manifests == [] and left.wal == [] and left.problems == []


def test_a_kms_key_missing_in_one_region_is_refused_before_any_write(
    aws_env: S3Server,
) -> None:
    # (moto's KMS does not refuse a disabled key, so that case is KMS's own error, translated
    # by the KMS provider's contract tests; here the key is absent in the second region.)
    storages = _storages(aws_env)
    only_east = f"kms:alias/drbot-east-only-{uuid.uuid4().hex[:6]}"
    east = aws_env.client("kms", REGIONS[0])
    key_id = east.create_key()["KeyMetadata"]["KeyId"]
    east.create_alias(AliasName=only_east.removeprefix("kms:"), TargetKeyId=key_id)
    with pytest.raises(KeyProblem, match="eu-west-1"):
        check_new_key(key_provider_from_ref(only_east), storages)
    for storage in storages:
        assert list(storage.list("")) == []  # nothing written anywhere


def test_a_second_rotation_reaches_wal_through_the_first_ones_entries(
    aws_env: S3Server, pg_server: LocalPostgres, tmp_path: Path
) -> None:
    # A -> B, A retired and destroyed; then B -> C: the WAL headers still hold A's wrapping,
    # which only B's entries open now.
    ka, kb, kc = _file_keys(tmp_path, "a.key", "b.key", "c.key")
    storages = _storages(aws_env)
    _backups(pg_server, storages, ka, 1)
    for old, new in ((KeyRing(kb, [ka]), kb), (KeyRing(kc, [kb]), kc)):
        to_ids = check_new_key(new, storages)
        plan = plan_rotation(inventory(POLICY, storages, old), to_ids)
        done = execute_rotation(POLICY, plan, storages, old, new)
        assert done.failed == {} and done.wal_groups == 2
        ka.path.unlink(missing_ok=True)  # A is destroyed after the first rotation
    _everything_opens(storages, kc)
    left = still_under(inventory(POLICY, storages, kc), key_ids(kb, storages))
    assert left.manifests == [] and left.wal == [] and left.problems == []


def test_a_forged_rewrap_entry_is_not_taken_for_a_rotated_key(
    aws_env: S3Server, pg_server: LocalPostgres, tmp_path: Path
) -> None:
    from drbot.ops.rewrap import write_entry
    from drbot.pipeline.stream import parse_header

    ka, kb = _file_keys(tmp_path, "a.key", "b.key")
    storages = _storages(aws_env)
    _backups(pg_server, storages, ka, 1)
    east = storages[0]
    header = parse_header(east.open(layout.wal_segment_key(POLICY, WAL[0]), length=4096))
    # an entry that opens with B, but to some other data key
    write_entry(east, header.wrapped, kb.generate(east.region)[1])
    inv = inventory(POLICY, storages, KeyRing(kb, [ka]))
    assert [g.rewrapped_to for g in inv.wal if g.destination == "east"] == [None]
    assert any("does not open that object's header" in p for p in inv.problems)
    left = still_under(inv, key_ids(ka, storages))
    assert {g.destination for g in left.wal} == {"east", "west"}  # A is still needed


def test_shredding_a_kms_key_schedules_its_deletion_in_every_region(aws_env: S3Server) -> None:
    from drbot.ops.shred import shred
    from drbot.pipeline.kms import KmsKeyProvider

    ref = _kms_key(aws_env)
    provider = key_provider_from_ref(ref)
    assert isinstance(provider, KmsKeyProvider)
    arns = {region: provider.key_id(region) for region in REGIONS}
    done = shred(provider, list(REGIONS), kms_days=7)
    assert set(done.key_ids) == set(arns.values()) and "7 days" in done.how
    for region, arn in arns.items():
        meta = aws_env.client("kms", region).describe_key(KeyId=arn)["KeyMetadata"]
        assert meta["KeyState"] == "PendingDeletion"
    again = shred(key_provider_from_ref(ref), list(REGIONS), kms_days=7)  # a rerun is a no-op
    assert set(again.key_ids) == set(arns.values())
