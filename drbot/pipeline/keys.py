"""The KeyProvider protocol: how per-backup data keys are wrapped and unwrapped.

drbot encrypts every backup under a fresh random 32-byte data key; the policy's key (a key file,
or an AWS KMS key per region) only ever wraps that data key. Manifests record the key id,
never a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WrappedKey:
    """A data key wrapped by a policy key: which key wrapped it and the opaque wrapped bytes."""

    key_id: str
    blob: bytes


class KeyProvider(Protocol):
    """Wraps and unwraps data keys with the policy's key.

    `region` is the destination's region: a KMS provider wraps with that region's key, so a
    restore from a replica region never needs the primary region. File providers ignore it.

    Errors: every failure (missing or unreadable key, key file readable by group/others, key
    service refused or unreachable, a wrapped key made by another key or tampered) raises
    `drbot.errors.KeyProblem` with a message naming the key (never its bytes).
    """

    def describe(self) -> str:
        """The key reference as written in the policy (e.g. 'file:/keys/shop.key'), for messages."""
        ...

    def key_id(self, region: str | None) -> str:
        """Stable id of the key that `wrap` uses for `region`; safe to publish."""
        ...

    def generate(self, region: str | None) -> tuple[bytes, WrappedKey]:
        """A fresh random 32-byte data key and its wrapping for `region`."""
        ...

    def wrap(self, data_key: bytes, region: str | None) -> WrappedKey:
        """Wrap an existing data key for `region` (used for every destination after the first)."""
        ...

    def unwrap(self, wrapped: WrappedKey, region: str | None) -> bytes:
        """The 32-byte data key inside `wrapped`; `KeyProblem` if this provider cannot open it."""
        ...
