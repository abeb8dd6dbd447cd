"""zstd compression of byte streams: round trips, standard output, and damage detected."""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from drbot.errors import IntegrityFailure
from drbot.pipeline.compress import MAX_LEVEL, _FrameEnd, compress_chunks, decompress_chunks

pytestmark = pytest.mark.unit

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _data(size: int, seed: int) -> bytes:
    """Half random (incompressible), half runs (very compressible), in a seed-chosen order."""
    rng = random.Random(seed)
    parts = [rng.randbytes(size // 4), bytes(size // 4), b"row,of,csv\n" * (size // 44)]
    parts.append(rng.randbytes(size - sum(map(len, parts))))
    rng.shuffle(parts)
    return b"".join(parts)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(c % (len(data) + 1) for c in cuts)
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def _compress(data: bytes, level: int = 3, threads: int = 0) -> bytes:
    return b"".join(compress_chunks([data], level=level, threads=threads))


def _decompress(data: bytes) -> bytes:
    return b"".join(decompress_chunks([data]))


# --- round trips ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 60_000),
    seed=st.integers(0, 2**32),
    level=st.sampled_from([1, 3, 19]),
    threads=st.sampled_from([0, 2]),
    in_cuts=st.lists(st.integers(0, 2**31), max_size=12),
    out_cuts=st.lists(st.integers(0, 2**31), max_size=24),
)
@example(size=0, seed=0, level=1, threads=0, in_cuts=[], out_cuts=[])
@example(size=0, seed=0, level=19, threads=2, in_cuts=[0, 0], out_cuts=[0, 3])
@example(size=50_000, seed=1, level=3, threads=2, in_cuts=[1, 10_000], out_cuts=[5, 5, 900])
def test_round_trip_with_any_chunking(
    *, size: int, seed: int, level: int, threads: int, in_cuts: list[int], out_cuts: list[int]
) -> None:
    """Any input, cut any way going in and coming out (empty chunks included), round-trips."""
    data = _data(size, seed)
    compressed = list(compress_chunks(_split(data, in_cuts), level=level, threads=threads))
    assert all(compressed), "no empty compressed pieces are yielded"
    whole = b"".join(compressed)
    out = list(decompress_chunks(_split(whole, out_cuts)))
    assert all(out), "no empty plaintext pieces are yielded"
    assert b"".join(out) == data


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), level=st.sampled_from([1, 3, 19]))
def test_round_trip_small_binary_byte_at_a_time(data: bytes, level: int) -> None:
    compressed = _compress(data, level=level)
    chunks = [compressed[i : i + 1] for i in range(len(compressed))]
    assert b"".join(decompress_chunks(chunks)) == data


def test_highly_compressible_input_round_trips_in_bounded_pieces() -> None:
    """64 MiB of zeros shrinks to a few KiB; it comes back in pieces, not one huge buffer."""
    size = 64 << 20
    compressed = b"".join(compress_chunks(itertools.repeat(bytes(1 << 20), 64), level=1, threads=0))
    assert len(compressed) < 64 << 10
    total = 0
    largest = 0
    for piece in decompress_chunks([compressed]):
        assert not any(piece[:: 1 << 16])
        total += len(piece)
        largest = max(largest, len(piece))
    assert total == size
    assert largest <= 40 << 20


def test_compressed_output_comes_in_1_mib_pieces_with_worker_threads() -> None:
    """With zstd's workers the end of the frame holds every job in flight; it still comes in
    1 MiB pieces, so neither it nor the frames encrypted from it pile up at once."""
    rng = random.Random(7)
    chunks = [rng.randbytes(1 << 20) for _ in range(24)]  # incompressible: 24 MiB out
    pieces = list(compress_chunks(chunks, level=3, threads=2))
    assert {len(p) for p in pieces[:-1]} == {1 << 20}
    assert 0 < len(pieces[-1]) <= 1 << 20
    assert zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(pieces)) == b"".join(
        chunks
    )


def test_empty_input_compresses_to_a_valid_empty_frame() -> None:
    for chunks in ([], [b""], [b"", b""]):
        compressed = b"".join(compress_chunks(chunks, level=3, threads=0))
        assert compressed.startswith(ZSTD_MAGIC)
        assert list(decompress_chunks([compressed])) == []
        assert zstandard.ZstdDecompressor().decompress(compressed) == b""


# --- the output is standard zstd -----------------------------------------------------------------


