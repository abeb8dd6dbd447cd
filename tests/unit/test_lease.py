"""The per-policy lease against an in-memory destination and a fake clock: who holds it, when
a waiter may take over, and that a holder stops acting before anyone else can start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from drbot.clock import FakeClock
from drbot.errors import StorageUnavailable
from drbot.ops.lease import (
    FORMAT,
    UNKNOWN_HOLDER,
    Lease,
    LeaseRecord,
    LeaseState,
    pid_space,
    process_holder,
)
from drbot.storage import layout
from drbot.storage.memory import MemoryStorage

pytestmark = pytest.mark.unit

POLICY = "shop"
KEY = layout.lease_key(POLICY)
TTL = 30.0
TICK = TTL / 3
HOST = socket.gethostname()


def make_lease(storage: MemoryStorage, clock: FakeClock, name: str, ttl_s: float = TTL) -> Lease:
    return Lease(storage, POLICY, ttl_s=ttl_s, clock=clock, holder=f"{HOST}:{os.getpid()}:{name}")


def stored(storage: MemoryStorage) -> LeaseRecord:
    return LeaseRecord.from_json(storage.read_tagged(KEY)[0])


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    return proc.pid


def plant(storage: MemoryStorage, clock: FakeClock, **fields: object) -> None:
    """Store a lease record written by some other process."""
    record = LeaseRecord(
        policy=POLICY,
        holder="elsewhere:4242:feed",
        host="elsewhere",
        pid=4242,
        acquired_at=clock.now(),
        renewed_at=clock.now(),
        ttl_s=TTL,
    )
    storage.put_if(KEY, LeaseRecord(**{**record.__dict__, **fields}).to_json(), expected=None)


class FailingWrites(MemoryStorage):
    """put_if raises StorageUnavailable while `failing` (reads still work)."""

    failing = False

    def put_if(self, key: str, data: bytes, *, expected: str | None) -> str:
        if self.failing:
            raise StorageUnavailable(f"{self.url}: put_if {key} failed (simulated)")
        return super().put_if(key, data, expected=expected)


class Interleaving(MemoryStorage):
    """Runs `before_write` once, just before the next put_if checks its condition: another
    process's write landing between a lease's read and its write."""

    before_write: Callable[[], object] | None = None

    def put_if(self, key: str, data: bytes, *, expected: str | None) -> str:
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()
        return super().put_if(key, data, expected=expected)


# --- acquiring and renewing -------------------------------------------------------------------


def test_a_free_lease_is_acquired_and_recorded() -> None:
    """The first tick on a missing lease takes it and writes the documented record."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    lease = make_lease(storage, clock, "a")
    state = lease.tick()
    assert state == LeaseState(held=True, holder=lease.holder, since=clock.now(), changed=True)
    assert lease.valid()
    body = json.loads(storage.read_tagged(KEY)[0])
    assert body == {
        "format": FORMAT,
        "policy": POLICY,
        "holder": lease.holder,
        "host": HOST,
        "pid": os.getpid(),
        "acquired_at": clock.now().isoformat(),
        "renewed_at": clock.now().isoformat(),
        "ttl_s": TTL,
        "released": False,
        "pid_space": pid_space(),
    }


def test_renewal_keeps_acquired_at_and_moves_renewed_at() -> None:
    """Each renewal rewrites renewed_at only; the tick reports no change."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    lease = make_lease(storage, clock, "a")
    acquired = lease.tick().since
    clock.advance(TICK)
    state = lease.tick()
    assert state == LeaseState(held=True, holder=lease.holder, since=acquired, changed=False)
    record = stored(storage)
    assert record.acquired_at == acquired
    assert record.renewed_at == acquired + timedelta(seconds=TICK)


def test_a_second_lease_waits_and_sees_the_holder() -> None:
    """Another process's tick on a held lease does not take it and reports who holds it."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    since = a.tick().since
    with capture_logs() as logs:
        state = b.tick()
    assert state == LeaseState(held=False, holder=a.holder, since=since, changed=False)
    assert not b.valid()
    assert [e["event"] for e in logs] == ["lease.waiting"]
    assert logs[0]["log_level"] == "debug"
    assert logs[0]["policy"] == POLICY
    assert logs[0]["holder"] == b.holder


