"""A destination in an S3 bucket (s3://bucket/prefix), in any region or S3-compatible endpoint.

Retries, backoff and timeouts are botocore's (`standard` mode); this module adds none of its
own. Every call goes through `_s3_errors`, the one place botocore's exceptions become drbot's,
so nothing from boto3 reaches callers, including errors raised while iterating `open`.

Conditional writes (`put_if`) are S3's own: PutObject with If-None-Match / If-Match, tag = ETag.
In a versioned bucket each one leaves the replaced version behind as noncurrent; `put_if`
deletes it at once (best effort), so a lease renewed every few seconds does not pile up versions.
"""

from __future__ import annotations

import builtins
import collections
import functools
import hashlib
from base64 import b64encode
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from drbot.clock import Clock, SystemClock
from drbot.errors import (
    DrbotError,
    ObjectNotFound,
    PolicyInvalid,
    PreconditionFailed,
    StorageUnavailable,
)
from drbot.storage.base import ObjectInfo, ObjectLock, PutResult, Storage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = structlog.get_logger(__name__)

MiB = 1 << 20
MIN_PART_BYTES = 5 * MiB  # S3's minimum for every part but the last
# Parts grow to at most this: memory per S3 destination stays under ~2 parts whatever the
# size, and 10,000 parts still reach ~1.7 TiB (16 MiB base) per object.
MAX_PART_BYTES = 256 * MiB
PARTS_PER_SIZE_STEP = 1000  # part size doubles every 1000 parts: 10,000 parts reach ~TiBs
READ_CHUNK_BYTES = MiB
# Parts uploaded at once by one put: while one waits on the network the next is sent, so the
# pipeline behind it is not held up by each part's round trip (against a real region, tens of
# milliseconds per part). Each adds a part's memory; on loopback to moto, 2 cores, the gain is
# within the noise, as the machine is CPU-bound there.
UPLOAD_CONCURRENCY = 2

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_CREDENTIALS = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
    }
)
_WRONG_REGION = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "301"})
# A conditional write that lost: 412, or 409 when another conditional write was in flight.
_CONDITION_LOST = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
_CREDENTIALS_HINT = (
    "check the AWS credentials drbot runs with (AWS_PROFILE, AWS_ACCESS_KEY_ID, instance role) "
    "and that their policy allows s3:{op} on bucket {bucket}"
)


def part_size_for(part_number: int, base_bytes: int) -> int:
    """Size of part `part_number` (1-based): `base_bytes`, doubling every 1000 parts, capped.

    S3 allows 10,000 parts; a fixed 16 MiB would cap objects at ~156 GiB. Growing the part size
    keeps small objects cheap and large ones possible; the cap bounds memory (~2 parts).
    """
    step = (part_number - 1) // PARTS_PER_SIZE_STEP
    return min(base_bytes << step, MAX_PART_BYTES)


