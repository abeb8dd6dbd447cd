"""The encrypted stream format v1: round trips, and every way of tampering with a stream fails."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random
import struct
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import example, given, settings
from hypothesis import strategies as st

from drbot.errors import IntegrityFailure
from drbot.pipeline.keys import WrappedKey
from drbot.pipeline.stream import (
    HEADER_TAG_BYTES,
    MAGIC,
    MAX_FRAME_SIZE,
    TAG_BYTES,
    StreamEncryptor,
    decrypt_chunks,
    encrypt_chunks,
    parse_header,
)

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
WRAPPED = WrappedKey(key_id="file:0123456789abcdef", blob=bytes(range(60)))
SHARED_LEN = 8 + 1 + 4 + 32 + 7  # magic, version, frame size, salt, nonce prefix


def _unwrap_to(key: bytes) -> Callable[[WrappedKey], bytes]:
    """An unwrap that ignores the wrapped key: the header tag alone must catch tampering."""

    def unwrap(_wrapped: WrappedKey) -> bytes:
        return key

    return unwrap


def _encrypt(
    plain: bytes,
    frame_size: int,
    *,
    key: bytes = KEY,
    wrapped: WrappedKey = WRAPPED,
    pieces: int = 1,
) -> tuple[bytes, list[bytes]]:
    """(header, frames) of `plain`, fed to the encryptor in `pieces` roughly equal parts."""
    enc = StreamEncryptor(key, frame_size=frame_size)
    frames: list[bytes] = []
    step = max(1, -(-len(plain) // pieces))
    for start in range(0, len(plain), step):
        frames += enc.update(plain[start : start + step])
    frames.append(enc.finish())
    return enc.header(wrapped), frames


def _decrypt(data: bytes, *, key: bytes = KEY, chunk: int = 0) -> bytes:
    chunks = [data] if chunk <= 0 else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    return b"".join(decrypt_chunks(chunks, _unwrap_to(key)))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given positions (mod len+1); repeated cuts give empty chunks."""
    points = sorted(c % (len(data) + 1) for c in cuts)
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _plaintext(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 50_000),
    seed=st.integers(0, 2**32),
    frame_size=st.one_of(st.integers(1, 64), st.integers(1, 4096)),
    pieces=st.integers(1, 8),
    cuts=st.lists(st.integers(0, 2**31), max_size=24),
)
@example(size=50_000, seed=1, frame_size=4096, pieces=3, cuts=[1, 2, 2, 100, 40_000])
@example(size=8192, seed=2, frame_size=1024, pieces=1, cuts=[])
@example(size=2000, seed=3, frame_size=1, pieces=7, cuts=[0, 0, 5_000_000])
def test_round_trip_any_bytes_frame_size_and_chunking(
    size: int, seed: int, frame_size: int, pieces: int, cuts: list[int]
) -> None:
    """Any plaintext, frame size, and split of the ciphertext into chunks decrypts to itself."""
    # Tiny frames on big inputs only cost time (50k AES calls); cap frame count at ~2000.
    size = min(size, frame_size * 2000)
    plain = _plaintext(size, seed)
    header, frames = _encrypt(plain, frame_size, pieces=pieces)
    assert len(frames) == size // frame_size + 1
    assert all(len(f) == frame_size + TAG_BYTES for f in frames[:-1])
    assert len(frames[-1]) == size % frame_size + TAG_BYTES
    pieces_out = list(decrypt_chunks(_split(header + b"".join(frames), cuts), _unwrap_to(KEY)))
    assert b"".join(pieces_out) == plain
    assert all(pieces_out), "no empty plaintext pieces are yielded"


@settings(max_examples=40, deadline=None)
@given(plain=st.binary(max_size=2000), frame_size=st.integers(1, 300))
def test_round_trip_small_binary(plain: bytes, frame_size: int) -> None:
    """Hypothesis-shrinkable inputs (all-zero, short, odd lengths) round-trip byte-at-a-time too."""
    data = b"".join(encrypt_chunks([plain], KEY, WRAPPED, frame_size=frame_size))
    assert _decrypt(data) == plain
    assert _decrypt(data, chunk=1) == plain


def test_empty_plaintext_is_header_and_one_empty_final_frame() -> None:
    header, frames = _encrypt(b"", 16)
    assert len(frames) == 1
    assert len(frames[0]) == TAG_BYTES
    assert list(decrypt_chunks([header, *frames], _unwrap_to(KEY))) == []


