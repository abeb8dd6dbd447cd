"""drbot's CLI with encryption replaced by a pass-through: for the benchmark only.

    .venv/bin/python -m bench.plain backup --policy NAME

The issue's target "encryption ≤ 5 % of backup wall time" is measured by running the same
backup with and without AES-256-GCM. drbot itself has no switch for that, on purpose: an
unencrypted backup must not be one setting away. This module swaps the stream encryptor for
one that hands the compressed bytes on unchanged, in this process only, then runs the CLI.

What it stores is not a drbot stream (no header, no frames) and cannot be restored; point it
only at a benchmark's own destination. Everything else (dump, compression, storage, read-back,
manifest) is drbot's real code path.
"""

from __future__ import annotations

import drbot.ops.backup
from drbot.pipeline.keys import WrappedKey


class PassThrough:
    """The `StreamEncryptor` interface with the identity for a cipher."""

    def __init__(self, data_key: bytes, *, frame_size: int) -> None:
        del data_key, frame_size

    def header(self, wrapped: WrappedKey) -> bytes:
        del wrapped
        return b""

    def update(self, data: bytes) -> list[bytes]:
        return [bytes(data)] if data else []

    def finish(self) -> bytes:
        return b""


def main() -> None:
    # setattr: the module's name is looked up when a backup runs, so this reaches every use.
    setattr(drbot.ops.backup, "StreamEncryptor", PassThrough)  # noqa: B010
    from drbot.cli.main import main as drbot_main

    drbot_main()


if __name__ == "__main__":
    main()
