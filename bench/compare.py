"""drbot against pgBackRest, pg_dump and the read + compress limit, side by side, in one run.

    .venv/bin/python -m bench.compare [--size 1.5GB] [--rounds 3] [--out docs/benchmarks.md]
    .venv/bin/python -m bench.compare --smoke --out /tmp/bench.md      # tiny, for the test suite

One throwaway PostgreSQL with a generated database of `--size` (bench/dataset.py), one S3
server (moto) on 127.0.0.1 with a TLS proxy in front for pgBackRest, then `--rounds` rounds of
every case. The cases run alternating (each round starts one case further along), so a slow
minute of the machine is spread over all of them instead of landing on one. Each case is
measured by the kernel's accounting of its processes (bench/measure.py). The report, a
markdown table with medians and the ratios the targets are stated in, is printed and appended
to `--out` with the machine and the versions.

Comparable settings: zstd level 3 and AES-256 everywhere (pgBackRest: aes-256-cbc; drbot:
AES-256-GCM), one destination per backup, the same server, the same data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import psycopg

from bench import peers
from bench.dataset import generate
from bench.measure import Measurement, measure
from drbot.engines.postgres.localserver import LocalPostgres, find_bin_dir, free_port
from drbot.pipeline.filekey import generate_key_file

DRBOT = [sys.executable, "-m", "drbot"]
PLAIN_CASE = "drbot physical → local, no encryption (bench only)"
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
STANZA = "bench"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1.5GB, 200MB)")
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(m.group(1)) * factor[m.group(2).upper()])


@dataclass
class Case:
    name: str
    group: str  # "backup" or "restore"
    run: Callable[[int], Measurement]
    stored: Callable[[], int] | None = None
    results: list[Measurement] = field(default_factory=list)
    stored_bytes: list[int] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(float(getattr(m, attr)) for m in self.results))


class Bench:
    def __init__(
        self,
        work: Path,
        size: int,
        *,
        s3: bool,
        peers_on: bool,
        only: re.Pattern[str] | None = None,
    ) -> None:
        self.only = only
        self.work = work
        self.size = size
        self.s3 = s3
        self.peers = peers_on
        self.owner = peers.pg_os_user()
        self.pg = LocalPostgres(work / "pg")
        self.bin = find_bin_dir(None, "pg_dump")
        self.key = work / "bench.key"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DRBOT_", "AWS_"))}
        self.s3_port = free_port()
        self.moto: subprocess.Popen[bytes] | None = None
        self.proxy: peers.TlsProxy | None = None
        self.cases: list[Case] = []
        self.versions: dict[str, str] = {}
        self.db_bytes = 0

    # -- set-up -------------------------------------------------------------------------

    def setup(self) -> None:
        self.pg.start()
        self.pg.create_database("bench")
        t0 = time.monotonic()
        # Small batches for a small database, so a smoke run stays near its size.
        batch = 100_000 if self.size >= 512 * MiB else 10_000
        self.db_bytes = generate(self.pg.uri("bench"), self.size, batch_rows=batch)
        print(
            f"bench: dataset {self.db_bytes / MiB:.0f} MiB in {time.monotonic() - t0:.0f} s",
            file=sys.stderr,
        )
        generate_key_file(self.key)
        self.env.update(
            DRBOT_STATE_DIR=str(self.work / "state"),
            DRBOT_LOG_LEVEL="error",
            BENCH_URI=self.pg.uri("bench"),
        )
        if self.s3:
            self._start_s3()
        if self.peers:
            self._setup_pgbackrest()
        self._versions()
        self._define_cases()
        if self.only is not None:
            self.cases = [c for c in self.cases if self.only.search(c.name)]

    def _start_s3(self) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        self.moto = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.s3_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.env.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",  # noqa: S106 - the local S3 server's
            AWS_DEFAULT_REGION="us-east-1",
        )
        s3 = self._s3()
        deadline = time.monotonic() + 30
        while True:
            try:
                s3.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for bucket in ("drbot-bench", "pgbackrest-bench"):
            s3.create_bucket(Bucket=bucket)

    def _s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106
        )

    def _setup_pgbackrest(self) -> None:
        """Two stanzas' worth of configs (local repo, S3 repo) for one server; WAL archived
        to both, as a pgBackRest user would run it."""
        pgb = self.work / "pgbackrest"
        passphrase = os.urandom(16).hex()

        def config(name: str, repo: Path | peers.S3Repo) -> Path:
            return peers.pgbackrest_config(
                pgb / f"{name}.conf",
                stanza=STANZA,
                pg_data=self.pg.data_dir,
                socket_dir=self.pg.socket_dir,
                pg_port=self.pg.port,
                repo=repo,
                work_dir=pgb / f"work-{name}",
                cipher_pass=passphrase,
                owner=self.owner,
            )

        self.pgb_local = config("local", pgb / "repo")
        configs = [self.pgb_local]
        if self.s3:
            self.proxy = peers.TlsProxy(self.s3_port)
            self.proxy.start()
            self.pgb_s3 = config(
                "s3", peers.S3Repo(bucket="pgbackrest-bench", port=self.proxy.port)
            )
            configs.append(self.pgb_s3)
        pushes = " && ".join(peers.archive_command(c, STANZA) for c in configs)
        with psycopg.connect(self.pg.uri(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET archive_mode = on")
            conn.execute(f"ALTER SYSTEM SET archive_command = '{pushes}'".encode())
        self.pg.stop()
        self.pg.start()
        for path in configs:
            run_checked(peers.stanza_create_argv(path, STANZA, run_as=self.owner))

    def _versions(self) -> None:
        def first_line(argv: list[str]) -> str:
            try:
                out = subprocess.run(argv, capture_output=True, text=True, check=False)
                line = (out.stdout or out.stderr).strip().splitlines()[0]
            except (OSError, IndexError):
                return "not found"
            version = re.search(r"\d+\.\d+(\.\d+)?", line)
            return version.group(0) if version else line

        self.versions = {
            "drbot": first_line([*DRBOT, "--version"]),
            "PostgreSQL": first_line([str(self.bin / "postgres"), "--version"]),
            "pgBackRest": first_line(["pgbackrest", "version"]) if self.peers else "not run",
            "zstd": first_line(["zstd", "--version"]),
            "Python": platform.python_version(),
        }

    # -- cases --------------------------------------------------------------------------

    def _policy(self, name: str, mode: str, url: str, region: str | None) -> None:
        policies = self.work / "policies"
        policies.mkdir(exist_ok=True)
        dest = f"    url: {url}\n" + (f"    region: {region}\n" if region else "")
        databases = "  databases: [bench]\n" if mode == "logical" else ""
        (policies / f"{name}.yaml").write_text(
            f"version: 1\nname: {name}\nsource:\n  kind: postgresql\n  mode: {mode}\n"
            f"  uri: ${{BENCH_URI}}\n{databases}"
            f"encryption:\n  key: file:{self.key}\ncompression:\n  level: 3\n"
            f"destinations:\n  - name: d\n{dest}"
        )
        self.env["DRBOT_POLICIES"] = str(policies)

    def _define_cases(self) -> None:
        where: list[tuple[str, str | None]] = [("local", None)]
        if self.s3:
            where.append(("S3", "us-east-1"))
        for mode in ("physical", "logical"):
            for label, region in where:
                name = f"{mode[:4]}-{label.lower()}"
                if region is None:
                    local = self.work / "drbot-local" / name
                    local.mkdir(parents=True)
                    url = f"file://{local}"
                else:
                    url = f"s3://drbot-bench/{name}"
                self._policy(name, mode, url, region)
                self.cases.append(
                    Case(
                        f"drbot {mode} → {label}",
                        "backup",
                        self._drbot_backup(name),
                        stored=self._stored(url),
                    )
                )
                self.cases.append(
                    Case(f"drbot {mode} ← {label}", "restore", self._drbot_restore(name, mode))
                )
                if mode == "physical" and region is None:
                    # The same backup with a pass-through for a cipher (bench/plain.py): what
                    # AES-256-GCM costs. Nothing restores it.
                    plain = self.work / "drbot-local" / f"{name}-plain"
                    plain.mkdir(parents=True)
                    self._policy(f"{name}-plain", mode, f"file://{plain}", None)
                    self.cases.append(
                        Case(
                            PLAIN_CASE,
                            "backup",
                            self._drbot_backup(f"{name}-plain", plain=True),
                            stored=self._stored(f"file://{plain}"),
                        )
                    )
        if self.peers:
            repos = [("local", self.pgb_local)] + ([("S3", self.pgb_s3)] if self.s3 else [])
            for label, config in repos:
                for pm in (1, 2):
                    self.cases.append(
                        Case(
                            f"pgBackRest process-max {pm} → {label}",
                            "backup",
                            self._pgb_backup(config, pm),
                            stored=self._pgb_stored(config),
                        )
                    )
                self.cases.append(
                    Case(
                        f"pgBackRest process-max 2 ← {label}", "restore", self._pgb_restore(config)
                    )
                )
        self.cases.append(
            Case("pg_dump -Fc → file", "backup", self._pg_dump(), stored=self._dump_size)
        )
        self.cases.append(Case("pg_restore -j2 ← pg_dump -Fc", "restore", self._pg_restore()))
        self.cases.append(Case("pg_basebackup | zstd -3 -T2 (limit)", "backup", self._limit()))

    def _drbot_backup(self, policy: str, *, plain: bool = False) -> Callable[[int], Measurement]:
        program = [sys.executable, "-m", "bench.plain"] if plain else DRBOT

        def run(_round: int) -> Measurement:
            return measure([[*program, "backup", "--policy", policy]], env=self.env)

        return run

    def _drbot_restore(self, policy: str, mode: str) -> Callable[[int], Measurement]:
        def run(round_: int) -> Measurement:
            if mode == "physical":
                target = self.work / f"restored-{policy}-{round_}"
                argv = [*DRBOT, "restore", "--policy", policy, "--to-dir", str(target), "--yes"]
                if self.owner is not None:
                    argv += ["--run-as", self.owner]
                try:
                    return measure([argv], env=self.env)
                finally:
                    shutil.rmtree(target, ignore_errors=True)
            db = f"restored_{policy.replace('-', '_')}_{round_}"
            argv = [*DRBOT, "restore", "--policy", policy, "--to", self.pg.uri(db), "--yes"]
            try:
                return measure([argv], env=self.env)
            finally:
                self._drop(db)

        return run

    def _pgb_backup(self, config: Path, pm: int) -> Callable[[int], Measurement]:
        def run(_round: int) -> Measurement:
            argv = peers.backup_argv(config, STANZA, process_max=pm, run_as=self.owner)
            return measure([argv], env=self.env)

        return run

    def _pgb_restore(self, config: Path) -> Callable[[int], Measurement]:
        def run(round_: int) -> Measurement:
            target = peers.data_dir(self.work / f"pgb-restored-{round_}", self.owner)
            argv = peers.restore_argv(config, STANZA, target, process_max=2, run_as=self.owner)
            try:
                return measure([argv], env=self.env)
            finally:
                shutil.rmtree(target, ignore_errors=True)

        return run

    def _pg_dump(self) -> Callable[[int], Measurement]:
        def run(_round: int) -> Measurement:
            out = self.work / "bench.pgdump"
            argv = [str(self.bin / "pg_dump"), "-Fc", "-d", self.pg.uri("bench")]
            return measure([[*argv, "-f", str(out)]], env=self.env)

        return run

    def _dump_size(self) -> int:
        return (self.work / "bench.pgdump").stat().st_size

    def _pg_restore(self) -> Callable[[int], Measurement]:
        def run(round_: int) -> Measurement:
            dump = self.work / "bench.pgdump"  # this round's `pg_dump -Fc` case wrote it
            db = f"pg_restored_{round_}"
            with psycopg.connect(self.pg.uri(), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db}"'.encode())
            argv = [str(self.bin / "pg_restore"), "-j2", "-d", self.pg.uri(db), str(dump)]
            try:
                return measure([argv], env=self.env)
            finally:
                self._drop(db)

        return run

    def _limit(self) -> Callable[[int], Measurement]:
        def run(_round: int) -> Measurement:
            base = [
                str(self.bin / "pg_basebackup"),
                "-d", self.pg.uri(), "-D", "-", "-Ft", "-X", "fetch", "--checkpoint=fast",
            ]  # fmt: skip
            return measure([base, ["zstd", "-3", "-T2", "-q", "-c"]], env=self.env)

        return run

    def _drop(self, db: str) -> None:
        with psycopg.connect(self.pg.uri(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'.encode())

    def _stored(self, url: str) -> Callable[[], int]:
        """Bytes of the newest backup in a drbot destination."""

        def size() -> int:
            if url.startswith("file://"):
                root = Path(url.removeprefix("file://"))
                newest = _newest_backup_dir(root)
                return sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
            bucket, _, prefix = url.removeprefix("s3://").partition("/")
            sizes: dict[str, int] = {}
            for obj in self._list(bucket, prefix + "/"):
                if "/backups/" in obj["Key"]:
                    backup = obj["Key"].split("/backups/")[1].split("/")[0]
                    sizes[backup] = sizes.get(backup, 0) + obj["Size"]
            return sizes[max(sizes)] if sizes else 0

        return size

    def _pgb_stored(self, config: Path) -> Callable[[], int]:
        def size() -> int:
            out = subprocess.run(
                peers.info_argv(config, STANZA, run_as=self.owner),
                capture_output=True,
                text=True,
                check=True,
            )
            info = json.loads(out.stdout)
            backups = info[0]["backup"]
            return int(backups[-1]["info"]["repository"]["delta"]) if backups else 0

        return size

    def _list(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self._s3().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    # -- running ------------------------------------------------------------------------

    def run(self, rounds: int) -> None:
        backups = [c for c in self.cases if c.group == "backup"]
        restores = [c for c in self.cases if c.group == "restore"]
        for r in range(rounds):
            # Restores read what this round's backups wrote; each list rotates per round.
            for group in (backups, restores):
                if not group:  # --cases chose none of this kind
                    continue
                k = r % len(group)
                for case in group[k:] + group[:k]:
                    with psycopg.connect(self.pg.uri(), autocommit=True) as conn:
                        conn.execute("CHECKPOINT")
                    m = case.run(r)
                    case.results.append(m)
                    if case.stored is not None:
                        case.stored_bytes.append(case.stored())
                    print(
                        f"bench: round {r + 1}/{rounds} {case.name}: {m.wall_s:.1f} s, "
                        f"cpu {m.cpu_s:.1f} s, rss {m.peak_rss_mib:.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )

    def close(self) -> None:
        # The server first: its shutdown archives the last WAL, which waits for the repos.
        self.pg.stop()
        self.pg.remove()
        if self.proxy is not None:
            self.proxy.stop()
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(10)


def _newest_backup_dir(root: Path) -> Path:
    dirs = sorted(root.glob("*/backups/*"))
    if not dirs:
        raise FileNotFoundError(f"no backup under {root}")
    return dirs[-1]


def run_checked(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout)[-2000:]}")


# -- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    what: str
    value: float | None
    limit: float
    higher_is_better: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def _by_name(cases: list[Case]) -> dict[str, Case]:
    return {c.name: c for c in cases if c.results}


def targets(cases: list[Case]) -> list[Target]:
    """The issue's targets, each as the ratio of medians it is stated in (None: not run)."""
    c = _by_name(cases)

    def ratio(a: str, b: str) -> float | None:
        if a in c and b in c and c[b].median("wall_s") > 0:
            return c[a].median("wall_s") / c[b].median("wall_s")
        return None

    out = []
    for where in ("local", "S3"):
        out.append(
            Target(
                f"physical backup → {where}: drbot / pgBackRest process-max 2",
                ratio(f"drbot physical → {where}", f"pgBackRest process-max 2 → {where}"),
                0.5,
            )
        )
    out.append(
        Target(
            "physical backup → local: drbot / read + compress limit",
            ratio("drbot physical → local", "pg_basebackup | zstd -3 -T2 (limit)"),
            1.3,
        )
    )
    out.append(
        Target(
            "logical backup: pg_dump -Fc / drbot (speed-up)",
            ratio("pg_dump -Fc → file", "drbot logical → local"),
            4.0,
            higher_is_better=True,
        )
    )
    for where in ("local", "S3"):
        out.append(
            Target(
                f"physical restore ← {where}: drbot / pgBackRest",
                ratio(f"drbot physical ← {where}", f"pgBackRest process-max 2 ← {where}"),
                1.0,
            )
        )
    plain = ratio(PLAIN_CASE, "drbot physical → local")
    out.append(
        Target(
            "encryption, share of physical backup → local wall time",
            None if plain is None else 1 - plain,
            0.05,
        )
    )
    rss = [m.peak_rss_mib for c in cases if c.name.startswith("drbot") for m in c.results]
    out.append(Target("drbot peak RSS, MiB (largest of any case)", max(rss, default=None), 200))
    return out


