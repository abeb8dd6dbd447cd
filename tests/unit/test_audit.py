"""The audit trail: building, verifying, and detecting every kind of tampering.

Property tests build one base trail per module and tamper with copies of its bytes, so each
example only re-runs the (pure) verifier.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import tempfile
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drbot.audit.event import (
    GENESIS,
    AuditEvent,
    EventFormatError,
    canonical,
    parse_line,
    seal,
)
from drbot.audit.trail import (
    KEY_NAME,
    PUBLIC_NAME,
    TRAIL_NAME,
    FileAuditTrail,
    load_public_key,
    load_signing_key,
    public_key_text,
)
from drbot.audit.verify import TrailReport, verify_trail
from drbot.clock import FakeClock
from drbot.errors import DrbotError, IntegrityFailure

pytestmark = pytest.mark.unit

N = 12
START = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def _props(examples: int) -> settings:
    """Fast, deterministic-enough property settings; no example database in the repository."""
    return settings(
        deadline=None,
        max_examples=examples,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


_ACTIONS = [
    "backup.completed",
    "backup.failed",
    "restore.started",
    "drill.passed",
    "policy.changed",
    "key.rotated",
]
_OUTCOMES = ["ok", "failed", "partial", "refused", "info"]
_POLICIES = [None, "shop", "crm-ünïcødé", "日本語ポリシー"]


def _varied(i: int) -> dict[str, Any]:
    """Keyword arguments for the i-th event of a trail: actions, policies, unicode, nesting."""
    return {
        "policy": _POLICIES[i % len(_POLICIES)],
        "subject": {"backup": f"b-{i:04d}", "destination": ["s3", "local"][i % 2]},
        "outcome": _OUTCOMES[i % len(_OUTCOMES)],
        "details": {
            "bytes": i * 1_000_003,
            "ratio": i / 7,
            "note": f'événement {i} — ✓ 🚀 "quoted" back\\slash\ttab',
            "nested": {"list": [i, None, True, "x"], "empty": {}},
        },
    }


def _make_trail(
    directory: Path, n: int, *, key_path: Path | None = None, actor: str = "alice@host"
) -> FileAuditTrail:
    clock = FakeClock(START)
    trail = FileAuditTrail(directory, clock, key_path=key_path, actor=actor)
    for i in range(n):
        trail.record(_ACTIONS[i % len(_ACTIONS)], **_varied(i))
        clock.advance(1.5)
    return trail


def _public(directory: Path) -> Ed25519PublicKey:
    return load_signing_key(directory / KEY_NAME, create=False).public_key()


def _split(data: bytes) -> list[bytes]:
    """The whole lines of a trail, without their newlines (data must end with one)."""
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def _join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


@dataclass(frozen=True, repr=False)  # keep Hypothesis reports short
class Base:
    directory: Path
    data: bytes
    lines: list[bytes]
    events: list[AuditEvent]
    public: Ed25519PublicKey
    key_path: Path
    other_lines: list[bytes]  # another trail signed with the same key


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    directory = tmp_path_factory.mktemp("audit")
    _make_trail(directory, N)
    other = tmp_path_factory.mktemp("other-trail")
    _make_trail(other, N, key_path=directory / KEY_NAME, actor="carol@elsewhere")
    data = (directory / TRAIL_NAME).read_bytes()
    lines = _split(data)
    return Base(
        directory=directory,
        data=data,
        lines=lines,
        events=[parse_line(line) for line in lines],
        public=_public(directory),
        key_path=directory / KEY_NAME,
        other_lines=_split((other / TRAIL_NAME).read_bytes()),
    )


def _first(report: TrailReport) -> tuple[int, str]:
    assert not report.ok, "tampering went undetected"
    problem = report.problems[0]
    return problem.line, problem.kind


# --- building and verifying a clean trail ------------------------------------------------------


def test_fresh_trail_verifies(tmp_path: Path) -> None:
    """N varied events (unicode, nesting, None policy) verify; head and count match; links hold."""
    n = 30
    _make_trail(tmp_path, n)
    data = (tmp_path / TRAIL_NAME).read_bytes()
    report = verify_trail(data, _public(tmp_path))
    assert report.ok, report.problems
    assert report.events == n
    assert report.head is not None
    assert report.head.seq == n
    assert report.torn_tail is None
    events = [parse_line(line) for line in _split(data)]
    assert [e.seq for e in events] == list(range(1, n + 1))
    assert events[0].prev == GENESIS
    assert all(b.prev == a.hash for a, b in itertools.pairwise(events))
    assert events[3].details["note"].startswith("événement 3 — ✓ 🚀")
    assert events[3].policy == "日本語ポリシー"
    assert events[0].policy is None
    assert events[1].time == "2026-03-04T05:06:09.390123Z"
    assert "日本語".encode() in data, "non-ASCII is kept as UTF-8, not escaped"
    # the same check through the published public key
    assert verify_trail(data, load_public_key(tmp_path / PUBLIC_NAME)).ok


def test_record_returns_the_sealed_event_as_written(tmp_path: Path) -> None:
    trail = FileAuditTrail(tmp_path, FakeClock(START), actor="bob@box")
    event = trail.record("backup.completed", policy="shop", subject={"backup": "b1"})
    line = (tmp_path / TRAIL_NAME).read_bytes()
    assert line == event.to_line()
    assert event.seq == 1
    assert event.actor == "bob@box"
    assert event.hash == event.computed_hash()
    assert event.time == "2026-03-04T05:06:07.890123Z"


def test_empty_trail_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    report = verify_trail(b"", key.public_key())
    assert report.ok
    assert report.events == 0
    assert report.head is None
    assert report.torn_tail is None


def test_public_key_file_and_key_mode(tmp_path: Path) -> None:
    """audit.pub is written next to the trail, matches the signing key; the key is 0600."""
    _make_trail(tmp_path, 1)
    key = load_signing_key(tmp_path / KEY_NAME, create=False)
    pub_text = (tmp_path / PUBLIC_NAME).read_text()
    assert pub_text == public_key_text(key.public_key()) + "\n"
    assert len(pub_text.strip()) == 64
    loaded = load_public_key(tmp_path / PUBLIC_NAME)
    assert public_key_text(loaded) == public_key_text(key.public_key())
    assert stat.S_IMODE((tmp_path / KEY_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / TRAIL_NAME).stat().st_mode) & 0o077 == 0


def test_second_instance_reuses_the_key(tmp_path: Path) -> None:
    _make_trail(tmp_path, 2)
    key_before = (tmp_path / KEY_NAME).read_bytes()
    FileAuditTrail(tmp_path, FakeClock(START)).record("again")
    assert (tmp_path / KEY_NAME).read_bytes() == key_before
    report = verify_trail((tmp_path / TRAIL_NAME).read_bytes(), _public(tmp_path))
    assert report.ok
    assert report.events == 3


def test_wrong_public_key_fails_every_event(base: Base) -> None:
    report = verify_trail(base.data, Ed25519PrivateKey.generate().public_key())
    assert _first(report) == (1, "bad-signature")
    assert [p.kind for p in report.problems] == ["bad-signature"] * N
    assert [p.line for p in report.problems] == list(range(1, N + 1))


# --- tampering, property-based ------------------------------------------------------------------

_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "action": st.text(min_size=1, max_size=20),
    "outcome": st.sampled_from([*_OUTCOMES, "forged", ""]),
    "details": st.dictionaries(
        st.text(max_size=6), st.integers() | st.text(max_size=6) | st.none(), max_size=3
    ),
    "time": st.datetimes(timezones=st.just(UTC)).map(lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
    "policy": st.none() | st.text(max_size=10),
    "subject": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2),
    "actor": st.text(max_size=12),
    "host": st.text(max_size=12),
    "seq": st.integers(min_value=-5, max_value=10_000),
    "prev": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
}


@_props(40)
@given(data=st.data())
def test_editing_a_field_is_detected(base: Base, data: st.DataObject) -> None:
    """Changing any one field of one event (hash and signature kept) is `edited` at that line."""
    index = data.draw(st.integers(0, N - 1), label="index")
    name = data.draw(st.sampled_from(sorted(_FIELD_VALUES)), label="field")
    fields = json.loads(base.lines[index])
    value = data.draw(_FIELD_VALUES[name], label="value")
    assume(value != fields[name])
    fields[name] = value
    lines = list(base.lines)
    lines[index] = canonical(fields)
    assert _first(verify_trail(_join(lines), base.public)) == (index + 1, "edited")


@_props(25)
@given(data=st.data())
def test_editing_and_rehashing_is_a_bad_signature(base: Base, data: st.DataObject) -> None:
    """Recomputing the hash after an edit cannot produce the signature: `bad-signature`."""
    index = data.draw(st.integers(0, N - 1), label="index")
    name = data.draw(
        st.sampled_from(["action", "outcome", "details", "time", "policy", "subject"]),
        label="field",
    )
    value = data.draw(_FIELD_VALUES[name], label="value")
    original = base.events[index]
    assume(value != getattr(original, name))
    edited = replace(original, **{name: value})
    edited = replace(edited, hash=edited.computed_hash())
    lines = list(base.lines)
    lines[index] = edited.to_line().rstrip(b"\n")
    report = verify_trail(_join(lines), base.public)
    assert _first(report) == (index + 1, "bad-signature")
    # the chain after it breaks too, since the next event's prev names the old hash
    if index + 1 < N:
        assert (index + 2, "chain-broken") in [(p.line, p.kind) for p in report.problems]


@_props(15)
@given(index=st.integers(0, N - 2))
def test_deleting_an_event_is_detected(base: Base, index: int) -> None:
    """Removing any event but the last is `missing` at the line where the gap shows."""
    lines = base.lines[:index] + base.lines[index + 1 :]
    report = verify_trail(_join(lines), base.public)
    assert _first(report) == (index + 1, "missing")
    assert f"events {index + 1}..{index + 1} are missing" in report.problems[0].message


@_props(20)
@given(pair=st.lists(st.integers(0, N - 1), min_size=2, max_size=2, unique=True))
def test_swapping_two_events_is_detected(base: Base, pair: list[int]) -> None:
    """A swap is caught at the first swapped line, and reported as reordered."""
    i, j = sorted(pair)
    lines = list(base.lines)
    lines[i], lines[j] = lines[j], lines[i]
    report = verify_trail(_join(lines), base.public)
    line, kind = _first(report)
    assert line == i + 1
    assert kind in {"missing", "reordered", "chain-broken"}
    assert "reordered" in {p.kind for p in report.problems}


def test_swap_is_first_reported_as_reordered_not_missing(base: Base) -> None:
    lines = list(base.lines)
    lines[3], lines[4] = lines[4], lines[3]
    report = verify_trail(_join(lines), base.public)
    assert _first(report)[1] in {"reordered", "chain-broken"}


@_props(15)
@given(data=st.data())
def test_duplicating_an_event_is_reordered(base: Base, data: st.DataObject) -> None:
    """Replaying an event later in the trail is `reordered` where the copy stands."""
    index = data.draw(st.integers(0, N - 1), label="index")
    where = data.draw(st.integers(index + 1, N), label="where")
    lines = list(base.lines)
    lines.insert(where, base.lines[index])
    assert _first(verify_trail(_join(lines), base.public)) == (where + 1, "reordered")


_FORGER = Ed25519PrivateKey.generate()


@_props(15)
@given(where=st.integers(0, N), action=st.sampled_from(_ACTIONS))
def test_inserting_a_forged_event_is_a_bad_signature(base: Base, where: int, action: str) -> None:
    """A well-formed event with the right seq and prev, sealed by another key, is caught."""
    prev = base.events[where - 1].hash if where else GENESIS
    forged = seal(
        AuditEvent(
            seq=where + 1,
            time="2026-03-04T05:06:07.000000Z",
            actor="mallory@host",
            host="host",
            action=action,
            policy="shop",
            prev=prev,
        ),
        _FORGER,
    )
    lines = list(base.lines)
    lines.insert(where, forged.to_line().rstrip(b"\n"))
    report = verify_trail(_join(lines), base.public)
    assert _first(report) == (where + 1, "bad-signature")
    if where < N:  # the genuine event after it now repeats a sequence number
        assert (where + 2, "reordered") in [(p.line, p.kind) for p in report.problems]


def _not_an_event(raw: bytes) -> bool:
    try:
        parse_line(raw)
    except EventFormatError:
        return True
    return False


_GARBAGE = (
    st.binary(max_size=60)
    | st.text(max_size=60).map(str.encode)
    | st.just(b"{}")
    | st.just(b"null")
    | st.just(b'{"seq":1}')
).filter(lambda raw: b"\n" not in raw and _not_an_event(raw))


@_props(25)
@given(where=st.integers(0, N), garbage=_GARBAGE, overwrite=st.booleans())
def test_a_garbage_line_is_damaged(base: Base, where: int, garbage: bytes, overwrite: bool) -> None:
    """A line that is not an event, inserted or overwriting one, is `damaged` at that line."""
    lines = list(base.lines)
    if overwrite and where < N:
        lines[where] = garbage
    else:
        lines.insert(where, garbage)
    assert _first(verify_trail(_join(lines), base.public)) == (where + 1, "damaged")


def test_a_damaged_event_field_type_is_damaged(base: Base) -> None:
    fields = json.loads(base.lines[5])
    fields["seq"] = str(fields["seq"])
    lines = list(base.lines)
    lines[5] = canonical(fields)
    assert _first(verify_trail(_join(lines), base.public)) == (6, "damaged")


@_props(15)
@given(index=st.integers(0, N - 1))
def test_splicing_in_a_validly_signed_event_from_another_trail(base: Base, index: int) -> None:
    """An event from another trail under the same key is detected by the chain."""
    lines = list(base.lines)
    lines[index] = base.other_lines[index]
    report = verify_trail(_join(lines), base.public)
    # event 1 of the other trail also starts at GENESIS, so that swap shows at line 2
    expected_line = index + 1 if index else 2
    assert _first(report) == (expected_line, "chain-broken")


@_props(10)
@given(keep=st.integers(0, N))
def test_cutting_whole_events_off_the_end_is_not_detected(base: Base, keep: int) -> None:
    """KNOWN LIMIT (documented in verify.py): a whole-line prefix of a trail verifies.

    Only anchors stored elsewhere can show that the tail was cut.
    """
    report = verify_trail(_join(base.lines[:keep]), base.public)
    assert report.ok
    assert report.events == keep
    assert report.torn_tail is None


# --- torn tails ---------------------------------------------------------------------------------


def _torn_copy(base: Base, directory: Path, keep: int) -> bytes:
    """Write base's trail cut after `keep` bytes of its last line into `directory`."""
    prefix = _join(base.lines[:-1])
    data = prefix + base.lines[-1][:keep]
    (directory / TRAIL_NAME).write_bytes(data)
    return data


