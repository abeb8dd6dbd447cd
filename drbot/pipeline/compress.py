"""zstd compression of byte streams, streaming and in constant memory.

Compression runs before encryption (ciphertext does not compress). The compressed form of one
artifact is exactly one zstd frame with a content checksum, so any zstd tool can read it
(`zstd -d`), and a stream cut short is detected rather than silently yielding less data.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator

import zstandard

from drbot.errors import IntegrityFailure

MIN_LEVEL = 1
MAX_LEVEL = 22

# Compressed input is fed to the decompressor in slices this small because one zstd block of
# 3-4 bytes can expand to 128 KiB (runs of zeros: whole WAL segments shrink to a few hundred
# bytes). A 1 KiB slice therefore produces at most ~32 MiB per step, whatever the input chunk
# size; measured overhead against whole-chunk feeding is within noise (~1 GB/s either way).
_DECOMPRESS_SLICE = 1024


def compress_chunks(
    chunks: Iterable[bytes], *, level: int, threads: int = -1
) -> Generator[bytes, None, None]:
    """Compress `chunks` into one zstd frame (content checksum on), yielding output as produced.

    `level` is the zstd level (1..22); `threads` the number of zstd worker threads: -1 uses
    every core, 0 compresses in the calling thread. Memory stays bounded by zstd's window and
    job sizes for the level, independent of the input's length; empty pieces are never yielded.

    Raises `ValueError` for a level outside 1..22 or threads below -1. Exceptions raised by
    `chunks` propagate unchanged.
    """
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be {MIN_LEVEL}..{MAX_LEVEL}, got {level}")
    if threads < -1:
        raise ValueError(f"zstd threads must be -1 (all cores), 0 or more, got {threads}")
    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    cobj = compressor.compressobj()
    for chunk in chunks:
        if not chunk:
            continue
        out = cobj.compress(chunk)
        if out:
            yield out
    tail = cobj.flush()
    if tail:
        yield tail


def decompress_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress one zstd frame arriving as `chunks` of any sizes, yielding plaintext pieces.

    Memory stays bounded (zstd's window plus at most ~32 MiB of output per step) however
    compressible the data is. Yields no empty pieces.

    Raises `IntegrityFailure` if the input is not zstd, is corrupt (including a content
    checksum mismatch), ends before the frame does (including empty input), or carries bytes
    after the frame. Exceptions raised by `chunks` propagate unchanged.
    """
    dobj = zstandard.ZstdDecompressor().decompressobj()
    consumed = 0
    for chunk in chunks:
        view = memoryview(chunk)
        for start in range(0, len(view), _DECOMPRESS_SLICE):
            if dobj.eof:
                raise IntegrityFailure(
                    f"zstd stream has extra bytes after its end (at compressed offset {consumed})"
                )
            piece = view[start : start + _DECOMPRESS_SLICE]
            try:
                out = dobj.decompress(piece)
            except zstandard.ZstdError as exc:
                raise IntegrityFailure(
                    f"zstd stream is corrupt near compressed offset {consumed}: {exc}"
                ) from exc
            consumed += len(piece)
            if out:
                yield out
        if dobj.eof and dobj.unused_data:
            raise IntegrityFailure(
                "zstd stream has extra bytes after its end "
                f"(at compressed offset {consumed - len(dobj.unused_data)})"
            )
    if not dobj.eof:
        raise IntegrityFailure(
            f"zstd stream is truncated: it ends after {consumed} compressed bytes, "
            "before the end of its frame"
        )