def test_valid_needs_a_write_within_two_thirds_of_the_ttl() -> None:
    """valid() is False before acquiring and from 2/3 of the TTL after the last write on,
    even if nobody ticks."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    lease = make_lease(storage, clock, "a")
    assert not lease.valid()
    lease.tick()
    clock.advance(TTL * 2 / 3 - 0.001)
    assert lease.valid()
    clock.advance(0.001)
    assert not lease.valid()


# --- taking over ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("late_s", "waited_s", "taken"),
    [
        pytest.param(0.0, TICK, False, id="one-tick"),
        pytest.param(0.0, TTL - 0.001, False, id="just-under-ttl"),
        pytest.param(0.0, TTL, True, id="a-whole-ttl"),
        pytest.param(0.0, 10 * TTL, True, id="long-after"),
        pytest.param(5 * TTL, TTL - 0.001, False, id="late-waiter-counts-from-its-first-read"),
        pytest.param(5 * TTL, TTL, True, id="late-waiter-after-a-ttl"),
    ],
)
def test_takeover_only_after_the_same_version_was_seen_for_a_ttl(
    late_s: float, waited_s: float, taken: bool
) -> None:
    """A waiter takes over a lease nobody renews once it has seen it unchanged for a TTL,
    counted from its own first read (never from times written in the record)."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    a.tick()  # and then a stops renewing
    clock.advance(late_s)
    assert not b.tick().held
    clock.advance(waited_s)
    state = b.tick()
    assert state.held is taken
    assert state.changed is taken
    assert b.valid() is taken
    if taken:
        assert not a.valid()  # the old holder had stopped acting before the takeover
        assert stored(storage).holder == b.holder


def test_a_renewing_holder_keeps_the_lease_forever() -> None:
    """As long as the holder renews every third of the TTL, a waiter never gets the lease."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    assert a.tick().held
    for _ in range(300):
        clock.advance(TICK)
        held = a.tick()
        waiting = b.tick()
        assert held == LeaseState(held=True, holder=a.holder, since=held.since, changed=False)
        assert waiting == LeaseState(held=False, holder=a.holder, since=held.since, changed=False)
        assert a.valid()
        assert not b.valid()
    assert stored(storage).holder == a.holder


def test_any_change_of_the_lease_restarts_the_wait() -> None:
    """One renewal seen by the waiter restarts its count: a full TTL from that sighting."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    a.tick()
    b.tick()  # first sight of the first version, t=0
    clock.advance(TICK)
    a.tick()  # one more renewal, then a stops
    clock.advance(0.5)
    b.tick()  # first sight of the second version, t=TICK+0.5
    clock.advance(TTL - TICK - 0.25)  # a whole TTL since the first version
    assert not b.tick().held
    clock.advance(TICK)  # TTL - 0.25 since the second version
    assert not b.tick().held
    clock.advance(0.25)
    assert b.tick().held


def test_a_holder_with_a_longer_ttl_is_waited_for_as_long() -> None:
    """A waiter waits the longer of its TTL and the one the holder wrote."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a = make_lease(storage, clock, "a", ttl_s=3 * TTL)
    b = make_lease(storage, clock, "b", ttl_s=TTL)
    a.tick()
    b.tick()
    clock.advance(3 * TTL - 0.001)
    assert not b.tick().held
    clock.advance(0.001)
    assert b.tick().held


def test_an_unreadable_lease_object_is_taken_over_after_a_ttl() -> None:
    """Bytes that are not a lease record count as held by someone unknown."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    storage.put(KEY, [b"not json"])
    lease = make_lease(storage, clock, "a")
    assert lease.tick() == LeaseState(held=False, holder=UNKNOWN_HOLDER, since=None, changed=False)
    clock.advance(TTL)
    assert lease.tick().held
    assert stored(storage).holder == lease.holder