@_props(20)
@given(data=st.data())
def test_torn_tail_verifies_and_next_append_records_it(base: Base, data: st.DataObject) -> None:
    """A crash inside the last line is not a failure; the next append explains it."""
    keep = data.draw(st.integers(1, len(base.lines[-1]) - 1), label="keep")
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        torn = _torn_copy(base, directory, keep)
        report = verify_trail(torn, base.public)
        assert report.ok, report.problems
        assert report.torn_tail is not None
        assert f"line {N} is incomplete ({keep} bytes)" in report.torn_tail
        assert report.events == N - 1

        trail = FileAuditTrail(directory, FakeClock(START), key_path=base.key_path)
        new = trail.record("backup.completed", policy="shop")
        after = (directory / TRAIL_NAME).read_bytes()
        assert after.startswith(torn + b"\n")
        report = verify_trail(after, base.public)
        assert report.ok, report.problems
        assert report.torn_tail is None
        assert report.events == N + 1  # N-1 whole, the torn_line marker, the new one
        assert report.head == new
        lines = _split(after)
        marker = parse_line(lines[-2])
        assert marker.action == "audit.torn_line"
        assert marker.seq == N
        assert marker.subject == {"offset": len(_join(base.lines[:-1]))}
        assert marker.details["bytes"] == keep
        assert new.seq == N + 1

        # the same torn line without its marker is damage
        unexplained = lines[:-2] + lines[-1:]
        assert _first(verify_trail(_join(unexplained), base.public)) == (N, "damaged")
        # and a marker whose hash does not match the torn bytes explains nothing
        changed = list(lines)
        changed[N - 1] = changed[N - 1][:-1] + bytes([changed[N - 1][-1] ^ 0x01])
        assert _first(verify_trail(_join(changed), base.public)) == (N, "damaged")