class _Parts:
    """The parts of one multipart upload, up to UPLOAD_CONCURRENCY of them in flight at once."""

    def __init__(self, storage: S3Storage, key: str, full: str, upload_id: str) -> None:
        self.upload_id = upload_id
        self._upload = functools.partial(storage._upload_part, key, full, upload_id)
        self._pool = ThreadPoolExecutor(UPLOAD_CONCURRENCY, thread_name_prefix=f"s3-{storage.name}")
        self._done: builtins.list[CompletedPartTypeDef] = []
        self._in_flight: collections.deque[Future[CompletedPartTypeDef]] = collections.deque()

    @property
    def count(self) -> int:
        """Parts handed to `send` so far."""
        return len(self._done) + len(self._in_flight)

    def send(self, body: bytes) -> None:
        """Upload `body` as the next part; waits first while too many are in flight. Raises
        what an earlier part's upload raised (StorageUnavailable)."""
        while len(self._in_flight) >= UPLOAD_CONCURRENCY:
            self._done.append(self._in_flight.popleft().result())
        self._in_flight.append(self._pool.submit(self._upload, self.count + 1, body))

    def finish(self) -> builtins.list[CompletedPartTypeDef]:
        """Every part, in order, once all are uploaded."""
        try:
            while self._in_flight:
                self._done.append(self._in_flight.popleft().result())
        finally:
            self._pool.shutdown(wait=True)
        return self._done

    def cancel(self) -> None:
        """Drop the parts not yet started and wait for those under way (before the abort)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class S3Storage:
    """Objects under `prefix` in `bucket`; keys given to methods are relative to the prefix."""

    def __init__(
        self,
        name: str,
        bucket: str,
        prefix: str,
        region: str,
        *,
        endpoint_url: str | None = None,
        object_lock: ObjectLock | None = None,
        part_size: int = 8 * MiB,
        max_attempts: int = 5,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        """Build the client (no network call yet). ValueError if `part_size` is below 5 MiB.

        `endpoint_url` None means AWS, or the standard AWS_ENDPOINT_URL variable, which boto3
        reads itself. `max_attempts` and the timeouts go to botocore's retry configuration.
        """
        if part_size < MIN_PART_BYTES:
            raise ValueError(f"part_size must be at least {MIN_PART_BYTES} bytes (S3 minimum)")
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region: str | None = region
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.object_lock = object_lock
        self.part_size = part_size
        self._clock: Clock = clock or SystemClock()
        # full key -> (ETag, VersionId) last read or written by read_tagged/put_if, so put_if
        # knows which version it replaced without listing versions.
        self._seen_versions: dict[str, tuple[str, str]] = {}
        config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
        )
        # A session per storage: boto3's default session is not safe to share across threads.
        self._client: S3Client = boto3.session.Session().client(
            "s3", region_name=region, endpoint_url=endpoint_url, config=config
        )

    # -- helpers -------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ValueError(f"invalid object key {key!r}: must be non-empty and relative")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key else self.url

    def _translate(self, exc: Exception, op: str, key: str | None) -> DrbotError:
        """The drbot error for a botocore exception raised by `op` on `key` (or the bucket)."""
        where = self._where(key)
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            message = str(error.get("Message", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND and key is not None:
                return ObjectNotFound(f"{where} does not exist")
            if code == "NoSuchBucket" or code in _NOT_FOUND:
                return StorageUnavailable(
                    f"bucket {self.bucket!r} does not exist in region {self.region} ({self.url})",
                    hint="create the bucket, or fix the destination's url, region or endpoint",
                )
            if code in _CREDENTIALS:
                return StorageUnavailable(
                    f"{where}: {op} was refused ({code}: {message or 'access denied'})",
                    hint=_CREDENTIALS_HINT.format(op=op, bucket=self.bucket),
                )
            if code in _WRONG_REGION:
                return StorageUnavailable(
                    f"{where}: {op} failed ({code}): "
                    f"bucket {self.bucket!r} is not in {self.region}",
                    hint="set the destination's region to the bucket's region",
                )
            if code == "InvalidRequest" and "ObjectLock" in message.replace(" ", ""):
                return PolicyInvalid(
                    f"{self.url}: object lock is configured but the bucket refuses it ({message})",
                    hint=f"enable Object Lock on bucket {self.bucket}, or remove object_lock "
                    f"from destination {self.name}",
                )
            return StorageUnavailable(
                f"{where}: {op} failed after retries: {code} (HTTP {status}) {message}".rstrip()
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return StorageUnavailable(
                f"{self.url}: no usable AWS credentials for {op} ({exc})",
                hint=_CREDENTIALS_HINT.format(op=op, bucket=self.bucket),
            )
        if isinstance(exc, ParamValidationError):
            return DrbotError(f"{where}: {op} was called with invalid parameters: {exc}")
        return StorageUnavailable(
            f"{where}: {op} failed after retries: {exc}",
            hint="check that the S3 endpoint is reachable from this host",
        )

    @contextmanager
    def _s3_errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate botocore exceptions raised inside the block; let everything else through."""
        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, op, key) from exc

    def _check_bucket(self) -> None:
        """StorageUnavailable if the bucket is missing or unreachable."""
        with self._s3_errors("HeadBucket"):
            self._client.head_bucket(Bucket=self.bucket)

    def _lock_args(self) -> dict[str, Any]:
        if self.object_lock is None:
            return {}
        # Whole seconds, so re-applying the same date (after multipart) never shortens it.
        until = self._clock.now().replace(microsecond=0) + timedelta(days=self.object_lock.days)
        return {
            "ObjectLockMode": self.object_lock.mode.upper(),
            "ObjectLockRetainUntilDate": until,
        }

    # -- Storage -------------------------------------------------------------------------

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        """Stream `chunks` to `key`: one PutObject up to `part_size`, else a multipart upload.

        Up to UPLOAD_CONCURRENCY parts are in flight while the next one fills, so memory stays
        near three parts. On any exception (from `chunks`, S3, or an interrupt) the parts in
        flight are waited for, the multipart upload is aborted and the exception propagates; S3
        failures arrive as StorageUnavailable (or PolicyInvalid if the bucket refuses object
        lock).
        """
        full = self._key(key)
        lock = self._lock_args()
        digest = hashlib.sha256()
        buffer = bytearray()
        size = 0
        upload: _Parts | None = None
        parts = 1
        try:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                buffer += chunk
                # Strictly greater: an object of exactly one part size stays a single PutObject.
                while len(buffer) > (
                    part_bytes := part_size_for((upload.count if upload else 0) + 1, self.part_size)
                ):
                    if upload is None:
                        upload = _Parts(self, key, full, self._create_upload(key, full, lock))
                    with memoryview(buffer) as view:
                        body = bytes(view[:part_bytes])
                    del buffer[:part_bytes]
                    upload.send(body)
            if upload is None:
                self._put_single(key, full, bytes(buffer), digest.digest(), lock)
            else:
                if buffer:
                    upload.send(bytes(buffer))
                    buffer.clear()
                self._complete_upload(key, full, upload.upload_id, upload.finish())
                parts = upload.count
                upload = None
                if lock:
                    self._ensure_lock(key, full, lock)
        except BaseException:
            if upload is not None:
                upload.cancel()
                self._abort_upload(key, full, upload.upload_id)
            raise
        log.debug(
            "storage.put_completed",
            destination=self.name,
            key=key,
            size_bytes=size,
            parts=parts,
        )
        return PutResult(key=key, size_bytes=size, sha256=digest.hexdigest())

    def _put_single(
        self, key: str, full: str, body: bytes, sha256: bytes, lock: dict[str, Any]
    ) -> None:
        with self._s3_errors("PutObject", key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=body,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=b64encode(sha256).decode(),
                **lock,
            )

    def _create_upload(self, key: str, full: str, lock: dict[str, Any]) -> str:
        with self._s3_errors("CreateMultipartUpload", key):
            created = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", **lock
            )
        return created["UploadId"]

    def _upload_part(
        self, key: str, full: str, upload_id: str, number: int, body: bytes
    ) -> CompletedPartTypeDef:
        checksum = b64encode(hashlib.sha256(body).digest()).decode()
        with self._s3_errors("UploadPart", key):
            uploaded = self._client.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
        return {"PartNumber": number, "ETag": uploaded["ETag"], "ChecksumSHA256": checksum}

    def _complete_upload(
        self, key: str, full: str, upload_id: str, parts: builtins.list[CompletedPartTypeDef]
    ) -> None:
        with self._s3_errors("CompleteMultipartUpload", key):
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )

    def _ensure_lock(self, key: str, full: str, lock: dict[str, Any]) -> None:
        """Make sure a completed multipart object carries its lock, or remove it and raise.

        S3 applies the lock given at CreateMultipartUpload; some S3-compatible servers (moto
        among them) ignore it there, so check and set it explicitly. If that is refused, the
        unlocked object must not stay behind looking like a successful put.
        """
        try:
            with self._s3_errors("HeadObject", key):
                head = self._client.head_object(Bucket=self.bucket, Key=full)
            if head.get("ObjectLockMode") is not None:
                return
            with self._s3_errors("PutObjectRetention", key):
                self._client.put_object_retention(
                    Bucket=self.bucket,
                    Key=full,
                    Retention={
                        "Mode": lock["ObjectLockMode"],
                        "RetainUntilDate": lock["ObjectLockRetainUntilDate"],
                    },
                )
        except DrbotError:
            try:
                with self._s3_errors("DeleteObject", key):
                    self._client.delete_object(Bucket=self.bucket, Key=full)
            except DrbotError as exc:
                log.warning(
                    "storage.unlocked_object_left", destination=self.name, key=key, error=str(exc)
                )
            raise

    def _abort_upload(self, key: str, full: str, upload_id: str) -> None:
        """Best effort: the original error matters more; `abort_incomplete` mops up later."""
        try:
            with self._s3_errors("AbortMultipartUpload", key):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id
                )
        except DrbotError as exc:
            log.warning("storage.abort_failed", destination=self.name, key=key, error=str(exc))
        else:
            log.info("storage.put_aborted", destination=self.name, key=key)

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the object's bytes from `offset` (`length` of them, or to the end), ~1 MiB a chunk.

        Raises (when iterated) ObjectNotFound if absent, StorageUnavailable if S3 fails, also
        midway through the stream; ValueError for a negative offset/length or an invalid key.
        """
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        return self._read(key, self._key(key), offset, length)

    def _read(self, key: str, full: str, offset: int, length: int | None) -> Iterator[bytes]:
        if length == 0:
            self.stat(key)  # still report a missing object
            return
        end = "" if length is None else str(offset + length - 1)
        with self._s3_errors("GetObject", key):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{end}"
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                    raise
                # Starting at or past the end: nothing to read, as for a file.
                return
            body = response["Body"]
            try:
                yield from body.iter_chunks(READ_CHUNK_BYTES)
            finally:
                body.close()

    def stat(self, key: str) -> ObjectInfo:
        """Size and time of `key`; ObjectNotFound if absent, StorageUnavailable if S3 fails."""
        full = self._key(key)
        try:
            with self._s3_errors("HeadObject", key):
                head = self._client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            # HEAD answers a bare 404 for a missing bucket too; tell the two apart.
            self._check_bucket()
            raise
        return ObjectInfo(
            key=key, size_bytes=head["ContentLength"], modified_at=head["LastModified"]
        )

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key (S3's own order).

        Raises StorageUnavailable (when iterated) if S3 fails or the bucket is missing.
        """
        paginator = self._client.get_paginator("list_objects_v2")
        with self._s3_errors("ListObjectsV2"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        key=self._relative(item["Key"]),
                        size_bytes=item["Size"],
                        modified_at=item["LastModified"],
                    )

    def delete(self, key: str) -> None:
        """Remove `key`; a missing object is fine.

        With object lock configured, every version of the key is deleted (a plain delete would
        only hide it behind a delete marker), so a still-locked version raises DrbotError naming
        the date it is locked until. StorageUnavailable if S3 fails.
        """
        full = self._key(key)
        if self.object_lock is None:
            with self._s3_errors("DeleteObject", key):
                self._client.delete_object(Bucket=self.bucket, Key=full)
            return
        for version_id in self._versions(key, full):
            try:
                with self._s3_errors("DeleteObject", key):
                    self._client.delete_object(Bucket=self.bucket, Key=full, VersionId=version_id)
            except StorageUnavailable as exc:
                locked = self._locked_until(key, full, version_id)
                if locked is None:
                    raise
                raise DrbotError(
                    f"{self._where(key)} (version {version_id}) is under object lock until "
                    f"{locked.isoformat()} and cannot be deleted before then",
                    hint="retention must not be shorter than the destination's object_lock days",
                ) from exc

    def _versions(self, key: str, full: str) -> builtins.list[str]:
        """Ids of every version and delete marker of exactly `full`, oldest first: a delete cut
        short leaves the newest version current, never an older one back in its place."""
        found: builtins.list[tuple[datetime, str]] = []
        paginator = self._client.get_paginator("list_object_versions")
        with self._s3_errors("ListObjectVersions", key):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                entries = [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
                found.extend(
                    (e["LastModified"], e["VersionId"]) for e in entries if e.get("Key") == full
                )
        return [version for _when, version in sorted(found)]

    def _locked_until(self, key: str, full: str, version_id: str) -> datetime | None:
        """When the version's retention ends, if it is still locked; None otherwise."""
        try:
            with self._s3_errors("HeadObject", key):
                head = self._client.head_object(Bucket=self.bucket, Key=full, VersionId=version_id)
        except DrbotError:
            return None
        until = head.get("ObjectLockRetainUntilDate")
        if until is not None and until > self._clock.now():
            return until
        return None

    def abort_incomplete(self, prefix: str) -> int:
        """Abort every multipart upload under `prefix`; returns how many.

        Raises StorageUnavailable on failure.

        Callers must make sure no put under `prefix` is running (they hold the policy's lock).
        """
        aborted = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        with self._s3_errors("ListMultipartUploads"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
                for upload in page.get("Uploads", []):
                    try:
                        self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    except ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                            raise
                        continue  # finished or aborted meanwhile
                    aborted += 1
        if aborted:
            log.info("storage.incomplete_aborted", destination=self.name, count=aborted)
        return aborted

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The whole object and its ETag (the tag `put_if` expects).

        ObjectNotFound if absent, StorageUnavailable if S3 fails or the bucket is missing.
        """
        full = self._key(key)
        with self._s3_errors("GetObject", key):
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            body = response["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        tag = response["ETag"]
        self._remember_version(full, tag, response.get("VersionId"))
        return data, tag

    def put_if(self, key: str, data: bytes, *, expected: str | None) -> str:
        """Store `data` at `key` only if its ETag is `expected` (None: only if it is absent).

        Returns the new ETag. PreconditionFailed if the condition does not hold (412; 409 when
        another conditional write raced; 404 for If-Match on a missing object), other failures
        as `put` reports them. Never object-locked. After replacing a version in a versioned
        bucket, deletes the replaced version (best effort: failures, e.g. under a default
        retention, are only logged).

        botocore retries a request whose answer was lost: if the first attempt had succeeded,
        the retry reports PreconditionFailed although `data` was stored. Callers that put their
        own identity in `data` can tell by reading it back.
        """
        full = self._key(key)
        condition: dict[str, Any] = (
            {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        )
        checksum = b64encode(hashlib.sha256(data).digest()).decode()
        try:
            response = self._client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
                **condition,
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CONDITION_LOST or status == 412 or (expected and code == "NoSuchKey"):
                raise PreconditionFailed(
                    f"{self._where(key)} changed: expected {expected or 'no object'} ({code})"
                ) from exc
            raise self._translate(exc, "PutObject", key) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "PutObject", key) from exc
        tag = response["ETag"]
        version = response.get("VersionId")
        replaced = self._seen_versions.get(full)
        self._remember_version(full, tag, version)
        if expected is not None and version and replaced and replaced[0] == expected:
            self._drop_version(key, full, replaced[1])
        return tag

    def _remember_version(self, full: str, tag: str, version: str | None) -> None:
        if version and version != "null":
            self._seen_versions[full] = (tag, version)
        else:
            self._seen_versions.pop(full, None)

    def _drop_version(self, key: str, full: str, version_id: str) -> None:
        """Delete a now noncurrent version `put_if` replaced; never raises."""
        try:
            with self._s3_errors("DeleteObject", key):
                self._client.delete_object(Bucket=self.bucket, Key=full, VersionId=version_id)
        except DrbotError as exc:
            log.debug(
                "storage.version_cleanup_failed",
                destination=self.name,
                key=key,
                version_id=version_id,
                error=str(exc),
            )


_: type[Storage] = S3Storage