@pytest.mark.parametrize(
    ("host", "pid", "space", "taken_at_once"),
    [
        pytest.param(HOST, "dead", "ours", True, id="this-host-dead-pid"),
        pytest.param(HOST, "alive", "ours", False, id="this-host-live-pid"),
        pytest.param(HOST, "own", "ours", False, id="this-host-own-pid"),
        pytest.param("another-host", "dead", "ours", False, id="other-host-dead-pid"),
        pytest.param("another-host", "alive", "ours", False, id="other-host-live-pid"),
        # Containers sharing a host name (compose's network_mode: service:db): a pid of
        # another pid namespace says nothing here, even if no such pid exists in ours.
        pytest.param(HOST, "dead", "other", False, id="same-name-other-pid-namespace"),
        pytest.param(HOST, "dead", "", False, id="record-without-pid-space"),
    ],
)
def test_a_crashed_holder_on_this_host_is_replaced_at_once(
    host: str, pid: str, space: str, taken_at_once: bool
) -> None:
    """A record naming a process of this host (and pid namespace) that no longer exists is
    taken at the first tick; one naming a live process, or any process elsewhere, is waited
    for."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    pids = {"dead": dead_pid(), "alive": os.getppid(), "own": os.getpid()}
    spaces = {"ours": pid_space(), "other": "another-boot/pid:[1]", "": ""}
    plant(
        storage,
        clock,
        host=host,
        pid=pids[pid],
        holder=f"{host}:{pids[pid]}:old",
        pid_space=spaces[space],
    )
    lease = make_lease(storage, clock, "new")
    state = lease.tick()
    assert state.held is taken_at_once
    assert state.holder == (lease.holder if taken_at_once else f"{host}:{pids[pid]}:old")
    clock.advance(TTL)
    assert lease.tick().held


def test_release_hands_over_at_the_next_tick() -> None:
    """A released lease is taken by a waiter's next tick, without waiting for the TTL."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    a.tick()
    assert not b.tick().held
    with capture_logs() as logs:
        a.release()
    assert [e["event"] for e in logs] == ["lease.released"]
    assert not a.valid()
    assert stored(storage).released
    clock.advance(0.1)
    assert b.tick() == LeaseState(held=True, holder=b.holder, since=clock.now(), changed=True)
    assert not stored(storage).released
    assert a.tick() == LeaseState(held=False, holder=b.holder, since=clock.now(), changed=True)


def test_release_by_a_non_holder_changes_nothing_and_never_raises() -> None:
    """release() by a process that does not hold the lease leaves the record alone; with the
    storage unreachable it only logs."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    a.tick()
    before = storage.read_tagged(KEY)
    b.release()
    assert storage.read_tagged(KEY) == before
    storage.unreachable = True
    with capture_logs() as logs:
        a.release()
    assert [e["event"] for e in logs] == ["lease.release_failed"]
    assert not a.valid()
    make_lease(MemoryStorage("empty"), clock, "c").release()  # no lease object at all


# --- losing it --------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["writes", "everything"])
def test_unreachable_storage_keeps_the_lease_only_while_valid(outage: str) -> None:
    """While storage fails, the holder keeps the lease until 2/3 of the TTL after its last
    write, then reports it lost; once storage is back and nobody took it, it is taken again."""
    storage, clock = FailingWrites("primary"), FakeClock()
    lease = make_lease(storage, clock, "a")
    lease.tick()
    if outage == "writes":
        storage.failing = True
    else:
        storage.unreachable = True
    clock.advance(TICK)
    with capture_logs() as logs:
        state = lease.tick()
    assert state.held
    assert not state.changed
    assert lease.valid()
    assert [(e["event"], e["log_level"]) for e in logs] == [("lease.renew_failed", "warning")]
    clock.advance(TICK)
    assert not lease.valid()  # 2/3 of the TTL: no longer acting, whether or not it ticks
    with capture_logs() as logs:
        state = lease.tick()
    assert not state.held
    assert state.changed
    assert "lease.lost" in [e["event"] for e in logs]
    clock.advance(TICK)
    state = lease.tick()
    assert not state.held
    assert not state.changed
    storage.failing = storage.unreachable = False
    state = lease.tick()
    assert state.held
    assert state.changed
    assert lease.valid()


def test_a_late_renewal_that_finds_the_lease_still_ours_keeps_it() -> None:
    """A holder whose ticks came too late stops being valid, but if nobody took the lease
    meanwhile its next tick renews it: held throughout, valid again, nothing lost."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    lease = make_lease(storage, clock, "a")
    since = lease.tick().since
    clock.advance(TTL)
    assert not lease.valid()
    with capture_logs() as logs:
        state = lease.tick()
    assert state == LeaseState(held=True, holder=lease.holder, since=since, changed=False)
    assert lease.valid()
    assert [e["event"] for e in logs] == []


def test_validity_counts_from_the_start_of_the_write() -> None:
    """A renewal whose request took longer than 2/3 of the TTL leaves the holder invalid and
    the lease reported lost: validity counts from when the write began, not when it ended."""
    storage, clock = Interleaving("primary"), FakeClock()
    lease = make_lease(storage, clock, "a")
    lease.tick()
    clock.advance(TICK)
    storage.before_write = lambda: clock.advance(TTL * 2 / 3)  # a very slow request
    state = lease.tick()
    assert not state.held
    assert state.changed
    assert not lease.valid()


