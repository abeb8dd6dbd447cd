"""The KeyProvider contract, run against key files and AWS KMS (moto's server on 127.0.0.1)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from drbot.errors import KeyProblem
from drbot.pipeline.filekey import generate_key_file
from drbot.pipeline.keyref import key_provider_from_ref
from drbot.pipeline.keys import KeyProvider, WrappedKey
from drbot.pipeline.kms import KmsKeyProvider, decrypt_key_id, kms_error
from tests.fixtures.s3 import REGIONS, S3Server

pytestmark = pytest.mark.contract

PRIMARY, REPLICA = REGIONS


@dataclass(frozen=True)
class KeyCase:
    """One implementation under test, with the hooks the contract needs."""

    ref: str
    """The policy's key reference for a key that exists."""
    unknown_ref: str
    """A reference to a key that does not exist, and `unknown_name`, which its error must name."""
    unknown_name: str
    lose_region: Callable[[str], None]
    """Make `region`'s key unusable by name, as if that region were lost."""
    foreign: Callable[[], tuple[WrappedKey, str]]
    """A wrapped key (and the region to unwrap it in) that this key must refuse."""

    def provider(self) -> KeyProvider:
        """A fresh provider for `ref`: no cached key, no existing clients."""
        return key_provider_from_ref(self.ref)


def _kms(server: S3Server, region: str) -> Any:
    return server.client("kms", region)


def _create_alias_everywhere(server: S3Server) -> str:
    alias = f"alias/drbot-test-{uuid.uuid4().hex[:10]}"
    for region in REGIONS:
        kms = _kms(server, region)
        key_id = kms.create_key(Description="drbot contract test")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    return alias


def _file_case(tmp_path: Path) -> KeyCase:
    path = tmp_path / "policy.key"
    generate_key_file(path)
    other = tmp_path / "other.key"
    generate_key_file(other)
    absent = tmp_path / "absent.key"

    def foreign() -> tuple[WrappedKey, str]:
        return key_provider_from_ref(f"file:{other}").generate(PRIMARY)[1], PRIMARY

    return KeyCase(
        ref=f"file:{path}",
        unknown_ref=f"file:{absent}",
        unknown_name=str(absent),
        lose_region=lambda region: None,  # a key file has no region to lose
        foreign=foreign,
    )


def _kms_case(server: S3Server) -> KeyCase:
    alias = _create_alias_everywhere(server)
    missing_alias = f"alias/drbot-missing-{uuid.uuid4().hex[:10]}"

    def foreign() -> tuple[WrappedKey, str]:
        # The spec's case: a copy wrapped in one region is useless in another.
        return key_provider_from_ref(f"kms:{alias}").generate(PRIMARY)[1], REPLICA

    return KeyCase(
        ref=f"kms:{alias}",
        unknown_ref=f"kms:{missing_alias}",
        unknown_name=missing_alias,
        lose_region=lambda region: _kms(server, region).delete_alias(AliasName=alias),
        foreign=foreign,
    )


