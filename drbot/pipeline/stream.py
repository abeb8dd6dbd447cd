"""The encrypted stream format (v1): an authenticated header, then AES-256-GCM frames.

Layout (all integers big-endian; docs/stream-format.md is the normative description):

    shared  = magic "DRBOTENC" | u8 version=1 | u32 frame_size | salt[32] | nonce_prefix[7]
    header  = shared | u16 len | key_id (UTF-8) | u16 len | wrapped data key | tag[32]
    tag     = HMAC-SHA256(header_key, every header byte before it)
    frame i = AES-256-GCM(frame_key, nonce = nonce_prefix | u32 i | u8 last, aad = shared)

`header_key` and `frame_key` come from HKDF-SHA256(data_key, salt) with distinct infos. Every
frame but the last holds exactly `frame_size` plaintext bytes; the last holds fewer (maybe
none) and has `last = 1` in its nonce. So a reordered frame fails (its index is wrong), a
truncated stream fails (no frame claims to be last, or a full-size frame claims it), frames
spliced from another artifact fail (another salt, hence another key), and a wrong data key
fails on the header tag before any frame is read.

The `shared` part is identical for every destination of one artifact: only the wrapped key
differs per region, so frames are encrypted once and sent everywhere.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drbot.errors import IntegrityFailure
from drbot.pipeline.keys import WrappedKey

MAGIC = b"DRBOTENC"
VERSION = 1
DEFAULT_FRAME_SIZE = 1 << 20
MAX_FRAME_SIZE = 64 << 20
SALT_BYTES = 32
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16  # GCM tag appended to every frame
HEADER_TAG_BYTES = 32
DATA_KEY_BYTES = 32
MAX_FRAMES = 1 << 32

_SHARED = struct.Struct(f">8sBI{SALT_BYTES}s{NONCE_PREFIX_BYTES}s")
_U16 = struct.Struct(">H")
_INFO_FRAMES = b"drbot stream v1 frames"
_INFO_HEADER = b"drbot stream v1 header"


def _derive(data_key: bytes, salt: bytes, info: bytes) -> bytes:
    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"data key must be {DATA_KEY_BYTES} bytes, got {len(data_key)}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(data_key)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= MAX_FRAMES:
        raise IntegrityFailure(f"stream exceeds {MAX_FRAMES} frames")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


@dataclass(frozen=True)
class StreamHeader:
    """A parsed (not yet authenticated) header; `shared` is the frames' associated data."""

    frame_size: int
    salt: bytes
    nonce_prefix: bytes
    wrapped: WrappedKey
    shared: bytes
    signed: bytes  # every header byte the tag covers
    tag: bytes

    @property
    def length(self) -> int:
        return len(self.signed) + len(self.tag)

    def authenticate(self, data_key: bytes) -> None:
        """IntegrityFailure unless the tag matches under `data_key` (wrong key or tampering)."""
        expected = hmac.digest(_derive(data_key, self.salt, _INFO_HEADER), self.signed, sha256)
        if not hmac.compare_digest(expected, self.tag):
            raise IntegrityFailure(
                "stream header failed authentication: wrong data key or tampered header"
            )


def _encode_header(shared: bytes, header_key: bytes, wrapped: WrappedKey) -> bytes:
    key_id = wrapped.key_id.encode()
    if len(key_id) > 0xFFFF or len(wrapped.blob) > 0xFFFF:
        raise ValueError("key id or wrapped key longer than 65535 bytes")
    signed = shared + _U16.pack(len(key_id)) + key_id + _U16.pack(len(wrapped.blob)) + wrapped.blob
    return signed + hmac.digest(header_key, signed, sha256)


class StreamEncryptor:
    """Encrypts one artifact: `header()` per destination, then `update()`s, then `finish()`.

    Holds at most one frame of plaintext. Not thread-safe; one instance per artifact (a fresh
    salt per instance is what keeps frames of different artifacts from being interchangeable).
    """

    def __init__(self, data_key: bytes, *, frame_size: int = DEFAULT_FRAME_SIZE) -> None:
        if not 1 <= frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"frame_size must be 1..{MAX_FRAME_SIZE}, got {frame_size}")
        self.frame_size = frame_size
        salt = os.urandom(SALT_BYTES)
        self._prefix = os.urandom(NONCE_PREFIX_BYTES)
        self._shared = _SHARED.pack(MAGIC, VERSION, frame_size, salt, self._prefix)
        self._header_key = _derive(data_key, salt, _INFO_HEADER)
        self._aead = AESGCM(_derive(data_key, salt, _INFO_FRAMES))
        self._buffer = bytearray()
        self._index = 0
        self._finished = False

    def header(self, wrapped: WrappedKey) -> bytes:
        """The header for a destination whose copy of the data key is `wrapped`."""
        return _encode_header(self._shared, self._header_key, wrapped)

    def _seal(self, plain: bytes | bytearray | memoryview, last: bool) -> bytes:
        frame = self._aead.encrypt(_nonce(self._prefix, self._index, last), plain, self._shared)
        self._index += 1
        return frame

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Buffer `data`; return every full frame it completes (possibly none)."""
        if self._finished:
            raise RuntimeError("update() after finish()")
        # A full frame is never the last one (the last is always shorter, maybe empty), so it
        # can be sealed at once without waiting to learn whether more data follows. Frames are
        # sealed from `data` itself where they can be: only a frame's worth of bytes straddling
        # two updates is ever copied.
        view = memoryview(data)
        size = self.frame_size
        frames: list[bytes] = []
        if self._buffer:
            room = size - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) < size:
                return frames
            frames.append(self._seal(self._buffer, last=False))
            self._buffer.clear()
        while len(view) >= size:
            frames.append(self._seal(view[:size], last=False))
            view = view[size:]
        self._buffer += view
        return frames

    def finish(self) -> bytes:
        """The last frame: the remaining (< frame_size, possibly zero) bytes, marked last."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        frame = self._seal(bytes(self._buffer), last=True)
        self._buffer.clear()
        return frame


