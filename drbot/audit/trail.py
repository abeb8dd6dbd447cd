"""The local audit trail: an append-only file of signed, hash-chained events.

Appends are serialised across processes with an flock on the trail itself (a daemon and a
person's `drbot restore` may write at once), each event is one `write` of one line followed by
fsync, and the chain head is re-read from the file under the lock, so no two events ever share
a sequence number.

A crash mid-append can leave a torn last line. It is never dropped or rewritten: the next
append ends it with a newline and first records an `audit.torn_line` event naming its byte
offset, length and SHA-256, so the damage stays visible and the chain stays verifiable.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from drbot.audit.event import GENESIS, AuditEvent, EventFormatError, parse_line, seal
from drbot.clock import Clock
from drbot.errors import DrbotError, IntegrityFailure, KeyProblem
from drbot.pipeline.filekey import generate_key_file, read_key_file

TRAIL_NAME = "trail.jsonl"
KEY_NAME = "audit.key"
PUBLIC_NAME = "audit.pub"
_TAIL_PROBE = 1 << 16  # first read-back from the end; doubled until the last event fits


class AuditSink(Protocol):
    """Where audit events go.

    `record` appends one event and returns it sealed. It raises `DrbotError` if the event cannot
    be made durable (unwritable trail, unreadable audit key: `KeyProblem`) and `IntegrityFailure`
    if the trail's last whole event is damaged, since extending a broken chain would hide it.
    """

    def record(
        self,
        action: str,
        *,
        policy: str | None = None,
        subject: dict[str, Any] | None = None,
        outcome: str = "ok",
        details: dict[str, Any] | None = None,
    ) -> AuditEvent: ...


def default_actor() -> str:
    """user@host of this process: who did it, for events a person caused."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def load_signing_key(path: Path, *, create: bool = True) -> Ed25519PrivateKey:
    """The Ed25519 audit key in `path` (a 32-byte seed, base64, mode 0600); created if absent.

    Creation and first read happen under an flock beside the key, so processes starting at
    once on a fresh directory all end up with the one key (never a half-written file).
    """
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyProblem(
                f"cannot create the audit key {path}: {exc.strerror or exc}",
                hint="set DRBOT_AUDIT_DIR (or DRBOT_AUDIT_KEY) to a place drbot can write",
            ) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                generate_key_file(path)
        finally:
            os.close(lock)
    return Ed25519PrivateKey.from_private_bytes(read_key_file(path))


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file as written by drbot (64 hex digits); KeyProblem if it is not one."""
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(path.read_text().strip()))
    except (OSError, ValueError) as exc:
        raise KeyProblem(f"cannot read audit public key {path}: {exc}") from None


class FileAuditTrail:
    """AuditSink appending to `<directory>/trail.jsonl`, publishing `audit.pub` beside it."""

    def __init__(
        self,
        directory: Path,
        clock: Clock,
        *,
        key_path: Path | None = None,
        actor: str | None = None,
    ) -> None:
        self.directory = directory
        self.path = directory / TRAIL_NAME
        self.key_path = key_path or directory / KEY_NAME
        self.actor = actor or default_actor()
        self.host = socket.gethostname()
        self._clock = clock
        self._key: Ed25519PrivateKey | None = None

    def signing_key(self) -> Ed25519PrivateKey:
        """The audit key (created and published on first use); other signed evidence, such as
        drill records, is signed with it too."""
        return self._signing_key()

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key = load_signing_key(self.key_path)
            public = self.directory / PUBLIC_NAME
            text = public_key_text(self._key.public_key()) + "\n"
            try:
                if not public.exists() or public.read_text() != text:
                    tmp = public.with_name(f".{public.name}.{secrets.token_hex(6)}")
                    tmp.write_text(text)
                    tmp.replace(public)
            except OSError as exc:
                raise DrbotError(
                    f"cannot publish the audit public key {public}: {exc.strerror or exc}",
                    hint="set DRBOT_AUDIT_DIR to a directory drbot can write",
                ) from None
        return self._key

    @contextmanager
    def _locked(self) -> Iterator[int]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise DrbotError(
                f"cannot open the audit trail {self.path}: {exc.strerror or exc}",
                hint="set DRBOT_AUDIT_DIR to a directory drbot can write",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def record(
        self,
        action: str,
        *,
        policy: str | None = None,
        subject: dict[str, Any] | None = None,
        outcome: str = "ok",
        details: dict[str, Any] | None = None,
    ) -> AuditEvent:
        key = self._signing_key()
        with self._locked() as fd:
            head, torn, needs_newline = _read_head(fd, self.path)
            seq, prev = (head.seq, head.hash) if head is not None else (0, GENESIS)
            out = b"\n" if needs_newline or (torn and not torn[-1][2]) else b""
            for offset, data, _ in torn:
                marker = self._event(
                    seq + 1,
                    prev,
                    "audit.torn_line",
                    None,
                    {"offset": offset},
                    "info",
                    {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
                    key,
                )
                out += marker.to_line()
                seq, prev = marker.seq, marker.hash
            event = self._event(
                seq + 1, prev, action, policy, subject or {}, outcome, details or {}, key
            )
            out += event.to_line()
            try:
                view = memoryview(out)
                while view:  # a short write (disk full, signal) must not pass as durable
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                raise DrbotError(
                    f"cannot append to the audit trail {self.path}: {exc.strerror or exc}"
                ) from None
        return event

    def _event(
        self,
        seq: int,
        prev: str,
        action: str,
        policy: str | None,
        subject: dict[str, Any],
        outcome: str,
        details: dict[str, Any],
        key: Ed25519PrivateKey,
    ) -> AuditEvent:
        when = self._clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return seal(
            AuditEvent(
                seq=seq,
                time=when,
                actor=self.actor,
                host=self.host,
                action=action,
                policy=policy,
                subject=subject,
                outcome=outcome,
                details=details,
                prev=prev,
            ),
            key,
        )


class _NeedMore(Exception):
    pass


# (offset, bytes, ends with a newline) of each line after the head that is not an event.
_Torn = list[tuple[int, bytes, bool]]


def _read_head(fd: int, path: Path) -> tuple[AuditEvent | None, _Torn, bool]:
    """The last whole event, the lines after it that are not events (crash debris: a torn
    line, or a repair that was itself cut short), and whether the last event lacks only its
    newline. Reads back from the end as far as needed.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None, [], False
    probe = _TAIL_PROBE
    while True:
        start = max(0, size - probe)
        tail = os.pread(fd, size - start, start)
        try:
            return _head_in(tail, start, path)
        except _NeedMore:
            probe *= 2


