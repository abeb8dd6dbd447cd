"""Key files: creation, the checks on reading them, and wrapping data keys under them."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drbot.errors import KeyProblem, PolicyInvalid
from drbot.pipeline.filekey import FileKeyProvider, file_key_id, generate_key_file
from drbot.pipeline.keyref import key_provider_from_ref, key_ref_needs_region
from drbot.pipeline.keys import WrappedKey
from drbot.pipeline.kms import KmsKeyProvider

pytestmark = pytest.mark.unit


def _write_key(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "shop.key"
    generate_key_file(path)
    return path


def test_generate_writes_0600_base64_of_32_bytes(tmp_path: Path) -> None:
    """generate_key_file writes one line of base64 of 32 bytes with mode exactly 0600."""
    path = tmp_path / "new.key"
    old_umask = os.umask(0o277)  # a stricter umask must not change the promised mode
    try:
        key_id = generate_key_file(path)
    finally:
        os.umask(old_umask)
    text = path.read_bytes()
    assert text.endswith(b"\n")
    assert text.count(b"\n") == 1
    key = base64.b64decode(text.strip(), validate=True)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id == file_key_id(key)


def test_generate_refuses_to_overwrite(key_path: Path) -> None:
    """generate_key_file refuses an existing path with a hint and leaves the file untouched."""
    before = key_path.read_bytes()
    with pytest.raises(KeyProblem, match="already exists") as caught:
        generate_key_file(key_path)
    assert caught.value.hint
    assert key_path.read_bytes() == before


def test_generate_makes_different_keys(tmp_path: Path) -> None:
    """Two generated key files hold different keys."""
    assert generate_key_file(tmp_path / "a.key") != generate_key_file(tmp_path / "b.key")


@pytest.mark.parametrize(
    ("mode", "word"), [(0o644, "readable"), (0o640, "readable"), (0o620, "writable")]
)
def test_group_or_other_access_is_refused_with_chmod_hint(
    key_path: Path, mode: int, word: str
) -> None:
    """A key file open to group/others is refused, naming the mode, with a chmod 600 hint."""
    key_path.chmod(mode)
    with pytest.raises(KeyProblem) as caught:
        FileKeyProvider(key_path).key_id(None)
    message = str(caught.value)
    assert f"{word} by group/others" in message
    assert f"(mode {mode:04o})" in message
    assert str(key_path) in message
    assert caught.value.hint == f"run: chmod 600 {key_path}"


def test_owner_only_read_mode_is_accepted(key_path: Path) -> None:
    """A key file with mode 0400 is accepted."""
    key_path.chmod(0o400)
    assert FileKeyProvider(key_path).key_id(None).startswith("file:")


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    """A missing key file raises KeyProblem naming the path, only when the key is needed."""
    path = tmp_path / "absent.key"
    provider = FileKeyProvider(path)  # constructing never reads
    assert provider.describe() == f"file:{path}"
    with pytest.raises(KeyProblem, match="does not exist") as caught:
        provider.generate(None)
    assert str(path) in str(caught.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    """A directory in place of the key file raises KeyProblem."""
    with pytest.raises(KeyProblem, match=str(tmp_path)):
        FileKeyProvider(tmp_path).key_id(None)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not base64 at all!\n",
        base64.b64encode(b"k" * 31) + b"\n",
        base64.b64encode(b"k" * 33) + b"\n",
        b"k" * 5000,
    ],
    ids=["empty", "not-base64", "31-bytes", "33-bytes", "huge"],
)
def test_malformed_content_is_refused_without_echoing_it(tmp_path: Path, content: bytes) -> None:
    """Content that is not base64 of exactly 32 bytes is refused; the message omits the content."""
    path = _write_key(tmp_path / "bad.key", content)
    with pytest.raises(KeyProblem, match="not a drbot key") as caught:
        FileKeyProvider(path).key_id(None)
    text = f"{caught.value} {caught.value.hint}"
    if content.strip():
        assert content.strip()[:20].decode() not in text


def test_wrap_unwrap_round_trip(key_path: Path) -> None:
    """A generated data key unwraps to itself, also through a fresh provider on the same file."""
    provider = FileKeyProvider(key_path)
    data_key, wrapped = provider.generate(None)
    assert len(data_key) == 32
    assert data_key not in wrapped.blob
    assert len(wrapped.blob) == 12 + 32 + 16
    assert wrapped.key_id == provider.key_id(None)
    assert FileKeyProvider(key_path).unwrap(wrapped, "eu-west-1") == data_key


def test_blob_layout_matches_the_documented_format(key_path: Path) -> None:
    """The blob is nonce||ciphertext||tag under AES-256-GCM with aad 'drbot wrap v1' + key id."""
    provider = FileKeyProvider(key_path)
    data_key = bytes(range(32))
    wrapped = provider.wrap(data_key, None)
    key = base64.b64decode(key_path.read_bytes().strip())
    aad = b"drbot wrap v1" + wrapped.key_id.encode()
    assert AESGCM(key).decrypt(wrapped.blob[:12], wrapped.blob[12:], aad) == data_key


def test_wrapping_twice_gives_different_blobs(key_path: Path) -> None:
    """Each wrap uses a fresh nonce, so the same data key never wraps to the same bytes."""
    provider = FileKeyProvider(key_path)
    data_key = bytes(32)
    assert provider.wrap(data_key, None).blob != provider.wrap(data_key, None).blob


def test_wrap_rejects_wrong_data_key_length(key_path: Path) -> None:
    """Wrapping anything but a 32-byte data key is a caller error (ValueError)."""
    with pytest.raises(ValueError, match="32 bytes"):
        FileKeyProvider(key_path).wrap(b"short", None)


def test_blob_of_another_key_is_refused_before_decrypting(key_path: Path, tmp_path: Path) -> None:
    """A wrapped key naming another key id is refused with both ids and the policy key's path."""
    other = tmp_path / "other.key"
    generate_key_file(other)
    _, wrapped = FileKeyProvider(other).generate(None)
    provider = FileKeyProvider(key_path)
    with pytest.raises(KeyProblem) as caught:
        provider.unwrap(replace(wrapped, blob=b""), None)  # the id alone must decide
    message = str(caught.value)
    assert message == (
        f"backup was encrypted with key {wrapped.key_id}, but the policy key {key_path} "
        f"is {provider.key_id(None)}"
    )
    assert caught.value.hint


