"""drbot's exception tree.

Every error a person can meet is a `DrbotError` carrying its exit code (a public contract, see
docs/design.md), whether retrying may help, and an optional hint ("Try: ...") for the reader.
Adapters translate other libraries' exceptions into these at the boundary; only the CLI turns
them into exit codes and text.
"""

from __future__ import annotations

from typing import ClassVar


class DrbotError(Exception):
    """Root of every error drbot raises on purpose."""

    exit_code: ClassVar[int] = 1
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(DrbotError):
    """The command was asked for something that cannot be done as asked."""

    exit_code = 2


class PartialFailure(DrbotError):
    """Part of the work succeeded (e.g. one destination of two); the rest failed."""

    exit_code = 3


class NoRestorePoint(DrbotError):
    """No complete backup (or restore point) matches what was asked for."""

    exit_code = 10


class LockHeld(DrbotError):
    """Another drbot process holds the lock for this policy."""

    exit_code = 11


class PreconditionFailed(LockHeld):
    """A conditional write lost: the object changed (or appeared) since it was read.

    Only the lease uses conditional writes; losing one means another process holds it.
    """


class KeyProblem(DrbotError):
    """A key is missing, unreadable, too open, wrong, or the key service refused."""

    exit_code = 12


class IntegrityFailure(DrbotError):
    """Stored data does not match what was written: corrupt, truncated, tampered or missing."""

    exit_code = 13


class SourceUnavailable(DrbotError):
    """The database cannot be reached or refused the connection."""

    exit_code = 14
    retryable = True


class StorageUnavailable(DrbotError):
    """A destination cannot be reached or keeps failing after retries."""

    exit_code = 15
    retryable = True


class ObjectNotFound(DrbotError):
    """A stored object that should exist does not (a missing object is an integrity problem)."""

    exit_code = 13


class PolicyInvalid(DrbotError):
    """A policy or setting is malformed; the message names file, field path and problem."""

    exit_code = 16


class SandboxUnavailable(DrbotError):
    """A drill's sandbox could not be provisioned (no Docker engine, no image, no binaries)."""

    exit_code = 17


class KeyInUse(DrbotError):
    """A key about to be retired still wraps backups or WAL (`drbot keys check`)."""

    exit_code = 18


class DrillFailed(DrbotError):
    """A drill ran but missed its checks or its RTO/RPO targets."""

    exit_code = 20


class DatabaseError(DrbotError):
    """The database (or its dump/restore tool) reported an error while doing the work."""

    exit_code = 1


class Interrupted(DrbotError):
    """The work was interrupted (Ctrl-C, SIGTERM) and cleaned up."""

    exit_code = 130


class ChangeHistoryLost(NoRestorePoint):
    """The source no longer holds the change history needed to continue without a gap.

    MongoDB answers ChangeStreamHistoryLost when a resume point has left its oplog window; the
    changes in between are gone for good and only a new full backup closes the gap.
    """
