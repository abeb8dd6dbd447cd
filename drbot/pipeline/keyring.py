"""A policy's current key plus the keys it rotated away from, as one KeyProvider.

New data keys are always wrapped by the current key. Unwrapping goes to the key that made the
wrapped key (by key id), so during and after a rotation (`drbot keys rotate`), a backup opens
whichever of the keys wraps it. See docs/keys.md, "Rotation".
"""

from __future__ import annotations

from collections.abc import Sequence

from drbot.errors import KeyProblem
from drbot.pipeline.keys import KeyProvider, WrappedKey


class KeyRing:
    """KeyProvider: wraps with `current`, unwraps with whichever of the keys made the blob."""

    def __init__(self, current: KeyProvider, previous: Sequence[KeyProvider]) -> None:
        self.current = current
        self.previous = list(previous)

    def describe(self) -> str:
        return self.current.describe()

    def key_id(self, region: str | None) -> str:
        return self.current.key_id(region)

    def generate(self, region: str | None) -> tuple[bytes, WrappedKey]:
        return self.current.generate(region)

    def wrap(self, data_key: bytes, region: str | None) -> WrappedKey:
        return self.current.wrap(data_key, region)

    def unwrap(self, wrapped: WrappedKey, region: str | None) -> bytes:
        """The data key, from the key whose id made `wrapped`. The error raised is that key's
        own (e.g. "too permissive") when one of them made it, else the current key's (which
        names the key the blob needs)."""
        current_error: KeyProblem | None = None
        for provider in (self.current, *self.previous):
            try:
                made_it = provider.key_id(region) == wrapped.key_id
            except KeyProblem as exc:
                made_it = False
                if provider is self.current:
                    current_error = exc
                    continue
            if not made_it and provider is not self.current:
                continue
            try:
                return provider.unwrap(wrapped, region)
            except KeyProblem as exc:
                if made_it:
                    raise
                current_error = current_error or exc
        assert current_error is not None  # the current key was tried and failed
        raise current_error


def ring(current: KeyProvider, previous: Sequence[KeyProvider]) -> KeyProvider:
    return KeyRing(current, previous) if previous else current
