"""A per-policy lease held in a destination, so two daemons never act on one policy at once.

The lease is one small JSON object (`<policy>/lease.json`, see docs/design.md, "Lease") in the
policy's first destination, written only with conditional writes (`Storage.put_if`). Its holder
renews it every third of its TTL; another daemon takes it over once it has seen the very same
version (tag) of the object unchanged for a whole TTL. Only the local monotonic clock decides
expiry, never the times written in the record, so clock skew between hosts does not matter:

- the holder counts its validity from the moment it *started* its last successful write, and
  stops acting (`valid()` turns False) 2/3 of a TTL later;
- a waiter starts counting only after it has *read* a version, which is after that version was
  written, and takes over a full TTL later; so the old holder has stopped acting by then,
  with a third of a TTL to spare (for renewals that fail and for clocks that run at slightly
  different rates).

A record naming a process of this host that no longer exists (a crashed daemon, restarted) or
marked released is taken at once.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from drbot.clock import Clock
from drbot.errors import ObjectNotFound, PreconditionFailed, StorageUnavailable
from drbot.procs import pid_alive
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

FORMAT = "drbot-lease/1"
VALID_FRACTION = 2 / 3
"""A holder acts only until this fraction of the TTL has passed since its last write began:
with renewals every third of the TTL, one renewal may fail without losing the lease."""
UNKNOWN_HOLDER = "unknown"
"""What `LeaseState.holder` says when the lease object cannot be read as a lease record."""

_process_holder: tuple[int, str] | None = None


def process_holder() -> str:
    """This process's holder id, `host:pid:random hex`: the same for every call in a process,
    different in a forked child and in every later process."""
    global _process_holder  # noqa: PLW0603 - one id per process, made on first use
    pid = os.getpid()
    if _process_holder is None or _process_holder[0] != pid:
        _process_holder = (pid, f"{socket.gethostname()}:{pid}:{secrets.token_hex(8)}")
    return _process_holder[1]


def pid_space() -> str:
    """`<boot id>/<pid namespace>` of this process ("" where Linux does not say): pids are only
    comparable between processes with the same value."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's content (format `drbot-lease/1`, documented in docs/design.md)."""

    policy: str
    holder: str
    host: str
    pid: int
    acquired_at: datetime
    renewed_at: datetime
    ttl_s: float
    released: bool = False
    pid_space: str = ""
    """Which pid namespace of which boot `pid` belongs to (`<boot id>/<pid ns inode>`); two
    containers may share a host name, so only an equal pid space makes `pid` comparable."""

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "policy": self.policy,
            "holder": self.holder,
            "host": self.host,
            "pid": self.pid,
            "acquired_at": self.acquired_at.astimezone(UTC).isoformat(),
            "renewed_at": self.renewed_at.astimezone(UTC).isoformat(),
            "ttl_s": self.ttl_s,
            "released": self.released,
            "pid_space": self.pid_space,
        }
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        """The record in `data`; ValueError if it is not a `drbot-lease/1` record."""
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} record")
            return cls(
                policy=_typed(body, "policy", str),
                holder=_typed(body, "holder", str),
                host=_typed(body, "host", str),
                pid=_typed(body, "pid", int),
                acquired_at=_time(body, "acquired_at"),
                renewed_at=_time(body, "renewed_at"),
                ttl_s=float(_typed(body, "ttl_s", int | float)),
                released=_typed(body, "released", bool),
                pid_space=str(body.get("pid_space") or ""),
            )
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a {FORMAT} record: {exc}") from None


def _typed(body: dict[str, Any], field: str, kind: Any) -> Any:
    value = body.get(field)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"lease record field {field!r} is missing or malformed")
    return value


def _time(body: dict[str, Any], field: str) -> datetime:
    try:
        at = datetime.fromisoformat(_typed(body, field, str))
    except ValueError:
        raise ValueError(f"lease record field {field!r} is not an ISO-8601 time") from None
    if at.tzinfo is None:
        raise ValueError(f"lease record field {field!r} has no time zone")
    return at