def test_blob_claiming_this_key_but_made_by_another_is_refused(
    key_path: Path, tmp_path: Path
) -> None:
    """A blob made by another key but relabelled with this key's id fails authentication."""
    other = tmp_path / "other.key"
    generate_key_file(other)
    _, wrapped = FileKeyProvider(other).generate(None)
    provider = FileKeyProvider(key_path)
    with pytest.raises(KeyProblem, match="does not authenticate"):
        provider.unwrap(WrappedKey(key_id=provider.key_id(None), blob=wrapped.blob), None)


@pytest.mark.parametrize("position", [0, 12, 43, 59])
def test_tampered_blob_is_refused(key_path: Path, position: int) -> None:
    """Flipping any one bit of the nonce, ciphertext or tag makes unwrap raise KeyProblem."""
    provider = FileKeyProvider(key_path)
    _, wrapped = provider.generate(None)
    blob = bytearray(wrapped.blob)
    blob[position] ^= 0x01
    with pytest.raises(KeyProblem, match="tampered"):
        provider.unwrap(replace(wrapped, blob=bytes(blob)), None)


def test_truncated_blob_is_refused(key_path: Path) -> None:
    """A blob of the wrong length raises KeyProblem, not a crypto library error."""
    provider = FileKeyProvider(key_path)
    _, wrapped = provider.generate(None)
    with pytest.raises(KeyProblem, match="59 bytes"):
        provider.unwrap(replace(wrapped, blob=wrapped.blob[:-1]), None)


def test_key_id_is_stable_and_reveals_nothing(tmp_path: Path) -> None:
    """The key id is the documented SHA-256 derivation and contains no form of the key."""
    key = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)
    path = _write_key(tmp_path / "known.key", base64.b64encode(key) + b"\n")
    expected = "file:" + hashlib.sha256(b"drbot key id v1" + key).hexdigest()[:16]
    key_id = FileKeyProvider(path).key_id(None)
    assert key_id == expected
    assert key_id == FileKeyProvider(path).key_id("us-east-1")
    assert key.hex() not in key_id
    assert key.hex()[:16] not in key_id
    assert base64.b64encode(key).decode()[:16] not in key_id


def test_key_is_kept_after_first_read(key_path: Path) -> None:
    """Once read, the key stays usable even if the file goes away (read once, lazily)."""
    provider = FileKeyProvider(key_path)
    data_key, wrapped = provider.generate(None)
    key_path.unlink()
    assert provider.unwrap(wrapped, None) == data_key


def test_key_ref_builds_each_provider_kind(key_path: Path) -> None:
    """'file:PATH' builds a FileKeyProvider and 'kms:REF' a KmsKeyProvider, without I/O."""
    file_provider = key_provider_from_ref(f"file:{key_path}")
    assert isinstance(file_provider, FileKeyProvider)
    assert file_provider.describe() == f"file:{key_path}"
    kms_provider = key_provider_from_ref("kms:alias/drbot-shop")
    assert isinstance(kms_provider, KmsKeyProvider)
    assert kms_provider.describe() == "kms:alias/drbot-shop"
    assert key_ref_needs_region("kms:alias/drbot-shop")
    assert not key_ref_needs_region(f"file:{key_path}")


@pytest.mark.parametrize(
    ("ref", "shown"),
    [
        ("vault:secret/drbot", "vault:"),
        ("file:", "names no path"),
        ("kms:", "names no key"),
        ("c2VjcmV0IGtleSBtYXRlcmlhbCBwYXN0ZWQ=", "no 'file:' or 'kms:' prefix"),
        ("c2VjcmV0IGtleSBtYXRlcmlh+/bCBwY:XN0ZWQ=", "'?:'"),
    ],
)
def test_unknown_key_ref_is_policy_invalid_without_echoing_it(ref: str, shown: str) -> None:
    """Any other reference raises PolicyInvalid that shows at most the scheme."""
    with pytest.raises(PolicyInvalid) as caught:
        key_provider_from_ref(ref)
    assert shown in str(caught.value)
    if len(ref) > 20:
        assert ref[:12] not in str(caught.value)
