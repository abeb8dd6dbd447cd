"""A supervised WAL streamer: `drbot wal stream` kept running, restarted with backoff.

The streamer reconnects by itself while the database is away; this supervisor restarts the
process when it exits (a crash, a policy error fixed by a reload, an OOM kill). Restarts back
off 1 s, 2 s, 4 s ... up to a minute, and the backoff resets once a run has lasted a minute,
so a streamer that keeps dying does not spin and one that died once comes back at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from drbot.daemon.jobs import JobProcess, JobResult

log = structlog.get_logger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
HEALTHY_AFTER_S = 60.0
STATUS_FRESH_S = 10.0


class SupervisedStreamer:
    """Keeps one policy's `drbot wal stream` running while `enabled`."""

    def __init__(
        self,
        policy: str,
        spawn: Callable[[], JobProcess],
        status_file: Path,
        *,
        on_exit: Callable[[JobResult], None] | None = None,
    ) -> None:
        self.policy = policy
        self._spawn = spawn
        self.status_file = status_file
        self._on_exit = on_exit
        self.process: JobProcess | None = None
        self._stopping: JobProcess | None = None
        self._enabled = False
        self.restarts = 0
        self.down_since: float | None = time.monotonic()
        self._backoff = BACKOFF_FIRST_S
        self._next_start = 0.0
        self._started = 0.0

    def poll(self, enabled: bool) -> None:
        """Start, reap or restart as needed; call about once a second."""
        now = time.monotonic()
        if enabled and not self._enabled:
            # Counting "down" starts when it should run: a standby taking over is not an outage.
            self.down_since = now
        self._enabled = enabled
        if self.process is not None and not self.process.running():
            result = self.process.wait(timeout=5)
            self.process = None
            self.down_since = now
            ran = now - self._started
            self._backoff = BACKOFF_FIRST_S if ran >= HEALTHY_AFTER_S else self._backoff
            self._next_start = now + self._backoff
            log.warning(
                "streamer.exited",
                policy=self.policy,
                exit_code=result.exit_code if result else None,
                ran_s=round(ran, 1),
                restart_in_s=self._backoff,
            )
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            if result is not None and self._on_exit is not None:
                self._on_exit(result)
        if not enabled:
            return
        if self.process is None and now >= self._next_start:
            if self._started:
                self.restarts += 1
            self._started = now
            self.status_file.unlink(missing_ok=True)
            self.process = self._spawn().start()
            log.info("streamer.started", policy=self.policy, pid=self.process.pid)

    def status(self) -> dict[str, Any] | None:
        """The running streamer's last status (None if absent, stale or another process's)."""
        if self.process is None or not self.process.running():
            return None
        try:
            doc: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        if doc.get("pid") != self.process.pid:
            return None
        try:
            at = datetime.fromisoformat(str(doc["at"]))
        except (KeyError, ValueError):
            return None
        if (datetime.now(at.tzinfo) - at).total_seconds() > STATUS_FRESH_S:
            return None
        return doc

    def connected(self) -> bool:
        status = self.status()
        up = bool(status and status.get("connected"))
        if up:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.monotonic()
        return up

    def down_for(self) -> float:
        """Seconds the streamer has not been connected (0 while it is)."""
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def stop(self, timeout: float = 30.0) -> None:
        """Stop cleanly (it ships its unfinished segment first); kill after `timeout`."""
        self.begin_stop()
        self.finish_stop(timeout)

    def restart(self) -> None:
        """Stop it cleanly now and start it again at the next poll (a changed policy)."""
        self.stop()
        self._next_start = 0.0
        self._backoff = BACKOFF_FIRST_S

    def begin_stop(self) -> None:
        """Ask the streamer to stop (SIGINT) without waiting; `poll` will not restart it."""
        self._stopping = self.process
        self.process = None
        if self._stopping is not None:
            self._stopping.interrupt()
        self.down_since = time.monotonic()

    def finish_stop(self, timeout: float = 30.0) -> None:
        """Wait for a streamer asked to stop; kill it after `timeout`."""
        process, self._stopping = self._stopping, None
        if process is None:
            return
        if process.wait(timeout) is None:
            log.error("streamer.killed", policy=self.policy, after_s=timeout)
            process.kill()
            process.wait(10)
