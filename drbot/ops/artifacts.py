"""Reading an artifact back: bytes from a destination, checked, authenticated, decompressed."""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable, Iterator

from drbot.errors import IntegrityFailure
from drbot.manifest import ArtifactRecord
from drbot.pipeline.compress import decompress_chunks
from drbot.pipeline.keys import WrappedKey
from drbot.pipeline.prefetch import prefetch
from drbot.pipeline.stream import decrypt_chunks
from drbot.storage.base import Storage


def _checked(chunks: Iterable[bytes], rec: ArtifactRecord, where: str) -> Iterator[bytes]:
    """Pass bytes through; at the end, fail unless size and SHA-256 match the manifest.

    The check fires before the decryptor can release the final frame, so a consumer (such as
    pg_restore) never sees a complete stream from an object that does not match.
    """
    sha = hashlib.sha256()
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > rec.size_bytes:
            raise IntegrityFailure(f"{where}: longer than the {rec.size_bytes} bytes recorded")
        sha.update(chunk)
        yield chunk
    if size != rec.size_bytes:
        raise IntegrityFailure(f"{where}: {size} bytes, the manifest records {rec.size_bytes}")
    if sha.hexdigest() != rec.sha256:
        raise IntegrityFailure(
            f"{where}: SHA-256 {sha.hexdigest()[:16]}… does not match the manifest's "
            f"{rec.sha256[:16]}…"
        )


def read_artifact(
    storage: Storage, rec: ArtifactRecord, data_key: bytes
) -> Generator[bytes, None, None]:
    """The artifact's plaintext (the engine's dump bytes), streamed and fully checked.

    The data key comes from the manifest, not from the object's header: after a key rotation
    (`drbot keys rotate`) the manifest holds the data key wrapped under the new key while the
    object, never rewritten, still carries the old wrapping. The header is authenticated with
    that data key, so an object from another backup (another data key) fails all the same.

    Raises `IntegrityFailure` naming destination and object for any mismatch (size, SHA-256, a
    header or frame that fails authentication), `ObjectNotFound` if the object is gone,
    `StorageUnavailable` if the destination is unreachable.
    """
    where = f"{storage.name}:{rec.key}"

    def unwrap(_found: WrappedKey) -> bytes:
        return data_key

    # Reading and decrypting run in a thread of their own, ahead of decompression: zstd's
    # decompression of one frame is serial, and it was the slowest stage of a restore.
    plain = prefetch(decrypt_chunks(_checked(storage.open(rec.key), rec, where), unwrap))
    try:
        yield from decompress_chunks(plain)
    except IntegrityFailure as exc:
        if exc.message.startswith(where):
            raise
        raise IntegrityFailure(f"{where}: {exc.message}", hint=exc.hint) from exc
    finally:
        plain.close()  # stops the reading thread, whatever ended the reading
