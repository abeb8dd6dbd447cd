"""Turn a policy's key reference ("file:PATH" or "kms:REF") into a KeyProvider."""

from __future__ import annotations

from pathlib import Path

from drbot.errors import PolicyInvalid
from drbot.pipeline.filekey import FileKeyProvider
from drbot.pipeline.keys import KeyProvider

_EXPECTED = "expected 'file:PATH' or 'kms:ALIAS-KEY-ID-OR-ARN'"


def key_provider_from_ref(ref: str, *, endpoint_url: str | None = None) -> KeyProvider:
    """The KeyProvider for `ref`; nothing is read or contacted until the provider is used.

    `endpoint_url` applies to KMS only. Raises PolicyInvalid for an unknown scheme or an empty
    path/reference. The message shows at most the scheme of a malformed reference, never the
    rest, in case someone pasted key material where a reference belongs.
    """
    scheme, sep, rest = ref.partition(":")
    if not sep:
        raise PolicyInvalid(f"key reference has no 'file:' or 'kms:' prefix; {_EXPECTED}")
    if scheme == "file":
        if not rest:
            raise PolicyInvalid(f"key reference 'file:' names no path; {_EXPECTED}")
        return FileKeyProvider(Path(rest))
    if scheme == "kms":
        if not rest:
            raise PolicyInvalid(f"key reference 'kms:' names no key; {_EXPECTED}")
        # boto3 costs a third of a second to import; only KMS policies pay for it.
        from drbot.pipeline.kms import KmsKeyProvider

        return KmsKeyProvider(rest, endpoint_url=endpoint_url)
    shown = scheme if scheme.isalnum() and len(scheme) <= 16 else "?"
    raise PolicyInvalid(f"key reference scheme '{shown}:' is not supported; {_EXPECTED}")


def key_ref_needs_region(ref: str) -> bool:
    """Whether keys of `ref` live in a region, so every destination must name one (kms: keys)."""
    return ref.startswith("kms:")