@pytest.mark.parametrize(("frame_size", "count"), [(1, 5), (16, 1), (16, 4), (4096, 3)])
def test_exact_multiple_of_frame_size_ends_with_tag_only_frame(frame_size: int, count: int) -> None:
    plain = _plaintext(frame_size * count, count)
    header, frames = _encrypt(plain, frame_size)
    assert len(frames) == count + 1
    assert [len(f) for f in frames] == [frame_size + TAG_BYTES] * count + [TAG_BYTES]
    assert _decrypt(header + b"".join(frames)) == plain
    # Dropping that empty final frame leaves a stream that looks complete but is not.
    with pytest.raises(IntegrityFailure, match=rf"truncated at frame {count}: no final frame"):
        _decrypt(header + b"".join(frames[:-1]))


def test_frames_are_shared_by_every_destination_header() -> None:
    """One set of frames, a header per destination: each header decrypts the same frames."""
    enc = StreamEncryptor(KEY, frame_size=10)
    frames = [*enc.update(b"x" * 35), enc.finish()]
    other = WrappedKey(key_id="kms:arn:aws:kms:eu-west-1:1:key/k", blob=b"\xff" * 200)
    for wrapped in (WRAPPED, other):
        seen: list[WrappedKey] = []

        def unwrap(w: WrappedKey, seen: list[WrappedKey] = seen) -> bytes:
            seen.append(w)
            return KEY

        out = b"".join(decrypt_chunks([enc.header(wrapped), *frames], unwrap))
        assert out == b"x" * 35
        assert seen == [wrapped]


# --- the header is authenticated before any plaintext ----------------------------------------


def test_wrong_data_key_fails_on_header_before_any_frame_is_read() -> None:
    header, frames = _encrypt(b"secret " * 1000, 64)
    pulled: list[int] = []

    def one_byte_chunks() -> Iterator[bytes]:
        for i, b in enumerate(header + b"".join(frames)):
            pulled.append(i)
            yield bytes([b])

    gen = decrypt_chunks(one_byte_chunks(), _unwrap_to(OTHER_KEY))
    with pytest.raises(IntegrityFailure, match="header failed authentication"):
        next(gen)
    # Not one byte of frame data was even read, let alone decrypted and yielded.
    assert len(pulled) == len(header)
    with pytest.raises(StopIteration):
        next(gen)


def test_unwrap_is_given_the_wrapped_key_from_the_header() -> None:
    header, frames = _encrypt(b"abc", 8)
    seen: list[WrappedKey] = []

    def unwrap(w: WrappedKey) -> bytes:
        seen.append(w)
        return KEY

    assert b"".join(decrypt_chunks([header, *frames], unwrap)) == b"abc"
    assert seen == [WRAPPED]


def test_unwrap_errors_propagate_before_any_plaintext() -> None:
    header, frames = _encrypt(b"abc", 8)

    def unwrap(_w: WrappedKey) -> bytes:
        raise IntegrityFailure("wrapped key refused")

    gen = decrypt_chunks([header, *frames], unwrap)
    with pytest.raises(IntegrityFailure, match="wrapped key refused"):
        next(gen)


# --- truncation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("plain_len", [0, 5, 48, 50])
def test_truncation_at_every_byte_is_rejected(plain_len: int) -> None:
    """Cut the stream after every possible byte count: always IntegrityFailure, never success."""
    frame_size = 16
    header, frames = _encrypt(_plaintext(plain_len, 1), frame_size)
    data = header + b"".join(frames)
    boundaries = {len(header)}
    for f in frames[:-1]:
        boundaries.add(max(boundaries) + len(f))
    for cut in range(len(data)):
        with pytest.raises(IntegrityFailure) as info:
            _decrypt(data[:cut])
        message = str(info.value)
        if cut < len(header):
            assert "header" in message
        elif cut in boundaries:
            index = sorted(boundaries).index(cut)
            assert message == f"stream is truncated at frame {index}: no final frame"
        else:
            index = (cut - len(header)) // (frame_size + TAG_BYTES)
            assert f"frame {index} " in message


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 5000), frame_size=st.integers(1, 512), data=st.data())
def test_truncation_anywhere_is_rejected(size: int, frame_size: int, data: st.DataObject) -> None:
    header, frames = _encrypt(_plaintext(size, size), frame_size)
    stream = header + b"".join(frames)
    cut = data.draw(st.integers(0, len(stream) - 1), label="cut")
    with pytest.raises(IntegrityFailure):
        _decrypt(stream[:cut])


