"""Jobs as child processes: the daemon runs `drbot backup`, `drill`, `prune`, ... like a person.

Each job is the same command a person would type, so the daemon adds no second code path for
backups, and a job that crashes or leaks memory takes only itself down. A child runs in its
own session: a Ctrl-C on the daemon's terminal reaches the daemon alone, which then decides
how its jobs stop (`JobProcess.interrupt` sends SIGINT, which every command treats as "clean
up and stop": uploads aborted, nothing half-written left looking complete).

A child's stderr carries its JSON log lines, passed through unchanged, and its `Error:` /
`Try:` lines, re-logged as `job.output` events. Its stdout is its `--json` result.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import structlog

from drbot.clock import Clock
from drbot.procs import DIE_WITH_ENV

log = structlog.get_logger(__name__)

# Exit codes by name, for metrics labels and alerts (docs/design.md: the public contract).
EXIT_NAMES = {
    0: "ok",
    1: "unexpected",
    2: "usage",
    3: "partial",
    10: "no_restore_point",
    11: "lock_held",
    12: "key_problem",
    13: "integrity_failure",
    14: "database_unreachable",
    15: "storage_unreachable",
    16: "invalid_policy",
    17: "no_sandbox",
    18: "key_in_use",
    20: "drill_failed",
    130: "interrupted",
}


def exit_name(code: int) -> str:
    """A label for an exit code ('killed' for a signal, 'exit_N' for an unknown code)."""
    if code < 0:
        return "killed"
    return EXIT_NAMES.get(code, f"exit_{code}")


@dataclass(frozen=True)
class JobResult:
    """How one run of a job ended."""

    kind: str
    policy: str
    exit_code: int
    started_at: datetime
    duration_s: float
    output: Any = None
    """The command's `--json` document, if it printed one."""
    error: str | None = None
    """The command's `Error:` line, if it printed one."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def outcome(self) -> str:
        return exit_name(self.exit_code)


def drbot_command(args: Sequence[str]) -> list[str]:
    """The argv that runs `drbot ARGS` with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "drbot", *args]


@dataclass
class JobProcess:
    """One running child; `wait()` returns its JobResult."""

    kind: str
    policy: str
    argv: list[str]
    clock: Clock
    env: Mapping[str, str] | None = None
    on_line: Callable[[str], None] | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _started_at: datetime | None = field(default=None, init=False, repr=False)
    _t0: float = field(default=0.0, init=False, repr=False)
    _stdout: list[bytes] = field(default_factory=list, init=False, repr=False)
    _errors: list[str] = field(default_factory=list, init=False, repr=False)
    _readers: list[threading.Thread] = field(default_factory=list, init=False, repr=False)

    def start(self) -> JobProcess:
        """Start the child. OSError if the interpreter cannot be run."""
        self._started_at = self.clock.now()
        self._t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(self.env) if self.env is not None else None,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        assert self._proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(self._proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        log.debug("job.spawned", policy=self.policy, job=self.kind, pid=self._proc.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def age_s(self) -> float:
        """Seconds since the child was started (0 before)."""
        return time.monotonic() - self._t0 if self._proc is not None else 0.0

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def interrupt(self) -> None:
        """Ask the child to stop cleanly (SIGINT: the same as Ctrl-C for a person)."""
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        """Stop the child now (SIGKILL to its whole session). Last resort only."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> JobResult | None:
        """The result once the child has exited (None if still running after `timeout`)."""
        assert self._proc is not None
        assert self._started_at is not None
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(timeout=5)
        return JobResult(
            kind=self.kind,
            policy=self.policy,
            exit_code=code,
            started_at=self._started_at,
            duration_s=time.monotonic() - self._t0,
            output=self._parse_output(),
            error=self._errors[-1] if self._errors else None,
        )

    def _parse_output(self) -> Any:
        text = b"".join(self._stdout).decode(errors="replace").strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"text": text[-2000:]}

    def _read_stdout(self, stream: IO[bytes]) -> None:
        for chunk in iter(lambda: stream.read(65536), b""):
            self._stdout.append(chunk)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if not line:
                continue
            if line.startswith("{"):
                # Already a JSON log line of ours: pass it through as written.
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            else:
                if line.startswith("Error: "):
                    self._errors.append(line.removeprefix("Error: "))
                log.info("job.output", policy=self.policy, job=self.kind, line=line)
            if self.on_line is not None:
                self.on_line(line)


def child_env(base: Mapping[str, str], *, policies: Path, log_level: str) -> dict[str, str]:
    """The environment jobs run with: the daemon's own, with its policies directory made
    absolute, JSON logs (the daemon passes them through) and the daemon's log level."""
    env = dict(base)
    env["DRBOT_POLICIES"] = str(policies.absolute())
    env["DRBOT_LOG_FORMAT"] = "json"
    env["DRBOT_LOG_LEVEL"] = log_level
    # The child asks the kernel for SIGTERM when this process dies (drbot.procs.die_with):
    # a killed daemon leaves no orphaned streamer holding the replication slot.
    env[DIE_WITH_ENV] = str(os.getpid())
    env.pop("DRBOT_HTTP", None)  # jobs serve nothing
    return env