_MAX_DEBRIS = 16  # more consecutive non-events than crashes explain: someone edited the file


def _head_in(tail: bytes, start: int, path: Path) -> tuple[AuditEvent | None, _Torn, bool]:
    complete = start == 0  # `tail` is the whole file
    debris: _Torn = []
    end = len(tail)
    while True:
        cut = tail.rfind(b"\n", 0, end - 1 if tail[end - 1 : end] == b"\n" else end) + 1
        if cut == 0 and not complete:
            raise _NeedMore
        line = tail[cut:end]
        newline = line.endswith(b"\n")
        body = line[:-1] if newline else line
        try:
            event = parse_line(body)
        except EventFormatError as exc:
            # Only a crash leaves debris, and a crash always leaves the very last line
            # unfinished; a bad line that ends properly was changed by someone.
            last_is_torn = (not debris and not newline) or (bool(debris) and not debris[-1][2])
            debris.insert(0, (start + cut, body, newline))
            if not last_is_torn or len(debris) > _MAX_DEBRIS:
                raise IntegrityFailure(
                    f"{path}: the last whole event is damaged ({exc}); not extending a broken "
                    "chain",
                    hint="run `drbot audit verify` to see where the trail was changed",
                ) from None
            if cut == 0:
                return None, debris, False  # nothing but debris: the first appends were torn
            end = cut
            continue
        return event, debris, not newline and not debris