def markdown(bench: Bench, rounds: int, started: datetime) -> str:
    cpu = platform.processor() or _cpu_model()
    lines = [
        f"## {started:%Y-%m-%d %H:%M} UTC: {bench.db_bytes / MiB:,.0f} MiB database, "
        f"{rounds} round(s)",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {_mem_gib():.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}. "
        + ", ".join(f"{k} {v}" for k, v in bench.versions.items())
        + ". S3: moto on 127.0.0.1 (pgBackRest through a TLS proxy).",
        "",
        "| case | wall s (median) | CPU s | peak RSS MiB | stored MiB | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in bench.cases:
        if not case.results:
            continue
        stored = f"{statistics.median(case.stored_bytes) / MiB:,.0f}" if case.stored_bytes else ""
        name = case.name.replace("|", "\\|")
        lines.append(
            f"| {name} | {case.median('wall_s'):.1f} | {case.median('cpu_s'):.1f} | "
            f"{max(m.peak_rss_mib for m in case.results):.0f} | {stored} | {len(case.results)} |"
        )
    lines += ["", "| target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
    for t in targets(bench.cases):
        measured = "not run" if t.value is None else f"{t.value:.2f}"
        sign = "≥" if t.higher_is_better else "≤"
        met = {True: "yes", False: "**no**", None: "n/a"}[t.met]
        lines.append(f"| {t.what} | {measured} | {sign} {t.limit:g} | {met} |")
    lines += [
        "",
        "CPU is what the measured processes used (children included); the PostgreSQL server's "
        "own work for pg_basebackup and pg_dump (reading, sending) is not in it.",
        "",
    ]
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _mem_gib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=os.environ.get("BENCH_SIZE", "1.5GB"))
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--smoke", action="store_true", help="a tiny dataset, one round")
    parser.add_argument("--no-s3", action="store_true", help="local destinations only")
    parser.add_argument("--no-peers", action="store_true", help="skip pgBackRest")
    parser.add_argument(
        "--cases",
        type=re.compile,
        default=None,
        metavar="REGEX",
        help="run only the cases whose name matches (keep the backups a chosen restore reads), "
        "e.g. --cases '^drbot' for the 10 GB memory run",
    )
    args = parser.parse_args(argv)
    size = parse_size(args.size) if isinstance(args.size, str) else args.size
    rounds = args.rounds
    if args.smoke:
        size, rounds = 24 * MiB, 1
    started = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="drbot-bench-"))
    work.chmod(0o755)  # the server and pgBackRest run as `postgres` when we are root
    bench = Bench(work, size, s3=not args.no_s3, peers_on=not args.no_peers, only=args.cases)
    try:
        bench.setup()
        bench.run(rounds)
        report = markdown(bench, rounds, started)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    if not args.out.exists():
        args.out.write_text(HEADER)
    with args.out.open("a") as f:
        f.write("\n" + report)
    return 0


HEADER = """# Benchmarks

Appended by `make bench` (`python -m bench.compare`, see its docstring): drbot against
pgBackRest, pg_dump and the read + compress limit, on the same server and data, in one run,
cases alternating. Newest last. Targets (issue 9): physical full backup ≤ 0.5 x pgBackRest with
process-max 2 and ≤ 1.3 x `pg_basebackup | zstd -3 -T2`; logical full backup ≥ 4 x faster than
`pg_dump -Fc`; restore ≤ pgBackRest's; peak RSS < 200 MB and within 10 % between 1.5 GB and
10 GB (`BENCH_SIZE=10GB make bench`, or `python -m bench.compare --size 10GB --cases '^drbot'`
for drbot's cases alone); encryption ≤ 5 % of backup wall time (the case "no encryption (bench
only)" runs the same backup with a pass-through for a cipher, `bench/plain.py`).
"""


if __name__ == "__main__":
    raise SystemExit(main())