def test_a_renewal_after_a_takeover_is_refused() -> None:
    """A holder that stalled past its TTL finds the lease taken and reports it lost."""
    storage, clock = MemoryStorage("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    a.tick()
    b.tick()
    clock.advance(TTL)
    assert b.tick().held
    with capture_logs() as logs:
        state = a.tick()
    assert state == LeaseState(held=False, holder=b.holder, since=clock.now(), changed=True)
    assert not a.valid()
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == ["lease.lost"]
    assert stored(storage).holder == b.holder


def test_a_renewal_racing_a_takeover_loses_on_the_condition() -> None:
    """If the lease changes between the holder's read and its write, the conditional write
    is refused (PreconditionFailed) and the holder reports the lease lost."""
    storage, clock = Interleaving("primary"), FakeClock()
    a = make_lease(storage, clock, "a")
    a.tick()
    clock.advance(TICK)

    def other_takes_over() -> None:
        _data, tag = storage.read_tagged(KEY)
        taken = LeaseRecord(POLICY, "thief", "elsewhere", 7, clock.now(), clock.now(), TTL)
        storage.put_if(KEY, taken.to_json(), expected=tag)

    storage.before_write = other_takes_over
    state = a.tick()
    assert not state.held
    assert state.changed
    assert not a.valid()
    assert stored(storage).holder == "thief"


def test_racing_acquirers_only_one_wins() -> None:
    """Two processes finding the lease free at once: the slower create is refused."""
    storage, clock = Interleaving("primary"), FakeClock()
    a, b = make_lease(storage, clock, "a"), make_lease(storage, clock, "b")
    storage.before_write = b.tick  # b's whole tick lands between a's read and a's write
    state = a.tick()
    assert not state.held
    assert not a.valid()
    assert b.valid()
    assert stored(storage).holder == b.holder
    assert a.tick().holder == b.holder


# --- the record -------------------------------------------------------------------------------


def test_record_round_trips() -> None:
    """to_json / from_json keep every field; times come back timezone-aware UTC."""
    at = datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=UTC)
    record = LeaseRecord(POLICY, "h:1:ab", "h", 1, at, at + timedelta(seconds=5), 60.0, True)
    assert LeaseRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff",
        b"[]",
        b'{"format": "drbot-lease/2"}',
        b'{"format": "drbot-lease/1"}',
    ],
)
def test_malformed_records_are_refused(body: bytes) -> None:
    """Anything but a complete drbot-lease/1 record is a ValueError."""
    with pytest.raises(ValueError, match="lease"):
        LeaseRecord.from_json(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pid", "12"),
        ("pid", True),
        ("ttl_s", "60"),
        ("released", 0),
        ("holder", None),
        ("acquired_at", "2026-01-01T00:00:00"),
        ("renewed_at", "yesterday"),
    ],
)
def test_records_with_a_bad_field_are_refused(field: str, value: object) -> None:
    """Each field must have its documented type; times must carry a time zone."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    body = json.loads(LeaseRecord(POLICY, "h:1:ab", "h", 1, at, at, 60.0).to_json())
    body[field] = value
    with pytest.raises(ValueError, match="lease record field"):
        LeaseRecord.from_json(json.dumps(body).encode())


def test_holder_ids_are_per_process() -> None:
    """The default holder is host:pid:random, the same for every Lease of this process."""
    holder = process_holder()
    host, pid, nonce = holder.rsplit(":", 2)
    assert (host, pid) == (HOST, str(os.getpid()))
    assert len(nonce) >= 8
    lease = Lease(MemoryStorage("m"), POLICY, ttl_s=TTL, clock=FakeClock())
    assert lease.holder == holder == process_holder()


def test_lease_key_and_ttl_checks() -> None:
    """The lease lives at <policy>/lease.json; a TTL must be positive."""
    assert layout.lease_key("shop") == "shop/lease.json"
    with pytest.raises(ValueError, match="ttl"):
        Lease(MemoryStorage("m"), POLICY, ttl_s=0, clock=FakeClock())


def test_an_unreachable_lease_is_reported_not_silent() -> None:
    """A waiter that cannot read the lease says why (`last_error`), and forgets it once the
    storage answers again."""
    storage = FailingWrites("primary")
    lease = Lease(storage, "shop", ttl_s=30, clock=FakeClock())
    storage.failing = True
    assert not lease.tick().held
    assert lease.last_error is not None and "simulated" in lease.last_error
    storage.failing = False
    assert lease.tick().held
    assert lease.last_error is None
