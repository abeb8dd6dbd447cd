"""Benchmark: end-to-end backup and restore throughput against pg_dump alone, and each stage.

Starts a throwaway PostgreSQL, loads ROWS rows (about 200 bytes each), then measures:
  - pg_dump alone (custom format, no compression) to /dev/null: the floor drbot adds to;
  - `drbot backup` to two local-directory destinations (wall time, CPU %, peak RSS);
  - `drbot restore` of that backup into a new database;
  - each in-process stage on the same dump bytes: fingerprint, zstd, AES-GCM framing.

Usage: .venv/bin/python bench/backup_throughput.py [ROWS]   (default 2,000,000 ≈ 400 MiB)
Nothing is asserted; numbers are printed as JSON lines for comparison across commits.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from drbot.engines.postgres.archive import ArchiveFingerprinter
from drbot.engines.postgres.localserver import LocalPostgres, find_bin_dir
from drbot.pipeline.compress import compress_chunks
from drbot.pipeline.filekey import generate_key_file
from drbot.pipeline.stream import StreamEncryptor

DRBOT = str(Path(sys.executable).parent / "drbot")
MiB = 1 << 20


def _report(name: str, seconds: float, nbytes: int, **extra: object) -> None:
    rate = nbytes / MiB / seconds if seconds else 0.0
    line = {"bench": name, "seconds": round(seconds, 2), "MiB": round(nbytes / MiB, 1)}
    print(json.dumps({**line, "MiB_per_s": round(rate, 1), **extra}), flush=True)


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(MiB):
            yield block


def _timed_child(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU % and peak RSS (MiB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, 100 * cpu / wall, after.ru_maxrss // 1024


def main(rows: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="drbot-bench-"))
    for sub in ("policies", "one", "two"):
        (work / sub).mkdir()
    generate_key_file(work / "bench.key")
    server = LocalPostgres()
    server.start()
    try:
        server.create_database("bench")
        create = (
            "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS a, "
            "repeat(md5((g % 1000)::text), 4) AS b, now() AS ts, g * 1.5 AS n "
            "FROM generate_series(1, {rows}) g"
        )
        server.execute("bench", create.format(rows=int(rows)))
        (work / "policies" / "bench.yaml").write_text(
            "version: 1\nname: bench\n"
            'source: {kind: postgresql, uri: "${BENCH_URI}", databases: [bench]}\n'
            f'encryption: {{key: "file:{work}/bench.key"}}\n'
            "compression: {level: 3}\n"
            "destinations:\n"
            f'  - {{name: one, url: "file://{work}/one"}}\n'
            f'  - {{name: two, url: "file://{work}/two"}}\n'
        )
        env = {
            **os.environ,
            "BENCH_URI": server.uri("bench"),
            "DRBOT_POLICIES": str(work / "policies"),
            "DRBOT_STATE_DIR": str(work / "state"),
        }
        dump = work / "raw.pgdump"
        pg_dump = str(find_bin_dir(None, "pg_dump") / "pg_dump")
        wall, cpu, _ = _timed_child(
            [pg_dump, "-Fc", "-Z0", "-d", server.uri("bench"), "-f", str(dump)], env
        )
        size = dump.stat().st_size
        _report("pg_dump_alone", wall, size, cpu_percent=round(cpu))

        wall, cpu, rss = _timed_child([DRBOT, "backup", "--policy", "bench"], env)
        _report("drbot_backup", wall, size, cpu_percent=round(cpu), peak_rss_MiB=rss)

        target = server.uri("bench_restored")
        wall, cpu, rss = _timed_child(
            [DRBOT, "restore", "--policy", "bench", "--to", target, "--yes"], env
        )
        _report("drbot_restore", wall, size, cpu_percent=round(cpu), peak_rss_MiB=rss)

        t0 = time.monotonic()
        fingerprinter = ArchiveFingerprinter("bench")
        for block in _chunks(dump):
            fingerprinter.feed(block)
        fingerprinter.result()
        _report("stage_fingerprint", time.monotonic() - t0, size)

        t0 = time.monotonic()
        for _ in compress_chunks(_chunks(dump), level=3):
            pass
        _report("stage_zstd_level3", time.monotonic() - t0, size)

        t0 = time.monotonic()
        encryptor = StreamEncryptor(os.urandom(32))
        for block in _chunks(dump):
            encryptor.update(block)
        encryptor.finish()
        _report("stage_aes_gcm", time.monotonic() - t0, size)
    finally:
        server.stop()
        server.remove()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000)