@pytest.fixture(params=["file", "kms"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> KeyCase:
    if request.param == "file":
        return _file_case(tmp_path)
    aws_env: S3Server = request.getfixturevalue("aws_env")
    return _kms_case(aws_env)


@pytest.fixture
def kms_alias(aws_env: S3Server) -> str:
    return _create_alias_everywhere(aws_env)


# --- the contract, for every implementation ------------------------------------------------


def test_generate_round_trips_in_each_region(case: KeyCase) -> None:
    """A data key generated for a region unwraps to itself in that region with a fresh provider."""
    provider = case.provider()
    for region in REGIONS:
        data_key, wrapped = provider.generate(region)
        assert len(data_key) == 32
        assert data_key not in wrapped.blob
        assert wrapped.key_id == provider.key_id(region)
        assert case.provider().unwrap(wrapped, region) == data_key


def test_generate_gives_a_fresh_key_each_time(case: KeyCase) -> None:
    """Two generated data keys differ."""
    provider = case.provider()
    assert provider.generate(PRIMARY)[0] != provider.generate(PRIMARY)[0]


def test_copy_wrapped_for_second_region_unwraps_there_alone(case: KeyCase) -> None:
    """A key generated in region A and wrapped for region B unwraps in B with region A lost."""
    data_key, _ = case.provider().generate(PRIMARY)
    wrapped_b = case.provider().wrap(data_key, REPLICA)
    assert wrapped_b.key_id == case.provider().key_id(REPLICA)
    case.lose_region(PRIMARY)
    assert case.provider().unwrap(wrapped_b, REPLICA) == data_key


def test_wrapped_key_of_another_key_or_region_is_refused(case: KeyCase) -> None:
    """A wrapped key this key did not make for the region raises KeyProblem."""
    wrapped, region = case.foreign()
    with pytest.raises(KeyProblem):
        case.provider().unwrap(wrapped, region)


def test_tampered_blob_is_refused(case: KeyCase) -> None:
    """A wrapped key whose last byte was flipped raises KeyProblem."""
    provider = case.provider()
    _, wrapped = provider.generate(PRIMARY)
    blob = bytearray(wrapped.blob)
    blob[-1] ^= 0x01
    with pytest.raises(KeyProblem):
        provider.unwrap(replace(wrapped, blob=bytes(blob)), PRIMARY)


def test_unknown_key_is_refused_naming_it(case: KeyCase) -> None:
    """Using a key that does not exist raises KeyProblem whose message names it."""
    provider = key_provider_from_ref(case.unknown_ref)
    with pytest.raises(KeyProblem) as caught:
        provider.generate(PRIMARY)
    assert case.unknown_name in str(caught.value)
    assert caught.value.hint


def test_describe_is_the_policy_reference(case: KeyCase) -> None:
    """describe() returns the reference exactly as the policy wrote it."""
    assert case.provider().describe() == case.ref


# --- KMS specifics --------------------------------------------------------------------------


def test_kms_key_id_is_the_regions_key_arn(aws_env: S3Server, kms_alias: str) -> None:
    """key_id(region) is the ARN of the alias's key in that region, different per region."""
    provider = KmsKeyProvider(kms_alias)
    for region in REGIONS:
        arn = _kms(aws_env, region).describe_key(KeyId=kms_alias)["KeyMetadata"]["Arn"]
        assert provider.key_id(region) == arn
        assert f":kms:{region}:" in arn
    assert provider.key_id(PRIMARY) != provider.key_id(REPLICA)


def test_kms_blob_relabelled_with_other_regions_arn_is_refused_by_kms(kms_alias: str) -> None:
    """A region-A blob claiming region B's key ARN is refused by KMS in B as another key's."""
    provider = KmsKeyProvider(kms_alias)
    _, wrapped = provider.generate(PRIMARY)
    forged = WrappedKey(key_id=provider.key_id(REPLICA), blob=wrapped.blob)
    with pytest.raises(KeyProblem, match="could not open the wrapped data key") as caught:
        KmsKeyProvider(kms_alias).unwrap(forged, REPLICA)
    assert REPLICA in str(caught.value)


def test_kms_unwrap_refuses_a_file_key_blob(kms_alias: str, tmp_path: Path) -> None:
    """A blob wrapped by a key file is refused by a KMS provider, naming both keys."""
    path = tmp_path / "k.key"
    generate_key_file(path)
    _, wrapped = key_provider_from_ref(f"file:{path}").generate(None)
    with pytest.raises(KeyProblem) as caught:
        KmsKeyProvider(kms_alias).unwrap(wrapped, PRIMARY)
    assert wrapped.key_id in str(caught.value)
    assert f"kms:{kms_alias}" in str(caught.value)


def test_kms_backups_survive_moving_the_alias(aws_env: S3Server, kms_alias: str) -> None:
    """After the alias moves to a new key, data keys wrapped by the old key still unwrap."""
    data_key, old = KmsKeyProvider(kms_alias).generate(PRIMARY)
    kms = _kms(aws_env, PRIMARY)
    new_key = kms.create_key(Description="rotated")["KeyMetadata"]["KeyId"]
    kms.update_alias(AliasName=kms_alias, TargetKeyId=new_key)
    provider = KmsKeyProvider(kms_alias)
    assert provider.key_id(PRIMARY) != old.key_id
    assert provider.unwrap(old, PRIMARY) == data_key


def test_kms_multi_region_key_is_asked_for_in_the_replica_region() -> None:
    """A blob made by a multi-Region key's primary is decrypted with its replica's ARN.

    moto cannot decrypt multi-Region blobs (its ciphertext format assumes 36-character key
    ids), so this checks the KeyId drbot sends; AWS documents that replicas open each other's
    ciphertexts.
    """
    arn = "arn:aws:kms:us-east-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab"
    assert decrypt_key_id(arn, REPLICA, policy_key="kms:x") == arn.replace(PRIMARY, REPLICA)
    assert decrypt_key_id(arn, PRIMARY, policy_key="kms:x") == arn
    single = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    with pytest.raises(KeyProblem, match="made by KMS in us-east-1"):
        decrypt_key_id(single, REPLICA, policy_key="kms:x")


def test_kms_needs_a_region(kms_alias: str) -> None:
    """Every KMS operation with region None raises ValueError before any call."""
    provider = KmsKeyProvider(kms_alias)
    with pytest.raises(ValueError, match="needs a region"):
        provider.generate(None)
    with pytest.raises(ValueError, match="needs a region"):
        provider.key_id(None)


@pytest.fixture
def refusing_port() -> int:
    """A 127.0.0.1 port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A 127.0.0.1 port that accepts connections but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("port_fixture", ["refusing_port", "silent_port"])
def test_kms_unreachable_fails_quickly_with_hint(
    aws_env: S3Server, request: pytest.FixtureRequest, port_fixture: str
) -> None:
    """An endpoint that refuses or never answers gives KeyProblem 'unreachable' within seconds."""
    port = request.getfixturevalue(port_fixture)
    provider = KmsKeyProvider(
        "alias/drbot-anything",
        endpoint_url=f"http://127.0.0.1:{port}",
        connect_timeout_s=0.5,
        read_timeout_s=0.5,
        max_attempts=2,
    )
    started = time.monotonic()
    with pytest.raises(KeyProblem) as caught:
        provider.generate(REPLICA)
    assert time.monotonic() - started < 5
    assert f"KMS in {REPLICA} is unreachable" in str(caught.value)
    assert "alias/drbot-anything" in str(caught.value)
    assert caught.value.hint


def _client_error(code: str, operation: str = "Decrypt") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "from KMS"}}, operation)


@pytest.mark.parametrize(
    ("error", "action", "expected"),
    [
        (_client_error("DisabledException", "GenerateDataKey"), "generate", "is disabled"),
        (_client_error("KMSInvalidStateException"), "unwrap", "current state"),
        (_client_error("AccessDeniedException", "Encrypt"), "wrap", "denied for Encrypt"),
        (_client_error("IncorrectKeyException"), "unwrap", "could not open"),
        (_client_error("KMSInternalException"), "unwrap", "is unavailable"),
        (_client_error("UnrecognizedClientException"), "describe", "credentials"),
        (_client_error("SomethingNewException"), "wrap", "SomethingNewException"),
        (NoCredentialsError(), "generate", "no usable AWS credentials"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "wrap", "unreachable"),
    ],
)
def test_kms_errors_become_key_problems_naming_key_and_region(
    error: ClientError | NoCredentialsError, action: str, expected: str
) -> None:
    """Refusals moto cannot produce still translate to KeyProblem naming key ref and region."""
    problem = kms_error(error, key_ref="alias/drbot-shop", region=REPLICA, action=action)
    assert isinstance(problem, KeyProblem)
    assert expected in str(problem)
    assert "alias/drbot-shop" in str(problem)
    assert REPLICA in str(problem)