# --- dropped, reordered, spliced frames ---------------------------------------------------------

FRAME = 32
PLAIN = _plaintext(FRAME * 5 + 7, 7)  # five full frames and a 7-byte final frame


def test_dropped_frame_is_rejected_naming_its_index() -> None:
    header, frames = _encrypt(PLAIN, FRAME)
    for i in range(len(frames) - 1):
        rest = frames[:i] + frames[i + 1 :]
        with pytest.raises(IntegrityFailure, match=rf"^frame {i} failed authentication"):
            _decrypt(header + b"".join(rest))
    with pytest.raises(IntegrityFailure, match=r"truncated at frame 5: no final frame"):
        _decrypt(header + b"".join(frames[:-1]))


def test_swapped_frames_are_rejected_naming_the_first_wrong_index() -> None:
    header, frames = _encrypt(PLAIN, FRAME)
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            swapped = list(frames)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            with pytest.raises(IntegrityFailure, match=rf"^frame {i} "):
                _decrypt(header + b"".join(swapped))


def test_duplicated_frame_is_rejected() -> None:
    header, frames = _encrypt(PLAIN, FRAME)
    doubled = [*frames[:2], frames[1], *frames[2:]]
    with pytest.raises(IntegrityFailure, match=r"^frame 2 failed authentication"):
        _decrypt(header + b"".join(doubled))


def test_frame_spliced_from_another_stream_with_same_key_is_rejected() -> None:
    """Same data key, another StreamEncryptor (another salt): its frames do not fit."""
    header_a, frames_a = _encrypt(PLAIN, FRAME)
    header_b, frames_b = _encrypt(PLAIN, FRAME)
    assert header_a[:SHARED_LEN] != header_b[:SHARED_LEN]  # fresh salt and nonce prefix
    for i in range(len(frames_a)):
        spliced = list(frames_a)
        spliced[i] = frames_b[i]
        with pytest.raises(IntegrityFailure, match=rf"^frame {i} failed authentication"):
            _decrypt(header_a + b"".join(spliced))
    # Another artifact's header in front of these frames: header is genuine, frame 0 is not.
    with pytest.raises(IntegrityFailure, match=r"^frame 0 failed authentication"):
        _decrypt(header_b + b"".join(frames_a))


def test_frame_from_another_key_is_rejected() -> None:
    header, frames = _encrypt(PLAIN, FRAME)
    _, foreign = _encrypt(PLAIN, FRAME, key=OTHER_KEY)
    for i in range(len(frames)):
        spliced = list(frames)
        spliced[i] = foreign[i]
        with pytest.raises(IntegrityFailure, match=rf"^frame {i} failed authentication"):
            _decrypt(header + b"".join(spliced))


# --- bit flips -----------------------------------------------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_in_a_small_stream_is_rejected() -> None:
    """Exhaustive over every bit: magic, version, frame size, salt, prefix, key id, wrapped key,
    both length fields, header tag, and every frame byte including GCM tags."""
    header, frames = _encrypt(_plaintext(21, 3), 8)  # frames of 8, 8, 5 plaintext bytes
    data = header + b"".join(frames)
    for bit in range(len(data) * 8):
        with pytest.raises(IntegrityFailure):
            _decrypt(_flip(data, bit))


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(0, 3000),
    frame_size=st.integers(1, 700),
    key_id=st.text(max_size=40),
    blob=st.binary(max_size=300),
    data=st.data(),
)
def test_any_single_bit_flip_anywhere_is_rejected(
    size: int, frame_size: int, key_id: str, blob: bytes, data: st.DataObject
) -> None:
    header, frames = _encrypt(
        _plaintext(size, frame_size), frame_size, wrapped=WrappedKey(key_id, blob)
    )
    stream = header + b"".join(frames)
    region = data.draw(st.sampled_from(["header", "key id and wrapped key", "anywhere"]))
    if region == "header":
        bit = data.draw(st.integers(0, len(header) * 8 - 1), label="bit")
    elif region == "key id and wrapped key":
        bit = data.draw(st.integers(SHARED_LEN * 8, (len(header) - HEADER_TAG_BYTES) * 8 - 1))
    else:
        bit = data.draw(st.integers(0, len(stream) * 8 - 1), label="bit")
    with pytest.raises(IntegrityFailure):
        _decrypt(_flip(stream, bit))