@pytest.mark.parametrize(("level", "threads"), [(1, 0), (3, 2), (19, 0), (MAX_LEVEL, 2)])
def test_output_is_one_standard_zstd_frame_with_checksum(level: int, threads: int) -> None:
    data = _data(20_000, level)
    compressed = _compress(data, level=level, threads=threads)
    assert compressed.startswith(ZSTD_MAGIC)
    params = zstandard.get_frame_parameters(compressed)
    assert params.has_checksum
    # The frame does not record its content size (it is written as a stream), so the one-shot
    # API needs an output bound; the streaming APIs need nothing.
    plain = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=len(data))
    assert plain == data
    assert zstandard.ZstdDecompressor().decompressobj().decompress(compressed) == data
    assert zstandard.ZstdDecompressor().stream_reader(compressed).read() == data


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd command not installed")
def test_output_is_readable_by_the_zstd_command() -> None:
    data = _data(30_000, 9)
    zstd = shutil.which("zstd")
    assert zstd is not None
    result = subprocess.run(
        [zstd, "-d", "-c"], input=_compress(data, threads=2), capture_output=True, check=True
    )
    assert result.stdout == data


def test_standard_zstd_frames_are_accepted() -> None:
    """What decompress_chunks reads is plain zstd: frames made by zstandard directly work too."""
    data = _data(10_000, 4)
    for compressed in (
        zstandard.ZstdCompressor(level=5).compress(data),
        zstandard.ZstdCompressor(level=5, write_checksum=True).compress(data),
    ):
        assert _decompress(compressed) == data


def _trained_dictionary() -> zstandard.ZstdCompressionDict:
    """A trained dictionary, so frames carry a 4-byte dictionary id."""
    rng = random.Random(1)
    samples: list[bytes | bytearray | memoryview] = [
        f"user {i} likes {rng.choice(['tea', 'milk'])}, {rng.choice(['cats', 'dogs'])}".encode() * 3
        for i in range(3000)
    ]
    return zstandard.train_dictionary(2048, samples)


@pytest.mark.parametrize("size", [0, 1, 200, 300, 70_000, 300_000])
@pytest.mark.parametrize("content_size", [True, False])
@pytest.mark.parametrize("dictionary", [True, False])
def test_every_frame_header_layout_is_walked_to_its_end(
    size: int, content_size: bool, dictionary: bool
) -> None:
    """The end of the frame is found from its headers: content sizes of 1, 2, 4 and 8 bytes,
    single-segment frames, dictionary ids, raw, RLE and compressed blocks, with and without a
    checksum. A frame cut by one byte is truncated; one byte more is extra."""
    rng = random.Random(size)
    data = rng.randbytes(size // 2) + bytes(size - size // 2)  # raw blocks, then RLE blocks
    if size == 70_000:
        data = b"x" * size  # one value only: RLE from the start
    dict_data = _trained_dictionary() if dictionary else None
    for checksum in (True, False):
        compressor = zstandard.ZstdCompressor(
            level=3, write_checksum=checksum, write_content_size=content_size, dict_data=dict_data
        )
        compressed = compressor.compress(data)
        dctx = zstandard.ZstdDecompressor(dict_data=dict_data)
        assert dctx.decompress(compressed, max_output_size=max(size, 1)) == data
        assert zstandard.get_frame_parameters(compressed).dict_id == (
            dict_data.dict_id() if dict_data else 0
        )

        walker = _FrameEnd()
        for piece in _split(compressed, [size, 7, 3]):
            walker.feed(piece)
        assert walker.end == len(compressed)
        assert walker.extra_at is None
        cut = _FrameEnd()
        cut.feed(compressed[:-1])
        assert cut.end is None
        more = _FrameEnd()
        more.feed(compressed + b"\x00")
        assert more.extra_at == len(compressed)


# --- damage --------------------------------------------------------------------------------------

SAMPLE = _data(2_000, 42)
SAMPLE_Z = _compress(SAMPLE, level=3)


@pytest.mark.parametrize("level", [1, 19])
def test_truncation_at_every_byte_is_rejected(level: int) -> None:
    compressed = _compress(SAMPLE, level=level)
    for cut in range(len(compressed)):
        with pytest.raises(IntegrityFailure):
            _decompress(compressed[:cut])


def test_truncation_names_the_problem() -> None:
    with pytest.raises(IntegrityFailure, match="truncated"):
        _decompress(SAMPLE_Z[:-1])
    with pytest.raises(IntegrityFailure, match="truncated"):
        _decompress(SAMPLE_Z[: len(SAMPLE_Z) // 2])


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 20_000), seed=st.integers(0, 2**32), data=st.data())
def test_truncation_anywhere_is_rejected(size: int, seed: int, data: st.DataObject) -> None:
    compressed = _compress(_data(size, seed), level=1)
    cut = data.draw(st.integers(0, len(compressed) - 1), label="cut")
    with pytest.raises(IntegrityFailure):
        list(decompress_chunks(_split(compressed[:cut], [seed])))


@pytest.mark.parametrize("chunks", [[], [b""], [b"", b""]])
def test_empty_input_is_rejected(chunks: list[bytes]) -> None:
    with pytest.raises(IntegrityFailure, match="truncated"):
        list(decompress_chunks(chunks))


@pytest.mark.parametrize(
    "junk",
    [b"PGDMP\x01\x0e\x00", b"\x00" * 100, b"DRBOTENC" + bytes(200), b"x", ZSTD_MAGIC[:3] + b"\x00"],
)
def test_non_zstd_input_is_rejected(junk: bytes) -> None:
    with pytest.raises(IntegrityFailure):
        _decompress(junk)


def test_corrupted_byte_in_the_body_is_rejected() -> None:
    for offset in (len(SAMPLE_Z) // 3, len(SAMPLE_Z) // 2, len(SAMPLE_Z) - 10):
        damaged = bytearray(SAMPLE_Z)
        damaged[offset] ^= 0x40
        with pytest.raises(IntegrityFailure, match="corrupt"):
            _decompress(bytes(damaged))


def test_corrupted_content_checksum_is_rejected() -> None:
    for offset in range(len(SAMPLE_Z) - 4, len(SAMPLE_Z)):
        damaged = bytearray(SAMPLE_Z)
        damaged[offset] ^= 0x01
        with pytest.raises(IntegrityFailure, match="corrupt"):
            _decompress(bytes(damaged))


def test_every_bit_flip_past_the_frame_header_is_rejected() -> None:
    """Exhaustive over the blocks and checksum (the 6-byte frame header is magic, descriptor and
    window size: a few of its bits change nothing in the output, see the next test)."""
    compressed = _compress(_data(800, 7), level=3)
    for bit in range(6 * 8, len(compressed) * 8):
        damaged = bytearray(compressed)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(IntegrityFailure):
            _decompress(bytes(damaged))


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(0, 3_000),
    seed=st.integers(0, 2**32),
    level=st.sampled_from([1, 3, 19]),
    data=st.data(),
)
def test_any_bit_flip_never_yields_different_data(
    size: int, seed: int, level: int, data: st.DataObject
) -> None:
    """A flipped bit is rejected, or (for the few header bits zstd ignores, e.g. window size or a
    tiny block's header) decodes to exactly the original: never silently to something else.

    Which bits zstd ignores is its business; the content checksum guarantees the output. Every
    stored byte is also authenticated by the encryption layer before zstd sees it."""
    original = _data(size, seed)
    compressed = _compress(original, level=level)
    bit = data.draw(st.integers(0, len(compressed) * 8 - 1), label="bit")
    damaged = bytearray(compressed)
    damaged[bit // 8] ^= 1 << (bit % 8)
    try:
        out = _decompress(bytes(damaged))
    except IntegrityFailure:
        return
    assert out == original, f"flip of bit {bit} changed the output without an error"


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 5_000),
    garbage=st.binary(min_size=1, max_size=3000),
    separate=st.booleans(),
)
def test_extra_trailing_bytes_are_rejected(size: int, garbage: bytes, separate: bool) -> None:
    compressed = _compress(_data(size, size), level=3)
    chunks = [compressed, garbage] if separate else [compressed + garbage]
    with pytest.raises(IntegrityFailure, match="extra bytes after its end"):
        list(decompress_chunks(chunks))


