"""Key files: a 32-byte AES key in a local file wraps each backup's data key (AES-256-GCM).

File format: the key as standard base64 (44 characters) and a newline, mode 0600.
Key id: "file:" + the first 16 hex digits of SHA-256(b"drbot key id v1" + key); it identifies
the key without revealing it. Wrapped blob: nonce (12 bytes) || ciphertext (32) || GCM tag (16),
with associated data b"drbot wrap v1" + key id, so a blob only opens under the key whose id it
claims. docs/keys.md describes the layout for restoring by hand.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import stat
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drbot.durable import sync_dir
from drbot.errors import KeyProblem
from drbot.pipeline.keys import KeyProvider, WrappedKey

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
KEY_ID_DOMAIN = b"drbot key id v1"
WRAP_AAD_DOMAIN = b"drbot wrap v1"
KEY_FILE_MODE = 0o600

# A key file is 45 bytes; anything much larger is the wrong file, and reading it whole would
# only risk copying unrelated secrets into memory.
_MAX_KEY_FILE_BYTES = 4096


def file_key_id(key: bytes) -> str:
    """The public id of `key`: 'file:' + 16 hex digits of a domain-separated SHA-256."""
    return "file:" + hashlib.sha256(KEY_ID_DOMAIN + key).hexdigest()[:16]


def generate_key_file(path: Path) -> str:
    """Create a new key file at `path` (32 random bytes, base64, mode 0600) and return its key id.

    The file is created with O_CREAT|O_EXCL, so an existing file is never replaced and no other
    process can slip a file in between check and create. The file and its directory are fsynced
    before returning: losing a freshly made key would make every backup under it unreadable.

    Raises KeyProblem if `path` already exists or cannot be created or written (a partly
    written file is removed).
    """
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_FILE_MODE)
    except FileExistsError:
        raise KeyProblem(
            f"key file {path} already exists; refusing to overwrite it",
            hint="backups made under that key need it to restore; pick another path, or move "
            "the old file somewhere safe first",
        ) from None
    except OSError as exc:
        raise KeyProblem(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            # The umask may have narrowed the mode further; the contract is exactly 0600.
            os.fchmod(out.fileno(), KEY_FILE_MODE)
            out.write(base64.b64encode(key) + b"\n")
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise KeyProblem(f"cannot write key file {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):  # best effort: some filesystems refuse to fsync directories
        sync_dir(path.parent)
    return file_key_id(key)


def read_key_file(path: Path) -> bytes:
    """The 32-byte key stored in the key file at `path`.

    Raises KeyProblem if the file is missing, unreadable, not a regular file, readable or
    writable by group/others, or not base64 of exactly 32 bytes. Messages never include the
    file's content.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyProblem(
            f"key file {path} does not exist",
            hint="check the policy's key path; create a new key only for new backups, since "
            "existing backups need the key that made them",
        ) from None
    except OSError as exc:
        raise KeyProblem(f"cannot open key file {path}: {exc.strerror}") from None
    try:
        # fstat the opened file, not the path, so the mode checked is the mode of what is read.
        info = os.fstat(fd)
        _check_mode(path, info)
        raw = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyProblem(f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _decode_key(path, raw)


def _check_mode(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise KeyProblem(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        access = "readable" if mode & 0o044 else "writable"
        raise KeyProblem(
            f"key file {path} is {access} by group/others (mode {mode:04o})",
            hint=f"run: chmod 600 {path}",
        )


def _decode_key(path: Path, raw: bytes) -> bytes:
    malformed = KeyProblem(
        f"key file {path} is not a drbot key (expected base64 of exactly {KEY_BYTES} bytes)",
        hint="a key file holds one line of base64, as written by generate_key_file",
    )
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise malformed
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise malformed from None
    if len(key) != KEY_BYTES:
        raise malformed
    return key


class FileKeyProvider:
    """KeyProvider backed by a key file; the same key serves every region.

    The file is read lazily, on the first call that needs the key, and then kept in memory for
    the provider's life: building a provider (e.g. while loading policies) never touches the
    file, and a daemon that wants to fail fast at startup calls `key_id(None)` once. Every read
    problem surfaces as KeyProblem from whichever method needed the key.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._key: bytes | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """Where the key file is."""
        return self._path

    def describe(self) -> str:
        """'file:' + the key file's path, as in the policy."""
        return f"file:{self._path}"

    def key_id(self, region: str | None) -> str:
        """The file key's public id (region is ignored). Raises KeyProblem if unreadable."""
        return file_key_id(self._load())

    def generate(self, region: str | None) -> tuple[bytes, WrappedKey]:
        """A fresh random 32-byte data key and its wrapping. Raises KeyProblem if unreadable."""
        data_key = secrets.token_bytes(KEY_BYTES)
        return data_key, self.wrap(data_key, region)

    def wrap(self, data_key: bytes, region: str | None) -> WrappedKey:
        """Wrap `data_key` under the file key with a random nonce.

        Raises ValueError if `data_key` is not 32 bytes (a caller bug), KeyProblem if the key
        file is unreadable.
        """
        if len(data_key) != KEY_BYTES:
            raise ValueError(f"data keys are {KEY_BYTES} bytes, got {len(data_key)}")
        key = self._load()
        key_id = file_key_id(key)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, data_key, _aad(key_id))
        return WrappedKey(key_id=key_id, blob=nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, region: str | None) -> bytes:
        """The data key inside `wrapped`.

        Raises KeyProblem if `wrapped` names another key (checked before any decryption), has
        the wrong length, or fails authentication (tampered, or forged with another key).
        """
        key = self._load()
        key_id = file_key_id(key)
        if wrapped.key_id != key_id:
            raise KeyProblem(
                f"backup was encrypted with key {wrapped.key_id}, but the policy key "
                f"{self._path} is {key_id}",
                hint=f"restore with the key file whose id is {wrapped.key_id}; keep old key "
                "files for as long as backups made under them are kept",
            )
        if len(wrapped.blob) != WRAPPED_BYTES:
            raise KeyProblem(
                f"wrapped data key for key {key_id} is {len(wrapped.blob)} bytes, expected "
                f"{WRAPPED_BYTES}; the manifest is damaged"
            )
        nonce, sealed = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        try:
            return AESGCM(key).decrypt(nonce, sealed, _aad(key_id))
        except InvalidTag:
            raise KeyProblem(
                f"wrapped data key does not authenticate under key {key_id} ({self._path}): "
                "it was tampered with or made by another key"
            ) from None

    def _load(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = read_key_file(self._path)
            return self._key


def _aad(key_id: str) -> bytes:
    return WRAP_AAD_DOMAIN + key_id.encode("ascii")


_: type[KeyProvider] = FileKeyProvider
