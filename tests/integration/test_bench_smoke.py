"""The benchmark harness on a tiny dataset, so `make bench` never rots: every case runs for real
(drbot, pgBackRest through the TLS proxy, pg_dump, the limit) and the report has every row.
The numbers themselves are not judged here: a 24 MB database measures start-up costs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare import parse_size, targets
from bench.measure import CommandFailed, measure
from tests.fixtures.require import missing

pytestmark = pytest.mark.integration

CASES = [
    "drbot physical → local",
    "drbot physical ← local",
    "drbot physical → S3",
    "drbot physical ← S3",
    "drbot logical → local",
    "drbot logical ← local",
    "drbot logical → S3",
    "drbot logical ← S3",
    "pgBackRest process-max 1 → local",
    "pgBackRest process-max 2 → local",
    "pgBackRest process-max 2 ← local",
    "pgBackRest process-max 1 → S3",
    "pgBackRest process-max 2 → S3",
    "pgBackRest process-max 2 ← S3",
    "pg_dump -Fc → file",
    "pg_restore -j2 ← pg_dump -Fc",
    "pg_basebackup \\| zstd -3 -T2 (limit)",
    "drbot physical → local, no encryption (bench only)",
]


def test_sizes_parse() -> None:
    assert parse_size("1.5GB") == int(1.5 * (1 << 30))
    assert parse_size("200MB") == 200 << 20
    assert parse_size("10G") == 10 << 30
    assert targets([]) and all(t.value is None and t.met is None for t in targets([]))


def test_measure_reports_the_child_not_the_harness(tmp_path: Path) -> None:
    """A small command measures small (not this Python process's memory), a pipeline sums its
    CPU, and a failing command is named with its stderr."""
    small = measure([["true"]])
    assert small.peak_rss_mib < 20
    touch_150mib = "b = bytearray(150 << 20); b[::4096] = b'x' * (len(b) // 4096)"
    big = measure([[sys.executable, "-c", touch_150mib]])
    assert 150 <= big.peak_rss_mib < 200
    out = tmp_path / "out"
    both = measure([["head", "-c", "30000000", "/dev/zero"], ["gzip", "-1"]], stdout=out)
    assert both.cpu_s > 0 and out.stat().st_size > 0
    with pytest.raises(CommandFailed, match=r"ls .* exited 2: .*no-such-file"):
        measure([["ls", "/no-such-file"]])


def test_smoke_run_reports_every_case(tmp_path: Path) -> None:
    for tool in ("pgbackrest", "stunnel4", "zstd"):
        if shutil.which(tool) is None:
            missing("bench", f"{tool} is not installed; `make bench-peers` installs it")
    out = tmp_path / "bench.md"
    res = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = out.read_text()
    assert report.startswith("# Benchmarks")
    rows = {line.split(" | ")[0].removeprefix("| ") for line in report.splitlines()}
    for case in CASES:
        assert case in rows, case
    for line in report.splitlines():
        if line.startswith("| drbot physical → local |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            wall, cpu, rss, stored = (float(x) for x in cells[1:5])
            assert wall > 0 and cpu > 0 and 20 < rss < 1000 and stored > 0
    assert "| physical backup → local: drbot / pgBackRest process-max 2 |" in report
    assert "not run" not in report  # every ratio had both sides