def test_extra_bytes_report_their_offset() -> None:
    with pytest.raises(IntegrityFailure, match=rf"at compressed offset {len(SAMPLE_Z)}\)"):
        _decompress(SAMPLE_Z + b"\x00")
    with pytest.raises(IntegrityFailure, match=rf"at compressed offset {len(SAMPLE_Z)}\)"):
        list(decompress_chunks([SAMPLE_Z, b"\x00"]))


def test_second_concatenated_frame_is_rejected() -> None:
    """`zstd -d` would accept two concatenated frames; an artifact is exactly one."""
    with pytest.raises(IntegrityFailure, match="extra bytes"):
        _decompress(SAMPLE_Z + SAMPLE_Z)
    with pytest.raises(IntegrityFailure, match="extra bytes"):
        list(decompress_chunks([SAMPLE_Z, _compress(b"")]))


def test_trailing_empty_chunks_are_fine() -> None:
    assert b"".join(decompress_chunks([SAMPLE_Z, b"", b""])) == SAMPLE


# --- arguments and errors from the source ------------------------------------------------------


@pytest.mark.parametrize("level", [0, -1, MAX_LEVEL + 1, 100])
def test_bad_level_is_a_value_error(level: int) -> None:
    with pytest.raises(ValueError, match="zstd level"):
        next(compress_chunks([b"x"], level=level, threads=0))


def test_bad_threads_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="zstd threads"):
        next(compress_chunks([b"x"], level=3, threads=-2))


def test_default_threads_round_trips() -> None:
    assert _decompress(b"".join(compress_chunks([SAMPLE], level=3))) == SAMPLE


class _SourceError(Exception):
    pass


def _failing(after: list[bytes]) -> Iterator[bytes]:
    yield from after
    raise _SourceError("source failed")


def test_errors_from_the_source_propagate_unchanged() -> None:
    with pytest.raises(_SourceError):
        list(compress_chunks(_failing([b"abc"]), level=3, threads=0))
    with pytest.raises(_SourceError):
        list(decompress_chunks(_failing([SAMPLE_Z[:10]])))
