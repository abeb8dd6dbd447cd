"""AWS KMS keys: each region's KMS key wraps the data key for that region's destinations.

The policy names the key once ("kms:alias/drbot-shop"); the same alias (or multi-Region key)
must exist in every destination region. Each destination's copy of a data key is wrapped by
its own region's key, so a restore from a replica region only ever talks to that region's KMS.
Every KMS call carries the encryption context {"drbot": "data-key-v1"}; docs/keys.md shows
how to unwrap by hand with `aws kms decrypt`.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from drbot.errors import KeyProblem
from drbot.pipeline.keys import KeyProvider, WrappedKey

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

DATA_KEY_BYTES = 32
ENCRYPTION_CONTEXT = {"drbot": "data-key-v1"}

_KEY_ARN = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):kms:(?P<region>[a-z0-9-]+):(?P<account>\d+)"
    r":key/(?P<key>[A-Za-z0-9-]+)$"
)

_UNAVAILABLE = frozenset(
    {
        "KeyUnavailableException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "ThrottlingException",
        "LimitExceededException",
        "ServiceUnavailable",
        "InternalFailure",
    }
)
_BAD_CREDENTIALS = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
    }
)
_NOT_OPENABLE = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})


def require_region(region: str | None, key_ref: str) -> str:
    """`region` itself; ValueError if it is None, because KMS keys live in a region.

    Policy validation should reject a kms key for a destination without a region before any
    key operation runs (see drbot.pipeline.keyref.key_ref_needs_region); this is the backstop.
    """
    if region is None:
        raise ValueError(
            f"KMS key {key_ref} needs a region; every destination of a policy with a kms key "
            "must have one"
        )
    return region


class KmsKeyProvider:
    """KeyProvider backed by AWS KMS, one KMS client per region, created on first use.

    `key_ref` is what follows "kms:" in the policy: an alias ("alias/drbot-shop"), a key id,
    or an ARN. Clients use botocore's standard retry mode with `max_attempts` attempts and the
    given timeouts; the endpoint is `endpoint_url`, else whatever boto3 resolves itself
    (AWS_ENDPOINT_URL and friends, else the public KMS endpoint of the region). Credentials
    come from boto3's default chain.

    Every method raises ValueError for region None and KeyProblem (naming the key ref and the
    region) for anything KMS or the network refuses. Thread-safe.
    """

    def __init__(
        self,
        key_ref: str,
        *,
        endpoint_url: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        max_attempts: int = 5,
    ) -> None:
        if not key_ref:
            raise ValueError("a KMS key reference must not be empty")
        self._ref = key_ref
        self._endpoint_url = endpoint_url
        self._config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"mode": "standard", "max_attempts": max_attempts},
        )
        self._lock = threading.Lock()
        self._session: boto3.session.Session | None = None
        self._clients: dict[str, KMSClient] = {}
        self._arns: dict[str, str] = {}

    @property
    def key_ref(self) -> str:
        """The key reference as given (without the 'kms:' prefix)."""
        return self._ref

    def describe(self) -> str:
        """'kms:' + the key reference, as in the policy."""
        return f"kms:{self._ref}"

    def key_id(self, region: str | None) -> str:
        """The ARN of the key `key_ref` resolves to in `region` (DescribeKey, then cached)."""
        region = require_region(region, self.describe())
        with self._lock:
            cached = self._arns.get(region)
        if cached is not None:
            return cached
        client = self._client(region)
        try:
            arn = client.describe_key(KeyId=self._ref)["KeyMetadata"]["Arn"]
        except (ClientError, BotoCoreError) as exc:
            raise kms_error(exc, key_ref=self._ref, region=region, action="describe") from None
        return self._remember_arn(region, arn)

    def generate(self, region: str | None) -> tuple[bytes, WrappedKey]:
        """A fresh 32-byte data key from KMS GenerateDataKey in `region`, and its wrapping."""
        region = require_region(region, self.describe())
        client = self._client(region)
        try:
            response = client.generate_data_key(
                KeyId=self._ref, KeySpec="AES_256", EncryptionContext=ENCRYPTION_CONTEXT
            )
        except (ClientError, BotoCoreError) as exc:
            raise kms_error(exc, key_ref=self._ref, region=region, action="generate") from None
        data_key = self._checked_data_key(response["Plaintext"], region)
        arn = self._remember_arn(region, response["KeyId"])
        return data_key, WrappedKey(key_id=arn, blob=response["CiphertextBlob"])

    def wrap(self, data_key: bytes, region: str | None) -> WrappedKey:
        """`data_key` encrypted by KMS Encrypt with `region`'s key.

        Raises ValueError if `data_key` is not 32 bytes (a caller bug).
        """
        region = require_region(region, self.describe())
        if len(data_key) != DATA_KEY_BYTES:
            raise ValueError(f"data keys are {DATA_KEY_BYTES} bytes, got {len(data_key)}")
        client = self._client(region)
        try:
            response = client.encrypt(
                KeyId=self._ref, Plaintext=data_key, EncryptionContext=ENCRYPTION_CONTEXT
            )
        except (ClientError, BotoCoreError) as exc:
            raise kms_error(exc, key_ref=self._ref, region=region, action="wrap") from None
        arn = self._remember_arn(region, response["KeyId"])
        return WrappedKey(key_id=arn, blob=response["CiphertextBlob"])

    def schedule_deletion(self, region: str, days: int = 7) -> str:
        """Schedule the key of `region` for deletion in `days` (7..30, KMS's own limits); returns
        its ARN. Until then AWS can still cancel it (CancelKeyDeletion). Raises KeyProblem."""
        arn = self.key_id(region)
        client = self._client(region)
        try:
            state = client.describe_key(KeyId=arn)["KeyMetadata"].get("KeyState")
            if state != "PendingDeletion":  # already scheduled: an interrupted shred, rerun
                # The key id (the ARN's last part) names the key in this region's client.
                key_id = arn.rsplit("/", 1)[-1]
                client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=days)
        except (ClientError, BotoCoreError) as exc:
            raise kms_error(exc, key_ref=self._ref, region=region, action="shred") from None
        return arn

    def unwrap(self, wrapped: WrappedKey, region: str | None) -> bytes:
        """The data key inside `wrapped`, by KMS Decrypt in `region` with the key that made it.

        Decrypt names `wrapped.key_id` (not the alias), so backups made before the alias was
        moved to a new key still open while the old key exists. Raises KeyProblem, before any
        KMS call, if `wrapped` was not made by a KMS key or was made in another region (except
        multi-Region keys, whose replica in `region` is asked instead).
        """
        region = require_region(region, self.describe())
        key_id = decrypt_key_id(wrapped.key_id, region, policy_key=self.describe())
        client = self._client(region)
        try:
            response = client.decrypt(
                CiphertextBlob=wrapped.blob, KeyId=key_id, EncryptionContext=ENCRYPTION_CONTEXT
            )
        except (ClientError, BotoCoreError) as exc:
            raise kms_error(exc, key_ref=self._ref, region=region, action="unwrap") from None
        return self._checked_data_key(response["Plaintext"], region)

    def _checked_data_key(self, data_key: bytes, region: str) -> bytes:
        if len(data_key) != DATA_KEY_BYTES:
            raise KeyProblem(
                f"KMS key {self._ref} in {region} returned a {len(data_key)}-byte data key, "
                f"expected {DATA_KEY_BYTES}"
            )
        return data_key

    def _remember_arn(self, region: str, arn: str) -> str:
        with self._lock:
            return self._arns.setdefault(region, arn)

    def _client(self, region: str) -> KMSClient:
        with self._lock:
            client = self._clients.get(region)
            if client is not None:
                return client
            try:
                # Sessions are not thread-safe; one per provider, used only under the lock.
                if self._session is None:
                    self._session = boto3.session.Session()
                client = self._session.client(
                    "kms",
                    region_name=region,
                    endpoint_url=self._endpoint_url,
                    config=self._config,
                )
            except (BotoCoreError, ValueError) as exc:
                raise KeyProblem(
                    f"cannot set up a KMS client for key {self._ref} in {region}: {exc}"
                ) from None
            self._clients[region] = client
            return client


def decrypt_key_id(wrapped_key_id: str, region: str, *, policy_key: str) -> str:
    """The KeyId to pass to KMS Decrypt in `region` for a data key wrapped by `wrapped_key_id`.

    That is `wrapped_key_id` itself when it is a KMS key ARN in `region`, or, for a multi-Region
    key (id "mrk-..."), the ARN of its replica in `region`. Raises KeyProblem, naming
    `policy_key`, if `wrapped_key_id` is not a KMS key ARN or belongs to another region.
    """
    match = _KEY_ARN.match(wrapped_key_id)
    if match is None:
        raise KeyProblem(
            f"backup was encrypted with key {wrapped_key_id}, but the policy key is {policy_key}",
            hint="restore with the key the backup was made with (its id is in the manifest)",
        )
    if match["region"] == region:
        return wrapped_key_id
    if match["key"].startswith("mrk-"):
        # Replicas of a multi-Region key share its key id and open each other's blobs.
        start, end = match.span("region")
        return wrapped_key_id[:start] + region + wrapped_key_id[end:]
    raise KeyProblem(
        f"wrapped data key was made by KMS in {match['region']} ({wrapped_key_id}), so "
        f"KMS in {region} cannot open it",
        hint=f"use the wrapped key stored with the {region} destination; each region's "
        "copy is wrapped by that region's key",
    )


def kms_error(
    exc: ClientError | BotoCoreError, *, key_ref: str, region: str, action: str
) -> KeyProblem:
    """Translate a botocore error from a KMS call into a KeyProblem naming key and region.

    `action` is one of "describe", "generate", "wrap", "unwrap" and shapes the message.
    """
    if isinstance(exc, ClientError):
        return _client_error(exc, key_ref=key_ref, region=region, action=action)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return KeyProblem(
            f"no usable AWS credentials to use KMS key {key_ref} in {region}: {exc}",
            hint="provide credentials the standard AWS way (environment, profile, or role)",
        )
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError):
        return KeyProblem(
            f"KMS in {region} is unreachable (key {key_ref}): {exc}",
            hint=f"check network access to KMS in {region}; a restore can instead use a "
            "destination in another region, whose copy is wrapped by that region's key",
        )
    return KeyProblem(f"KMS call for key {key_ref} in {region} failed: {exc}")


_API = {
    "describe": "DescribeKey",
    "generate": "GenerateDataKey",
    "wrap": "Encrypt",
    "shred": "ScheduleKeyDeletion",
}


def _client_error(exc: ClientError, *, key_ref: str, region: str, action: str) -> KeyProblem:
    error = exc.response.get("Error", {})
    code = error.get("Code", "Unknown")
    detail = error.get("Message", "")
    where = f"KMS key {key_ref} in {region}"
    hint: str | None = None
    if code == "NotFoundException":
        message = f"{where} not found ({detail})"
        hint = (
            f"create the key or alias in {region}, or fix the policy's key; every destination "
            "region needs a key under the same name"
        )
    elif action == "unwrap" and (code in _NOT_OPENABLE or code == "AccessDeniedException"):
        # For Decrypt, KMS reports a blob made by another key as AccessDenied or IncorrectKey.
        message = (
            f"{where} could not open the wrapped data key ({code}): it was made by another key "
            "or region, was tampered with, or kms:Decrypt is not allowed"
        )
        hint = (
            "check the backup's key id in its manifest and that drbot's AWS identity may call "
            "kms:Decrypt on that key"
        )
    elif code == "AccessDeniedException":
        api = _API.get(action, "Decrypt")
        message = f"access to {where} denied for {api} ({detail})"
        hint = f"allow kms:{api} on the key for drbot's AWS identity (key policy or IAM)"
    elif code == "DisabledException":
        message = f"{where} is disabled"
        hint = f"enable it: aws kms enable-key --region {region} --key-id <key id>"
    elif code == "KMSInvalidStateException":
        message = f"{where} cannot be used in its current state ({detail})"
        hint = (
            "if it is pending deletion, stop that now: aws kms cancel-key-deletion "
            f"--region {region} --key-id <key id>"
        )
    elif code in _UNAVAILABLE:
        message = f"KMS in {region} is unavailable for key {key_ref} ({code})"
        hint = "retry later, or restore from a destination in another region"
    elif code in _BAD_CREDENTIALS:
        message = f"KMS in {region} rejected drbot's AWS credentials ({code}) for key {key_ref}"
        hint = "check the AWS credentials drbot runs with (environment, profile, or role)"
    else:
        message = f"{where} refused to {action}: {code} ({detail})"
    return KeyProblem(message, hint=hint)


_: type[KeyProvider] = KmsKeyProvider