@dataclass(frozen=True)
class LeaseState:
    """What one `Lease.tick` found."""

    held: bool
    """This process holds the lease now."""
    holder: str | None
    """Who holds it (this process or another; `UNKNOWN_HOLDER` if the object is unreadable);
    None if it is free or released."""
    since: datetime | None
    """When the current holder acquired it (as that holder wrote it), if known."""
    changed: bool
    """`held` differs from the previous tick's (the lease was acquired or lost)."""


class Lease:
    """One policy's lease, as seen and held by this process.

    Call `tick` every `ttl_s / 3` or so, from one thread; it acquires, renews or observes.
    (A renewal that fails is retried at the next tick, which at exactly `ttl_s / 3` lands on
    the edge of validity; ticking a little more often leaves a real retry.)
    `valid` may be asked from any thread, as often as needed, and never touches storage: act
    on the policy only while it is True. `release` on a clean shutdown lets a waiting daemon
    take over at its next tick instead of a TTL later.
    """

    def __init__(
        self,
        storage: Storage,
        policy: str,
        *,
        ttl_s: float,
        clock: Clock,
        holder: str | None = None,
    ) -> None:
        """`holder` defaults to `process_holder()`; ValueError if `ttl_s` is not positive."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, not {ttl_s}")
        self.storage = storage
        self.policy = policy
        self.ttl_s = ttl_s
        self.holder = holder or process_holder()
        self.key = layout.lease_key(policy)
        self._clock = clock
        self._host = socket.gethostname()
        self._pid_space = pid_space()
        self._pid = os.getpid()
        self._held = False
        self._valid_until: float | None = None
        """Monotonic deadline for acting; one attribute, so `valid` reads it atomically."""
        self.last_error: str | None = None
        """Why the last tick could not reach the lease object (None if it could)."""
        self._acquired_at: datetime | None = None
        self._watch: tuple[str, float] | None = None
        """(tag, monotonic time first seen) of the version another holder last wrote."""
        self._other: tuple[str | None, datetime | None] = (None, None)
        self._reported_held = False

    # -- API ---------------------------------------------------------------------------------

    def valid(self) -> bool:
        """True while held and the last successful write began less than 2/3 of the TTL ago
        (monotonic), so a holder that cannot reach storage stops acting before anyone else may
        take over."""
        until = self._valid_until
        return until is not None and self._clock.monotonic() < until

    def tick(self) -> LeaseState:
        """Acquire, renew, or observe the lease, by the rules in the module docstring.

        StorageUnavailable is caught here: a held lease is then kept only while still `valid`.
        Other errors (a bad policy name: ValueError) propagate.
        """
        failure: StorageUnavailable | None = None
        try:
            self._step()
        except StorageUnavailable as exc:
            failure = exc
            if self._held:
                log.warning(
                    "lease.renew_failed", policy=self.policy, holder=self.holder, error=str(exc)
                )
            elif str(exc) != self.last_error:
                # A daemon that cannot reach the lease does nothing for the policy: say so
                # (once per distinct error, not every tick).
                log.warning(
                    "lease.unreachable", policy=self.policy, holder=self.holder, error=str(exc)
                )
        self.last_error = None if failure is None else str(failure)
        if self._held and not self.valid():
            # No write began within 2/3 of the TTL (storage down, or ticks too far apart).
            self._lose(f"storage unreachable: {failure}" if failure else "not renewed in time")
        return self._state()

    def release(self) -> None:
        """Mark the lease released if this process's holder id is in it (conditional write);
        best effort: never raises, only logs."""
        self._held = False
        self._valid_until = None
        self._acquired_at = None
        try:
            data, tag = self.storage.read_tagged(self.key)
            record = LeaseRecord.from_json(data)
            if record.holder != self.holder or record.released:
                return
            released = replace(record, renewed_at=self._clock.now(), released=True)
            self.storage.put_if(self.key, released.to_json(), expected=tag)
        except ObjectNotFound:
            return
        except Exception as exc:  # a shutdown path: log, never raise
            log.warning(
                "lease.release_failed", policy=self.policy, holder=self.holder, error=str(exc)
            )
            return
        log.info("lease.released", policy=self.policy, holder=self.holder)

    # -- rules -------------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            data, tag = self.storage.read_tagged(self.key)
        except ObjectNotFound:
            self._other = (None, None)
            self._write(expected=None, reason="free")
            return
        seen_at = self._clock.monotonic()  # after the read: the version existed before this
        try:
            record: LeaseRecord | None = LeaseRecord.from_json(data)
        except ValueError as exc:
            log.warning("lease.unreadable", policy=self.policy, holder=self.holder, error=str(exc))
            record = None
        if record is not None and record.holder == self.holder:
            # Only this process writes records naming it: nobody held it since our last write.
            self._write(expected=tag, reason="ours")
            return
        if record is None:
            self._other = (UNKNOWN_HOLDER, None)
        elif record.released:
            self._other = (None, None)
        else:
            self._other = (record.holder, record.acquired_at)
        if self._held:
            self._lose("taken over")
        if record is not None and record.released:
            self._write(expected=tag, reason="released")
        elif record is not None and self._crashed_here(record):
            self._write(expected=tag, reason="holder process is gone")
        else:
            self._wait(tag, seen_at, record)

    def _crashed_here(self, record: LeaseRecord) -> bool:
        """The record names a process of this host that no longer exists."""
        return (
            record.host == self._host
            and record.pid_space != ""
            and record.pid_space == self._pid_space
            and record.pid > 0
            and record.pid != self._pid
            and not pid_alive(record.pid)
        )

    def _wait(self, tag: str, seen_at: float, record: LeaseRecord | None) -> None:
        """Take over once `tag` has been seen unchanged for a whole TTL (the longer of ours
        and the holder's); any change of tag restarts the wait."""
        if self._watch is None or self._watch[0] != tag:
            self._watch = (tag, seen_at)
        waited_s = seen_at - self._watch[1]
        wait_s = max(self.ttl_s, record.ttl_s if record is not None else 0.0)
        if waited_s >= wait_s:
            self._write(expected=tag, reason="holder stopped renewing")
            return
        log.debug(
            "lease.waiting",
            policy=self.policy,
            holder=self.holder,
            held_by=self._other[0],
            waited_s=round(waited_s, 3),
            wait_s=wait_s,
        )

    def _write(self, *, expected: str | None, reason: str) -> None:
        """Write our record over version `expected`: a renewal if held, else an acquisition."""
        renewing = self._held
        started = self._clock.monotonic()
        now = self._clock.now()
        since = self._acquired_at if renewing and self._acquired_at is not None else now
        record = LeaseRecord(
            policy=self.policy,
            holder=self.holder,
            host=self._host,
            pid_space=self._pid_space,
            pid=self._pid,
            acquired_at=since,
            renewed_at=now,
            ttl_s=self.ttl_s,
        )
        previous = self._other[0]
        try:
            self.storage.put_if(self.key, record.to_json(), expected=expected)
        except PreconditionFailed:
            self._watch = None
            if renewing:
                self._lose("renewal refused: the lease changed")
            else:
                log.debug("lease.waiting", policy=self.policy, holder=self.holder, lost_race=True)
            return
        self._valid_until = started + self.ttl_s * VALID_FRACTION
        self._watch = None
        if not renewing:
            self._held = True
            self._acquired_at = since
            self._other = (None, None)
            log.info(
                "lease.acquired",
                policy=self.policy,
                holder=self.holder,
                reason=reason,
                previous_holder=previous,
            )

    def _lose(self, reason: str) -> None:
        self._held = False
        self._valid_until = None
        self._acquired_at = None
        log.warning(
            "lease.lost", policy=self.policy, holder=self.holder, reason=reason, by=self._other[0]
        )

    def _state(self) -> LeaseState:
        holder, since = (self.holder, self._acquired_at) if self._held else self._other
        changed = self._held != self._reported_held
        self._reported_held = self._held
        return LeaseState(held=self._held, holder=holder, since=since, changed=changed)
