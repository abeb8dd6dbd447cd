"""Destination URLs to Storage objects: `file:///abs/dir` and `s3://bucket[/prefix]`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from drbot.errors import PolicyInvalid
from drbot.storage.base import ObjectLock, Storage
from drbot.storage.local import LocalStorage


def open_storage(
    name: str,
    url: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    object_lock: ObjectLock | None = None,
) -> Storage:
    """The Storage for destination `name` at `url`. No I/O happens here.

    Raises PolicyInvalid for an unsupported scheme, a relative file path, an s3 URL without a
    bucket or region, or object lock on a local directory (it cannot be enforced there).
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise PolicyInvalid(f"destination {name}: {url} names a host; use file:///abs/path")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise PolicyInvalid(f"destination {name}: {url} must be an absolute path")
        if object_lock is not None:
            raise PolicyInvalid(
                f"destination {name}: object_lock needs S3; a local directory cannot enforce it"
            )
        return LocalStorage(name, Path(path))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise PolicyInvalid(f"destination {name}: {url} has no bucket (s3://bucket/prefix)")
        if not region:
            raise PolicyInvalid(
                f"destination {name}: s3 destinations need a region",
                hint="add `region:` (e.g. us-east-1) to the destination",
            )
        # boto3 costs a third of a second to import; local destinations do not pay for it.
        from drbot.storage.s3 import S3Storage

        return S3Storage(
            name,
            parts.netloc,
            unquote(parts.path).strip("/"),
            region,
            endpoint_url=endpoint_url,
            object_lock=object_lock,
        )
    raise PolicyInvalid(
        f"destination {name}: unsupported url {url!r}",
        hint="use file:///absolute/dir or s3://bucket/prefix",
    )
