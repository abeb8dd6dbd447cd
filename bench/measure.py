"""Run a command (or a shell-free pipeline of commands) and measure it: wall time, CPU seconds
and peak RSS, from the kernel's own accounting, not by sampling.

Each command runs under GNU time (`/usr/bin/time`, a small C program), which reports its
child's rusage from wait4. Not os.wait4 from here: a child forked from this Python process
carries this process's resident set as its high-water mark past exec, so every tool would
seem to need at least as much memory as the benchmark harness itself.

A process's rusage covers it and every descendant it waited for, so drbot's numbers include
the pg_dump or pg_basebackup it runs, as pgBackRest's include its worker processes. What none
of them includes is the PostgreSQL server's side of the work (the walsender reading files for
pg_basebackup, the backend running pg_dump's queries): the tools that read through the server
get that CPU for free, which the report says next to its numbers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float


class CommandFailed(RuntimeError):
    pass


TIME = "/usr/bin/time"


def measure(
    pipeline: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str] | None = None,
    stdout: Path | None = None,
    timeout_s: float = 3600.0,
) -> Measurement:
    """Run `pipeline` (each command's stdout into the next's stdin; the last one's stdout to
    `stdout` or /dev/null) and return its wall time, summed CPU and the largest peak RSS of any
    one command. Raises CommandFailed naming the command that failed, with its stderr tail."""
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(stdout or os.devnull, "wb"))
        errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in pipeline]
        times = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="drbot-bench-")))
        start = time.monotonic()
        try:
            previous: subprocess.Popen[bytes] | None = None
            for i, argv in enumerate(pipeline):
                last = i == len(pipeline) - 1
                timed = [TIME, "-f", "%U %S %M", "-o", str(times / str(i)), *argv]
                proc = subprocess.Popen(
                    timed,
                    env=dict(env) if env is not None else None,
                    stdin=previous.stdout if previous is not None else subprocess.DEVNULL,
                    stdout=sink if last else subprocess.PIPE,
                    stderr=errs[i],
                )
                if previous is not None and previous.stdout is not None:
                    previous.stdout.close()  # the next process owns the pipe now
                procs.append(proc)
                previous = proc
            deadline = start + timeout_s
            for proc in procs:
                proc.wait(max(0.0, deadline - time.monotonic()))
            wall = time.monotonic() - start
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
        for argv, proc, err in zip(pipeline, procs, errs, strict=True):
            if proc.returncode != 0:
                err.seek(0)
                tail = err.read()[-2000:].decode(errors="replace")
                raise CommandFailed(f"{' '.join(argv[:4])} ... exited {proc.returncode}: {tail}")
        cpu = 0.0
        rss_kib = 0
        for i in range(len(pipeline)):
            # The last line: a command that was signalled gets a "Command terminated" line first.
            user, system, rss = (times / str(i)).read_text().split("\n")[-2].split()
            cpu += float(user) + float(system)
            rss_kib = max(rss_kib, int(rss))
    return Measurement(wall, cpu, rss_kib / 1024)