def test_garbage_inserted_by_hand_is_damaged_even_if_it_looks_torn(base: Base) -> None:
    """A prefix of an event put in the middle by hand, with no torn_line event, is damage."""
    lines = list(base.lines)
    lines.insert(4, base.lines[4][:50])
    assert _first(verify_trail(_join(lines), base.public)) == (5, "damaged")


def test_torn_first_append_is_recorded(tmp_path: Path) -> None:
    (tmp_path / TRAIL_NAME).write_bytes(b'{"v":1,"seq":1,"ti')
    trail = FileAuditTrail(tmp_path, FakeClock(START))
    assert verify_trail(b'{"v":1,"seq":1,"ti', Ed25519PrivateKey.generate().public_key()).ok
    trail.record("first")
    data = (tmp_path / TRAIL_NAME).read_bytes()
    report = verify_trail(data, _public(tmp_path))
    assert report.ok, report.problems
    assert report.events == 2
    assert parse_line(_split(data)[1]).action == "audit.torn_line"


def test_torn_tail_missing_only_the_newline(base: Base, tmp_path: Path) -> None:
    keep = len(base.lines[-1])  # every byte but the final newline
    torn = _torn_copy(base, tmp_path, keep)
    assert verify_trail(torn, base.public).ok
    FileAuditTrail(tmp_path, FakeClock(START), key_path=base.key_path).record("next")
    report = verify_trail((tmp_path / TRAIL_NAME).read_bytes(), base.public)
    assert report.ok, report.problems


