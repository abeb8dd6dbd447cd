"""zstd compression of byte streams, streaming and in constant memory.

Compression runs before encryption (ciphertext does not compress). The compressed form of one
artifact is exactly one zstd frame with a content checksum, so any zstd tool can read it
(`zstd -d`), and a stream cut short is detected rather than silently yielding less data.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from typing import IO, Protocol, cast

import zstandard

from drbot.errors import IntegrityFailure

MIN_LEVEL = 1
MAX_LEVEL = 22


class _Chunker(Protocol):
    """zstandard's ZstdCompressionChunker, typed (its stubs leave `finish` untyped)."""

    def compress(self, data: bytes) -> Iterator[bytes]: ...

    def finish(self) -> Iterator[bytes]: ...


# Decompressed output comes in pieces of at most this size, whatever the compression ratio (a
# few bytes of a zstd block can expand to 128 KiB: whole WAL segments of zeros shrink to a few
# hundred bytes), so memory stays bounded and the per-piece cost stays small.
_OUT_BYTES = 1 << 20
_JOB_BYTES = 4 << 20
_READ_BYTES = 1 << 20
_MAGIC = 0xFD2FB528
_FCS_BYTES = (0, 2, 4, 8)  # by Frame_Content_Size_flag (flag 0 means 1 byte with Single_Segment)
_DID_BYTES = (0, 1, 2, 4)


class _FrameEnd:
    """Where one zstd frame ends, found by walking its block headers (RFC 8878, 3.1.1).

    python-zstandard's readers end quietly when their input ends inside a frame, so whether the
    frame was whole is decided here: every block header gives its block's length and whether it
    is the last, and the frame ends after the last block (and its 4-byte checksum, if flagged).
    This reads 3 bytes per block (128 KiB of output), never the data.
    """

    __slots__ = ("_got", "_need", "_skip", "_then", "checksum", "end", "extra_at", "offset")

    def __init__(self) -> None:
        self.offset = 0  # compressed bytes seen
        self.end: int | None = None  # offset just past the frame, once reached
        self.extra_at: int | None = None  # offset of the first byte after the frame
        self.checksum = False
        self._skip = 0
        self._need = 5  # magic and frame header descriptor
        self._got = bytearray()
        self._then = self._frame_start

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self.end is not None:
                self.extra_at = self.end
                return
            if self._skip:
                take = min(self._skip, len(view))
                self._skip -= take
                self.offset += take
                view = view[take:]
                if not self._skip and self._need == 0:
                    self._then(b"")
                continue
            take = min(self._need - len(self._got), len(view))
            self._got += view[:take]
            self.offset += take
            view = view[take:]
            if len(self._got) == self._need:
                got = bytes(self._got)
                self._got.clear()
                self._then(got)

    def _expect(self, need: int, then: object, skip: int = 0) -> None:
        self._need, self._then, self._skip = need, then, skip  # type: ignore[assignment]
        if need == 0 and skip == 0:
            self._then(b"")

    def _frame_start(self, got: bytes) -> None:
        if int.from_bytes(got[:4], "little") != _MAGIC:
            raise IntegrityFailure("not a zstd stream (bad magic bytes at compressed offset 0)")
        fhd = got[4]
        single = bool(fhd & 0x20)
        self.checksum = bool(fhd & 0x04)
        fcs = _FCS_BYTES[fhd >> 6] or (1 if single else 0)
        rest = (0 if single else 1) + _DID_BYTES[fhd & 0x03] + fcs
        self._expect(0, self._block_header, skip=rest) if rest else self._expect(3, self._block)

    def _block_header(self, _got: bytes) -> None:
        self._expect(3, self._block)

    def _block(self, got: bytes) -> None:
        header = int.from_bytes(got, "little")
        last = header & 1
        kind = (header >> 1) & 3
        size = header >> 3
        length = 1 if kind == 1 else size
        if last:
            tail = 4 if self.checksum else 0
            self._expect(0, self._frame_end, skip=length + tail)
        else:
            self._expect(0, self._block_header, skip=length)

    def _frame_end(self, _got: bytes) -> None:
        self.end = self.offset


