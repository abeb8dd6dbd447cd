"""Crypto-shredding: destroy a policy's keys so none of its backups can ever be decrypted,
even where object lock keeps their bytes (how an erasure request meets immutable backups).

A key file is overwritten with random bytes, flushed to disk and removed; a KMS key is
scheduled for deletion in every destination's region (KMS waits 7 to 30 days, during which
the deletion can be cancelled in AWS; the data stays unreadable by drbot only once it is gone).
A key another policy also uses is never destroyed: the caller checks that first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from drbot.errors import KeyProblem
from drbot.pipeline.filekey import FileKeyProvider
from drbot.pipeline.keys import KeyProvider

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Shredded:
    ref: str
    key_ids: tuple[str, ...]
    how: str


def same_key(a: str, b: str) -> bool:
    """Whether two key references name the same key (file paths compared resolved)."""
    if a.startswith("file:") and b.startswith("file:"):
        return Path(a[5:]).resolve() == Path(b[5:]).resolve()
    return a == b


class ShredRecord:
    """The key ids a shred of a policy destroyed so far, kept in the state directory, so an
    interrupted shred run again still knows the ids of key files it already removed."""

    def __init__(self, state_dir: Path, policy: str) -> None:
        self.path = state_dir / "shredded" / f"{policy}.json"

    def destroyed(self) -> set[str]:
        try:
            return set(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return set()

    def add(self, key_ids: Sequence[str]) -> None:
        ids = sorted(self.destroyed() | set(key_ids))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(ids) + "\n")
        tmp.replace(self.path)


def shred(provider: KeyProvider, regions: Sequence[str | None], *, kms_days: int = 7) -> Shredded:
    """Destroy the key behind `provider`; see the module docstring. Raises `KeyProblem`."""
    ref = provider.describe()
    if isinstance(provider, FileKeyProvider):
        key_id = provider.key_id(None)  # also proves it is the key file it claims to be
        _overwrite_and_remove(provider.path)
        log.warning("keys.shredded", key=ref, key_id=key_id)
        return Shredded(ref, (key_id,), "overwritten and removed")
    from drbot.pipeline.kms import KmsKeyProvider

    if not isinstance(provider, KmsKeyProvider):
        raise KeyProblem(f"drbot cannot destroy key {ref}")
    arns = tuple(dict.fromkeys(provider.schedule_deletion(str(r), kms_days) for r in regions))
    log.warning("keys.shredded", key=ref, key_ids=list(arns), days=kms_days)
    return Shredded(ref, arns, f"scheduled for deletion in {kms_days} days")


def _overwrite_and_remove(path: Path) -> None:
    try:
        size = path.stat().st_size
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, os.urandom(max(size, 64)))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise KeyProblem(f"cannot destroy key file {path}: {exc.strerror or exc}") from None