def encrypt_chunks(
    chunks: Iterable[bytes],
    data_key: bytes,
    wrapped: WrappedKey,
    *,
    frame_size: int = DEFAULT_FRAME_SIZE,
) -> Iterator[bytes]:
    """Header then frames for one destination; a convenience over `StreamEncryptor`."""
    enc = StreamEncryptor(data_key, frame_size=frame_size)
    yield enc.header(wrapped)
    for chunk in chunks:
        yield from enc.update(chunk)
    yield enc.finish()


class _Reader:
    """Pulls exact byte counts out of an iterable of arbitrarily sized chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()
        self._eof = False

    def _fill(self, n: int) -> None:
        while len(self._buf) < n and not self._eof:
            try:
                self._buf += next(self._it)
            except StopIteration:
                self._eof = True

    def take(self, n: int) -> bytes:
        """Up to `n` bytes; fewer only at the end of the input."""
        self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def at_end(self) -> bool:
        self._fill(1)
        return not self._buf


def _take_exact(reader: _Reader, n: int, what: str) -> bytes:
    data = reader.take(n)
    if len(data) != n:
        raise IntegrityFailure(f"stream is truncated inside its header ({what})")
    return data


def parse_header(reader_or_chunks: _Reader | Iterable[bytes]) -> StreamHeader:
    """Read and parse the header (no authentication: that needs the data key).

    Raises IntegrityFailure if the bytes are not a drbot v1 stream or end inside the header.
    """
    reader = (
        reader_or_chunks if isinstance(reader_or_chunks, _Reader) else _Reader(reader_or_chunks)
    )
    shared = _take_exact(reader, _SHARED.size, "fixed fields")
    magic, version, frame_size, salt, prefix = _SHARED.unpack(shared)
    if magic != MAGIC:
        raise IntegrityFailure("not a drbot encrypted stream (bad magic bytes)")
    if version != VERSION:
        raise IntegrityFailure(f"unsupported stream format version {version} (this drbot reads 1)")
    if not 1 <= frame_size <= MAX_FRAME_SIZE:
        raise IntegrityFailure(f"stream header has an impossible frame size {frame_size}")
    (id_len,) = _U16.unpack(_take_exact(reader, 2, "key id length"))
    key_id_raw = _take_exact(reader, id_len, "key id")
    (blob_len,) = _U16.unpack(_take_exact(reader, 2, "wrapped key length"))
    blob = _take_exact(reader, blob_len, "wrapped key")
    tag = _take_exact(reader, HEADER_TAG_BYTES, "header tag")
    try:
        key_id = key_id_raw.decode()
    except UnicodeDecodeError:
        raise IntegrityFailure("stream header has a key id that is not UTF-8") from None
    signed = shared + _U16.pack(id_len) + key_id_raw + _U16.pack(blob_len) + blob
    return StreamHeader(
        frame_size=frame_size,
        salt=salt,
        nonce_prefix=prefix,
        wrapped=WrappedKey(key_id=key_id, blob=blob),
        shared=shared,
        signed=signed,
        tag=tag,
    )


def decrypt_chunks(
    chunks: Iterable[bytes], unwrap: Callable[[WrappedKey], bytes]
) -> Iterator[bytes]:
    """Authenticate and decrypt a stream, yielding plaintext one frame at a time.

    `unwrap` turns the header's wrapped key into the data key (raising KeyProblem, or
    IntegrityFailure, as it sees fit). The header tag is checked before any frame is read.
    A frame's plaintext is yielded only after that frame authenticated, and the end of the
    stream is confirmed (a frame marked last, then nothing) before the generator returns.

    Raises IntegrityFailure naming the frame index for any tampering, truncation, reordering,
    splicing or trailing data.
    """
    reader = _Reader(chunks)
    header = parse_header(reader)
    data_key = unwrap(header.wrapped)
    header.authenticate(data_key)
    aead = AESGCM(_derive(data_key, header.salt, _INFO_FRAMES))
    full = header.frame_size + TAG_BYTES
    index = 0
    while True:
        frame = reader.take(full)
        # A full-size frame is never last; a shorter one must be (and must end the stream).
        last = len(frame) < full
        if len(frame) < TAG_BYTES:
            raise IntegrityFailure(
                f"stream is truncated at frame {index}: no final frame"
                if not frame
                else f"frame {index} is truncated ({len(frame)} bytes)"
            )
        try:
            plain = aead.decrypt(_nonce(header.nonce_prefix, index, last), frame, header.shared)
        except InvalidTag:
            if not last:
                raise IntegrityFailure(
                    f"frame {index} failed authentication (corrupt, reordered or from another "
                    "stream)"
                ) from None
            raise IntegrityFailure(
                f"frame {index} failed authentication "
                "(corrupt or truncated stream, or bytes after its end)"
            ) from None
        if last:
            if not reader.at_end():
                raise IntegrityFailure(f"stream has bytes after its final frame {index}")
            if plain:
                yield plain
            return
        index += 1
        yield plain