class _Source:
    """A file-like view of `chunks` for zstd's reader, telling `frames` every byte it hands on."""

    def __init__(self, chunks: Iterable[bytes], frames: _FrameEnd) -> None:
        self._it = iter(chunks)
        self._frames = frames
        self._whole = b""
        self._chunk = memoryview(b"")
        self.consumed = 0

    def read(self, n: int = -1) -> bytes:
        while not self._chunk:
            try:
                self._whole = next(self._it)
            except StopIteration:
                return b""
            self._chunk = memoryview(self._whole)
        take = len(self._chunk) if n < 0 else min(n, len(self._chunk))
        # A whole chunk is handed on as it is; only a part of one is copied out.
        out = self._whole if take == len(self._whole) else self._chunk[:take].tobytes()
        self._chunk = self._chunk[take:]
        self._frames.feed(out)
        self.consumed += take
        return out

    def drain(self) -> None:
        """Hand the rest of the input to `frames` (bytes after the frame are an error)."""
        while self._frames.extra_at is None and self.read(_READ_BYTES):
            pass


def compress_chunks(
    chunks: Iterable[bytes], *, level: int, threads: int = -1
) -> Generator[bytes, None, None]:
    """Compress `chunks` into one zstd frame (content checksum on), yielding 1 MiB pieces (the
    last one shorter) as they fill.

    `level` is the zstd level (1..22); `threads` the number of zstd worker threads: -1 uses
    every core, 0 compresses in the calling thread. Memory stays bounded by zstd's window and
    job sizes for the level, independent of the input's length; empty pieces are never yielded.
    Fixed pieces rather than whatever each call returns: with worker threads, the end of the
    frame arrived as one piece holding every job still in flight (10 MiB at level 3), and the
    frames sealed from it all at once; the peak RSS of a logical backup fell by 17 MiB.

    Raises `ValueError` for a level outside 1..22 or threads below -1. Exceptions raised by
    `chunks` propagate unchanged.
    """
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be {MIN_LEVEL}..{MAX_LEVEL}, got {level}")
    if threads < -1:
        raise ValueError(f"zstd threads must be -1 (all cores), 0 or more, got {threads}")
    if threads:
        # zstd's default job for levels 1-9 is 4x the window (8 MiB at level 3): with 2
        # workers that held ~70 MiB of buffers. 4 MiB jobs hold ~35 MiB, compress as fast, and
        # cost under 0.1 % of ratio (1.6 GiB base backup, level 3). Higher levels' defaults
        # are larger still; zstd raises a job below its minimum for the window itself.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=threads, job_size=_JOB_BYTES, write_checksum=True
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
    else:
        compressor = zstandard.ZstdCompressor(level=level, threads=0, write_checksum=True)
    chunker = cast(_Chunker, compressor.chunker(chunk_size=_OUT_BYTES))
    for chunk in chunks:
        if chunk:
            yield from chunker.compress(chunk)
    yield from chunker.finish()


def decompress_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress one zstd frame arriving as `chunks` of any sizes, yielding plaintext pieces.

    Pieces are at most 1 MiB, so memory stays bounded (zstd's window plus one piece) however
    compressible the data is. Yields no empty pieces.

    Raises `IntegrityFailure` if the input is not zstd, is corrupt (including a content
    checksum mismatch), ends before the frame does (including empty input), or carries bytes
    after the frame. Exceptions raised by `chunks` propagate unchanged.
    """
    frames = _FrameEnd()
    source = _Source(chunks, frames)
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], source),  # zstd calls only read()
        read_size=_READ_BYTES,
        read_across_frames=False,
        closefd=False,
    )
    while True:
        try:
            out = reader.read(_OUT_BYTES)
        except zstandard.ZstdError as exc:
            if frames.extra_at is not None:  # zstd read on past the end of the frame
                break
            raise IntegrityFailure(
                f"zstd stream is corrupt near compressed offset {source.consumed}: {exc}"
            ) from exc
        if not out:
            break
        yield out
    source.drain()
    if frames.extra_at is not None:
        raise IntegrityFailure(
            f"zstd stream has extra bytes after its end (at compressed offset {frames.extra_at})"
        )
    if frames.end is None:
        raise IntegrityFailure(
            f"zstd stream is truncated: it ends after {source.consumed} compressed bytes, "
            "before the end of its frame"
        )
