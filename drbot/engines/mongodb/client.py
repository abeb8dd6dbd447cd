"""Connections to MongoDB, and the one place pymongo's errors become drbot's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bson.codec_options import CodecOptions
from bson.errors import InvalidBSON
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    InvalidURI,
    OperationFailure,
    PyMongoError,
)

from drbot.errors import ChangeHistoryLost, DatabaseError, SourceUnavailable, UsageError

SYSTEM_DATABASES = ("admin", "local", "config")
MIN_WIRE_VERSION = 17  # MongoDB 6.0: change streams with expanded (DDL) events
HISTORY_LOST = 286  # ChangeStreamHistoryLost
_FATAL_RESUME = frozenset((HISTORY_LOST, 280))  # 280: ChangeStreamFatalError (token not found)

RawClient = MongoClient[RawBSONDocument]
PLAIN: CodecOptions[dict[str, Any]] = CodecOptions(document_class=dict, tz_aware=True)


def where(uri: str) -> str:
    """host:port list of a URI, for messages (never the credentials)."""
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:
        return "mongodb"
    return netloc.rpartition("@")[2] or "mongodb"


def connect(uri: str, *, timeout_s: float = 10.0) -> RawClient:
    """A client returning raw BSON documents. Connects lazily; errors surface on first use."""
    # Timeouts the URI sets itself win (pymongo lets keyword arguments override the URI).
    given = uri.lower()
    timeouts: dict[str, Any] = {
        name: int(timeout_s * 1000)
        for name in ("serverSelectionTimeoutMS", "connectTimeoutMS")
        if f"{name.lower()}=" not in given
    }
    try:
        return MongoClient(
            uri,
            document_class=RawBSONDocument,
            **timeouts,
            # A partitioned network must fail a backup, not hang it: no single reply (a batch
            # of documents, a change-stream getMore) takes minutes.
            socketTimeoutMS=300_000,
            appname="drbot",
            tz_aware=True,
        )
    except (InvalidURI, ConfigurationError) as exc:
        raise UsageError(f"bad MongoDB URI for {where(uri)}: {exc}") from None


def translate(exc: PyMongoError, what: str) -> Exception:
    """drbot's error for a pymongo error met while doing `what` (e.g. 'dump shop.orders')."""
    if isinstance(exc, ConnectionFailure):
        return SourceUnavailable(f"{what}: cannot reach MongoDB: {_first_line(exc)}")
    if isinstance(exc, OperationFailure):
        if exc.code in _FATAL_RESUME:
            return ChangeHistoryLost(
                f"{what}: the server no longer holds the change history to resume from "
                f"({exc.code}: {_first_line(exc)})",
                hint="a new full backup starts a new unbroken history",
            )
        if exc.code in (13, 18):  # Unauthorized, AuthenticationFailed
            return SourceUnavailable(f"{what}: MongoDB refused access: {_first_line(exc)}")
        return DatabaseError(f"{what}: MongoDB error {exc.code}: {_first_line(exc)}")
    return DatabaseError(f"{what}: {_first_line(exc)}")


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Run a block, turning pymongo's (and the bson codec's) errors into drbot's."""
    try:
        yield
    except PyMongoError as exc:
        raise translate(exc, what) from None
    except InvalidBSON as exc:
        raise DatabaseError(f"{what}: the server sent BSON that cannot be read: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


@dataclass(frozen=True)
class Topology:
    """What `hello` says about a deployment."""

    kind: str  # "replica_set" | "sharded" | "standalone"
    set_name: str | None
    server_version: str
    wire_version: int = 0

    @property
    def has_change_streams(self) -> bool:
        return self.kind != "standalone"


def topology(client: RawClient, uri: str) -> Topology:
    """Ask the deployment what it is. `SourceUnavailable` if it cannot be reached."""
    with translated(f"probe {where(uri)}"):
        hello = client.admin.command("hello", codec_options=PLAIN)
        version = str(client.admin.command("buildInfo", codec_options=PLAIN).get("version", "?"))
    if hello.get("msg") == "isdbgrid":
        kind = "sharded"
    elif hello.get("setName"):
        kind = "replica_set"
    else:
        kind = "standalone"
    topo = Topology(
        kind=kind,
        set_name=hello.get("setName"),
        server_version=version,
        wire_version=int(hello.get("maxWireVersion", 0)),
    )
    if topo.has_change_streams and topo.wire_version < MIN_WIRE_VERSION:
        raise DatabaseError(
            f"{where(uri)} runs MongoDB {version}: drbot needs 6.0 or newer, whose change "
            "streams report collection and index changes (showExpandedEvents)",
            hint="upgrade the deployment, or back it up with mongodump meanwhile",
        )
    return topo
