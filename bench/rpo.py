"""RPO under load: how old the newest restorable point is while pgbench writes and WAL streams.

    .venv/bin/python -m bench.rpo [--minutes 5] [--rate 300] [--partial-interval 10s] [--out FILE]

A throwaway PostgreSQL (pgbench scale 20), a physical policy with `incremental: continuous`
and a local destination, one full backup, then `drbot wal stream` and pgbench at a steady
`--rate` transactions per second. Every two seconds `drbot list --json` is asked, as a person
or the daemon would, for the newest moment the stored backups restore to; the sample is that
moment's age. The distribution (median, p95, max) is printed and appended to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from drbot.daemon.service import newest_restore_point
from drbot.engines.postgres.localserver import LocalPostgres, find_bin_dir
from drbot.pipeline.filekey import generate_key_file

DRBOT = [sys.executable, "-m", "drbot"]
ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _sample(env: dict[str, str], seconds: int) -> list[float]:
    """Ages of the newest restorable point, every two seconds for `seconds`."""
    samples: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [*DRBOT, "list", "--policy", "rpo", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        newest = newest_restore_point(json.loads(listed.stdout))
        if newest is not None:
            samples.append((datetime.now(UTC) - newest).total_seconds())
        time.sleep(2)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.rpo", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=300, help="pgbench transactions per second")
    parser.add_argument("--partial-interval", default="10s")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    samples: list[float] = []
    work = Path(tempfile.mkdtemp(prefix="drbot-bench-rpo-"))
    work.chmod(0o755)
    pg = LocalPostgres(work / "pg")
    streamer: subprocess.Popen[bytes] | None = None
    load: subprocess.Popen[bytes] | None = None
    try:
        pg.start()
        pg.create_database("bench")
        bin_dir = find_bin_dir(None, "pgbench")
        subprocess.run(
            [str(bin_dir / "pgbench"), "-i", "-q", "-s", "20", pg.uri("bench")],
            check=True,
            capture_output=True,
        )
        key = work / "bench.key"
        generate_key_file(key)
        (work / "dest").mkdir()
        (work / "policies").mkdir()
        (work / "policies" / "rpo.yaml").write_text(
            "version: 1\nname: rpo\nsource:\n  kind: postgresql\n  mode: physical\n"
            f"  uri: ${{BENCH_URI}}\n  partial_interval: {args.partial_interval}\n"
            "schedule:\n  incremental: continuous\n"
            f"encryption:\n  key: file:{key}\n"
            f"destinations:\n  - name: d\n    url: file://{work}/dest\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRBOT_")}
        env.update(
            BENCH_URI=pg.uri("bench"),
            DRBOT_POLICIES=str(work / "policies"),
            DRBOT_STATE_DIR=str(work / "state"),
            DRBOT_LOG_LEVEL="error",
        )
        # The streamer first (it creates the slot), then the base backup, as docs/ say.
        streamer = subprocess.Popen(
            [*DRBOT, "wal", "stream", "--policy", "rpo"], env=env, stderr=subprocess.DEVNULL
        )
        time.sleep(3)
        subprocess.run([*DRBOT, "backup", "--policy", "rpo"], env=env, check=True)
        seconds = int(args.minutes * 60)
        pgbench = [str(bin_dir / "pgbench"), "-n", "-c", "4", "-j", "2", "-R", str(args.rate)]
        load = subprocess.Popen(
            [*pgbench, "-T", str(seconds + 30), pg.uri("bench")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(20)  # past the first partial interval under load
        samples = _sample(env, seconds)
    finally:
        for proc in (load, streamer):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        pg.stop()
        pg.remove()
        shutil.rmtree(work, ignore_errors=True)
    if not samples:
        print("bench.rpo: no restorable point was ever listed", file=sys.stderr)
        return 1
    report = (
        f"\n### RPO under load, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"pgbench at {args.rate} tps (4 clients, scale 20) for {args.minutes:g} min, "
        f"`drbot wal stream` with `partial_interval: {args.partial_interval}` to a local "
        f"destination; {len(samples)} samples of the age of the newest restorable point "
        "(`drbot list --json`, every 2 s).\n\n"
        "| median s | p95 s | max s |\n| ---: | ---: | ---: |\n"
        f"| {statistics.median(samples):.1f} | {percentile(samples, 0.95):.1f} | "
        f"{max(samples):.1f} |\n"
    )
    print(report)
    with args.out.open("a") as f:
        f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