def test_record_refuses_to_extend_a_damaged_last_event(base: Base, tmp_path: Path) -> None:
    """IntegrityFailure, and not a byte written, when the last whole line is not an event."""
    for damaged in (
        _join([*base.lines, b"garbage"]),
        _join([*base.lines[:-1], base.lines[-1][:-3]]),
    ):
        (tmp_path / TRAIL_NAME).write_bytes(damaged)
        trail = FileAuditTrail(tmp_path, FakeClock(START), key_path=base.key_path)
        with pytest.raises(IntegrityFailure, match="last whole event is damaged"):
            trail.record("backup.completed")
        assert (tmp_path / TRAIL_NAME).read_bytes() == damaged


def test_record_after_an_event_larger_than_the_tail_probe(tmp_path: Path) -> None:
    trail = FileAuditTrail(tmp_path, FakeClock(START))
    trail.record("backup.failed", details={"stderr": "x" * (1 << 20)})
    assert verify_trail((tmp_path / TRAIL_NAME).read_bytes(), _public(tmp_path)).ok
    trail.record("backup.completed")
    report = verify_trail((tmp_path / TRAIL_NAME).read_bytes(), _public(tmp_path))
    assert report.ok
    assert report.events == 2


def test_record_with_undecodable_path_in_details(tmp_path: Path) -> None:
    trail = FileAuditTrail(tmp_path, FakeClock(START))
    try:
        trail.record("restore.completed", details={"path": os.fsdecode(b"/srv/caf\xe9")})
    except DrbotError:
        return
    report = verify_trail((tmp_path / TRAIL_NAME).read_bytes(), _public(tmp_path))
    assert report.ok


