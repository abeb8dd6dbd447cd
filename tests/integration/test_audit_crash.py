"""The audit trail survives a writer SIGKILLed at random moments while appending."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drbot.audit.event import EventFormatError, parse_line
from drbot.audit.trail import KEY_NAME, TRAIL_NAME, FileAuditTrail, load_signing_key
from drbot.audit.verify import verify_trail
from drbot.clock import SystemClock

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 5

# Appends as fast as it can until killed; says "ready" once it is about to start.
_WRITER = """
import itertools, sys
from pathlib import Path
from drbot.audit.trail import FileAuditTrail
from drbot.clock import SystemClock

trail = FileAuditTrail(Path(sys.argv[1]), SystemClock(), actor="crash@test")
print("ready", flush=True)
for i in itertools.count():
    trail.record(
        "crash.append",
        policy="shop",
        subject={"i": i},
        details={"pad": "é" * (200_000 if i % 2 else i % 3000), "note": "✓ kill me"},
    )
"""


def _kill_writer_after(directory: Path, delay: float) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(directory)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        ready = child.stdout.readline()
        assert ready == b"ready\n", (ready, child.stderr.read() if child.stderr else b"")
        time.sleep(delay)
        assert child.poll() is None, "the writer stopped before it was killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_sigkilled_writer_never_breaks_the_trail(tmp_path: Path) -> None:
    """Kill a writer mid-append several times; the trail verifies after every kill."""
    rng = random.Random()
    # The first record creates the key and audit.pub, so no kill can hit key creation.
    FileAuditTrail(tmp_path, SystemClock()).record("crash.test.started")
    public = load_signing_key(tmp_path / KEY_NAME, create=False).public_key()
    trail_path = tmp_path / TRAIL_NAME
    events = 1
    delays: list[float] = []
    for round_number in range(1, ROUNDS + 1):
        delay = rng.uniform(0.05, 0.4)
        delays.append(round(delay, 3))
        _kill_writer_after(tmp_path, delay)
        report = verify_trail(trail_path.read_bytes(), public)
        assert report.ok, (round_number, delays, report.problems[:3], report.torn_tail)
        assert report.events > events, f"round {round_number}: the writer appended nothing"
        events = report.events

    final = FileAuditTrail(tmp_path, SystemClock()).record("crash.test.finished")
    data = trail_path.read_bytes()
    report = verify_trail(data, public)
    assert report.ok, (delays, report.problems[:3])
    assert report.torn_tail is None
    assert report.head == final
    events_seen, torn_lines = [], 0
    for line in data.rstrip(b"\n").split(b"\n"):
        try:
            events_seen.append(parse_line(line))
        except EventFormatError:
            torn_lines += 1  # a kill tore this line; the verifier found its torn_line event
    seqs = [event.seq for event in events_seen]
    assert seqs == list(range(1, len(seqs) + 1))
    assert report.events == len(seqs) == final.seq
    markers = [event for event in events_seen if event.action == "audit.torn_line"]
    assert len(markers) == torn_lines
