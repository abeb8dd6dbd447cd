"""Two daemons' leases on one policy in a real S3 API (moto's server), with the real clock: they
never both act, the waiter takes over soon after the holder stops, and renewals leave no pile
of old versions in the object-locked (so versioned) bucket."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from drbot.clock import SystemClock
from drbot.ops.lease import Lease, LeaseRecord
from drbot.storage import layout
from drbot.storage.base import ObjectLock
from drbot.storage.s3 import S3Storage
from tests.fixtures.s3 import REGIONS, S3Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

POLICY = "shop"
TTL = 3.0
TICK = TTL / 3
HOLDER_RUNS_S = 3.5
"""How long the first daemon renews before it stops (as if frozen or cut off)."""
SLACK_S = 0.5
"""Scheduling and request time allowed on top of the rule's bound."""
SAMPLE_EVERY_S = 0.005


def _storage(server: S3Server, bucket: str, region: str, prefix: str, name: str) -> S3Storage:
    """The policy's primary destination as one daemon sees it (its own client)."""
    return S3Storage(
        name,
        bucket,
        prefix,
        region,
        endpoint_url=server.endpoint_url,
        object_lock=ObjectLock(mode="governance", days=1),
        max_attempts=2,
        connect_timeout_s=1,
        read_timeout_s=2,
    )


def _versions(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    listing = s3.list_object_versions(Bucket=bucket, Prefix=key)
    entries: list[dict[str, Any]] = [
        *listing.get("Versions", []),
        *listing.get("DeleteMarkers", []),
    ]
    return [entry for entry in entries if entry["Key"] == key]


@pytest.mark.parametrize("region", REGIONS[:1])  # the protocol is the same in every region
def test_two_daemons_never_act_at_once_and_the_waiter_takes_over(
    aws_env: S3Server, region: str
) -> None:
    """Daemon A holds the lease and renews every TTL/3, then stops; daemon B, ticking all the
    while, takes over within TTL + one tick of A's stop, and at no sampled moment are both
    valid. The lease object keeps a single version throughout."""
    bucket = aws_env.make_bucket(region, object_lock=True)
    prefix = "site/db" if region != "us-east-1" else ""
    full_key = f"{prefix}/{layout.lease_key(POLICY)}".lstrip("/")
    s3 = aws_env.client("s3", region)
    clock = SystemClock()
    a = Lease(
        _storage(aws_env, bucket, region, prefix, "a"),
        POLICY,
        ttl_s=TTL,
        clock=clock,
        holder="daemon-a",
    )
    b = Lease(
        _storage(aws_env, bucket, region, prefix, "b"),
        POLICY,
        ttl_s=TTL,
        clock=clock,
        holder="daemon-b",
    )
    assert a.tick().held

    finished = threading.Event()
    a_stopped_at: list[float] = []
    b_took_at: list[float] = []
    both_valid: list[float] = []
    most_versions: list[int] = [1]
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            end = time.monotonic() + HOLDER_RUNS_S
            while time.monotonic() < end:
                time.sleep(TICK)
                assert a.tick().held, "A lost the lease while renewing on time"
            a_stopped_at.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    def run_b() -> None:
        try:
            while not finished.is_set():
                state = b.tick()
                if state.held:
                    b_took_at.append(time.monotonic())
                    return
                # A hair over TTL/3, so three waits always span a whole TTL.
                time.sleep(TICK + 0.02)
        except BaseException as exc:
            errors.append(exc)

    def sample() -> None:
        try:
            while not finished.is_set():
                if a.valid() and b.valid():
                    both_valid.append(time.monotonic())
                time.sleep(SAMPLE_EVERY_S)
        except BaseException as exc:
            errors.append(exc)

    def count_versions() -> None:
        try:
            while not finished.is_set():
                most_versions.append(len(_versions(s3, bucket, full_key)))
                time.sleep(TICK / 2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (run_a, run_b, sample, count_versions)]
    for thread in threads:
        thread.start()
    threads[1].join(timeout=HOLDER_RUNS_S + 2 * TTL + 5)
    time.sleep(0.3)  # keep sampling for a moment after the takeover
    finished.set()
    for thread in threads:
        thread.join(timeout=10)

    assert errors == []
    assert a_stopped_at, "A did not finish its renewals"
    assert b_took_at, "B never took over"
    assert both_valid == []
    took_after_s = b_took_at[0] - a_stopped_at[0]
    assert 0 < took_after_s <= TTL + TICK + SLACK_S
    assert not a.valid()
    assert b.valid()
    assert not a.tick().held
    record = LeaseRecord.from_json(s3.get_object(Bucket=bucket, Key=full_key)["Body"].read())
    assert record.holder == "daemon-b"
    assert max(most_versions) <= 2  # one, plus the replaced one for a moment before its delete
    assert [v["IsLatest"] for v in _versions(s3, bucket, full_key)] == [True]
    assert s3.head_object(Bucket=bucket, Key=full_key).get("ObjectLockMode") is None


def test_a_released_lease_is_taken_at_the_next_tick(aws_env: S3Server) -> None:
    """On a clean shutdown the holder releases; the waiter's next tick takes over at once."""
    region = REGIONS[1]
    bucket = aws_env.make_bucket(region, object_lock=True)
    clock = SystemClock()
    a = Lease(_storage(aws_env, bucket, region, "", "a"), POLICY, ttl_s=60, clock=clock)
    b = Lease(
        _storage(aws_env, bucket, region, "", "b"),
        POLICY,
        ttl_s=60,
        clock=clock,
        holder="daemon-b",
    )
    assert a.tick().held
    assert not b.tick().held
    a.release()
    assert not a.valid()
    state = b.tick()
    assert state.held
    assert state.changed
    s3 = aws_env.client("s3", region)
    key = layout.lease_key(POLICY)
    assert [v["IsLatest"] for v in _versions(s3, bucket, key)] == [True]