def test_flipped_bit_in_key_id_or_wrapped_key_fails_the_header_tag() -> None:
    header, frames = _encrypt(b"payload", 8)
    id_start = SHARED_LEN + 2
    blob_start = id_start + len(WRAPPED.key_id.encode()) + 2
    for offset in (id_start, id_start + 5, blob_start, blob_start + len(WRAPPED.blob) - 1):
        for bit in (0, 5):  # stay valid UTF-8, so only the tag can object
            tampered = _flip(header, offset * 8 + bit)
            parsed = parse_header([tampered])
            assert parsed.wrapped != WRAPPED  # the parse sees the tampered value ...
            with pytest.raises(IntegrityFailure, match="header failed authentication"):
                _decrypt(tampered + b"".join(frames))  # ... and the tag rejects it


def test_flipped_bit_in_frame_names_the_frame() -> None:
    header, frames = _encrypt(PLAIN, FRAME)
    for i, frame in enumerate(frames):
        tampered = list(frames)
        tampered[i] = _flip(frame, 8 * (len(frame) // 2))
        with pytest.raises(IntegrityFailure, match=rf"^frame {i} failed authentication"):
            _decrypt(header + b"".join(tampered))


# --- trailing data, foreign data, bad fields ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 2000),
    frame_size=st.integers(1, 256),
    garbage=st.binary(min_size=1, max_size=600),
)
def test_trailing_garbage_is_rejected(size: int, frame_size: int, garbage: bytes) -> None:
    header, frames = _encrypt(_plaintext(size, 5), frame_size)
    last = len(frames) - 1
    with pytest.raises(IntegrityFailure, match=rf"frame {last}\b"):
        _decrypt(header + b"".join(frames) + garbage)


def test_trailing_garbage_in_a_separate_chunk_is_rejected() -> None:
    header, frames = _encrypt(PLAIN, FRAME)
    with pytest.raises(IntegrityFailure, match=r"frame 5\b"):
        list(decrypt_chunks([header, *frames, b"\x00"], _unwrap_to(KEY)))


def test_trailing_stream_after_a_complete_stream_is_rejected() -> None:
    """Two complete streams concatenated are not one valid stream."""
    header, frames = _encrypt(b"one", 8)
    data = header + b"".join(frames)
    with pytest.raises(IntegrityFailure):
        _decrypt(data + data)


def test_bad_magic_is_rejected_clearly() -> None:
    header, frames = _encrypt(b"abc", 8)
    data = b"DRBOTENX" + header[8:] + b"".join(frames)
    with pytest.raises(IntegrityFailure, match=r"not a drbot encrypted stream \(bad magic bytes\)"):
        _decrypt(data)


def test_plain_file_is_not_a_stream() -> None:
    with pytest.raises(IntegrityFailure, match="bad magic"):
        _decrypt(b"PGDMP" + b"\x00" * 200)
    with pytest.raises(IntegrityFailure, match="truncated inside its header"):
        _decrypt(b"")
    with pytest.raises(IntegrityFailure, match="truncated inside its header"):
        _decrypt(MAGIC)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version_is_rejected_clearly(version: int) -> None:
    header, frames = _encrypt(b"abc", 8)
    data = header[:8] + bytes([version]) + header[9:] + b"".join(frames)
    expected = rf"unsupported stream format version {version} \(this drbot reads 1\)"
    with pytest.raises(IntegrityFailure, match=expected):
        _decrypt(data)


@pytest.mark.parametrize("frame_size", [0, MAX_FRAME_SIZE + 1, 2**32 - 1])
def test_impossible_frame_size_in_header_is_rejected(frame_size: int) -> None:
    header, frames = _encrypt(b"abc", 8)
    data = header[:9] + struct.pack(">I", frame_size) + header[13:] + b"".join(frames)
    with pytest.raises(IntegrityFailure, match=rf"impossible frame size {frame_size}"):
        _decrypt(data)


def test_changed_frame_size_fails_the_header_tag() -> None:
    header, frames = _encrypt(PLAIN, FRAME)
    data = header[:9] + struct.pack(">I", FRAME * 2) + header[13:] + b"".join(frames)
    with pytest.raises(IntegrityFailure, match="header failed authentication"):
        _decrypt(data)


def test_non_utf8_key_id_is_rejected() -> None:
    header, frames = _encrypt(b"abc", 8, wrapped=WrappedKey("ab", b"k"))
    data = header[: SHARED_LEN + 2] + b"\xff\xfe" + header[SHARED_LEN + 4 :] + b"".join(frames)
    with pytest.raises(IntegrityFailure, match="not UTF-8"):
        _decrypt(data)


# --- encryptor misuse --------------------------------------------------------------------------


@pytest.mark.parametrize("frame_size", [0, -1, MAX_FRAME_SIZE + 1])
def test_encryptor_rejects_bad_frame_size(frame_size: int) -> None:
    with pytest.raises(ValueError, match="frame_size"):
        StreamEncryptor(KEY, frame_size=frame_size)


@pytest.mark.parametrize("key", [b"", b"k" * 16, b"k" * 33])
def test_encryptor_rejects_data_key_of_wrong_length(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        StreamEncryptor(key, frame_size=8)


def test_encryptor_refuses_use_after_finish() -> None:
    enc = StreamEncryptor(KEY, frame_size=8)
    enc.finish()
    with pytest.raises(RuntimeError):
        enc.update(b"x")
    with pytest.raises(RuntimeError):
        enc.finish()


def test_oversized_key_id_or_blob_is_refused() -> None:
    enc = StreamEncryptor(KEY, frame_size=8)
    with pytest.raises(ValueError, match="65535"):
        enc.header(WrappedKey("k", b"x" * 0x10000))
    with pytest.raises(ValueError, match="65535"):
        enc.header(WrappedKey("k" * 0x10000, b"x"))


# --- the byte layout, read by an independent decoder (as docs/stream-format.md describes it) ----


def _independent_decrypt(data: bytes, data_key: bytes) -> bytes:
    """Decrypt a stream with nothing but `cryptography` and the documented layout."""
    magic, version, frame_size, salt, prefix = struct.unpack_from(">8sBI32s7s", data, 0)
    assert (magic, version) == (b"DRBOTENC", 1)
    shared = data[:SHARED_LEN]
    pos = SHARED_LEN
    (id_len,) = struct.unpack_from(">H", data, pos)
    pos += 2 + id_len
    (blob_len,) = struct.unpack_from(">H", data, pos)
    pos += 2 + blob_len
    signed, tag = data[:pos], data[pos : pos + 32]
    pos += 32

    def derive(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(data_key)

    header_key = derive(b"drbot stream v1 header")
    assert hmac.compare_digest(hmac.digest(header_key, signed, hashlib.sha256), tag)
    aead = AESGCM(derive(b"drbot stream v1 frames"))
    out, index = bytearray(), 0
    while True:
        frame = data[pos : pos + frame_size + 16]
        pos += len(frame)
        last = len(frame) < frame_size + 16
        nonce = prefix + struct.pack(">IB", index, int(last))
        out += aead.decrypt(nonce, frame, shared)
        if last:
            assert pos == len(data)
            return bytes(out)
        index += 1


def test_layout_matches_the_documented_format() -> None:
    wrapped = WrappedKey("file:abc", b"\x01\x02\x03")
    header, frames = _encrypt(PLAIN, FRAME, wrapped=wrapped)
    assert header[:8] == b"DRBOTENC"
    assert header[8] == 1
    assert header[9:13] == struct.pack(">I", FRAME)
    assert header[SHARED_LEN : SHARED_LEN + 2] == b"\x00\x08"
    assert header[SHARED_LEN + 2 : SHARED_LEN + 10] == b"file:abc"
    assert header[SHARED_LEN + 10 : SHARED_LEN + 12] == b"\x00\x03"
    assert header[SHARED_LEN + 12 : SHARED_LEN + 15] == b"\x01\x02\x03"
    assert len(header) == SHARED_LEN + 15 + HEADER_TAG_BYTES
    parsed = parse_header([header])
    assert parsed.length == len(header)
    assert parsed.shared == header[:SHARED_LEN]
    assert parsed.frame_size == FRAME
    assert parsed.wrapped == wrapped
    assert _independent_decrypt(header + b"".join(frames), KEY) == PLAIN


@settings(max_examples=30, deadline=None)
@given(size=st.integers(0, 4000), frame_size=st.integers(1, 1024))
def test_independent_decoder_agrees(size: int, frame_size: int) -> None:
    plain = _plaintext(size, frame_size)
    data = b"".join(encrypt_chunks([plain], KEY, WRAPPED, frame_size=frame_size))
    assert _independent_decrypt(data, KEY) == plain