# --- concurrency --------------------------------------------------------------------------------


def test_concurrent_appends_from_separate_instances(tmp_path: Path) -> None:
    """4 threads x 25 records, each thread with its own FileAuditTrail: 100 events, seq 1..100."""
    load_signing_key(tmp_path / KEY_NAME)  # the key exists before the writers start
    threads, per_thread = 4, 25
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        clock = FakeClock(START + timedelta(hours=number))
        trail = FileAuditTrail(tmp_path, clock, actor=f"writer{number}@host")
        barrier.wait()
        try:
            for i in range(per_thread):
                trail.record("backup.completed", subject={"writer": number, "i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    data = (tmp_path / TRAIL_NAME).read_bytes()
    events = [parse_line(line) for line in _split(data)]
    assert [e.seq for e in events] == list(range(1, threads * per_thread + 1))
    seen = {(e.subject["writer"], e.subject["i"]) for e in events}
    assert len(seen) == threads * per_thread
    report = verify_trail(data, _public(tmp_path))
    assert report.ok, report.problems
    assert report.events == threads * per_thread


def _first_use_errors(directory: Path, threads: int) -> list[BaseException]:
    """Start `threads` writers on a fresh directory at once; what they raised."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer() -> None:
        trail = FileAuditTrail(directory, FakeClock(START))
        barrier.wait()
        try:
            trail.record("daemon.started")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=writer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors


def test_concurrent_first_use_of_a_fresh_directory(tmp_path: Path) -> None:
    for attempt in range(5):
        errors = _first_use_errors(tmp_path / str(attempt), 4)
        assert not errors, errors


def test_a_repair_cut_short_by_a_second_crash_is_recorded_not_wedged(
    base: Base, tmp_path: Path
) -> None:
    """Crash, then a crash while the next append repairs it: both fragments are recorded by
    audit.torn_line events in order, the chain continues, and the trail verifies."""
    torn = _join(base.lines) + b'{"v":1,"seq":13'  # first crash
    cut_repair = torn + b'\n{"v":1,"act'  # the repair's own write, cut short
    (tmp_path / TRAIL_NAME).write_bytes(cut_repair)
    trail = FileAuditTrail(tmp_path, FakeClock(START), key_path=base.key_path)
    event = trail.record("backup.completed")
    report = verify_trail((tmp_path / TRAIL_NAME).read_bytes(), base.public)
    assert report.ok, report.problems
    assert report.torn_tail is None
    assert report.head is not None
    assert report.head.seq == event.seq == len(base.lines) + 3
