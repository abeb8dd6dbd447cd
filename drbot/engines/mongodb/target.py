"""What a restore needs to know of, and do to, its target deployment besides loading."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, cast

from drbot.engines.base import Fingerprint
from drbot.engines.mongodb.client import PLAIN, SYSTEM_DATABASES, RawClient, translated, where
from drbot.engines.mongodb.dump import split_batch, user_collections
from drbot.engines.mongodb.fingerprint import CollectionSummer
from drbot.engines.mongodb.replay import NamespaceFilter


def _covered(
    client: RawClient, uri: str, covers: NamespaceFilter
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(database, collection, listCollections entry) of every covered namespace in the target."""
    with translated(f"inspect target {where(uri)}"):
        names = client.admin.command("listDatabases", nameOnly=True, codec_options=PLAIN)
        for entry in names["databases"]:
            db = str(entry["name"])
            if db in SYSTEM_DATABASES or not covers(db, None):
                continue
            for info in user_collections(client, db):
                if covers(db, str(info["name"])):
                    yield db, str(info["name"]), info


def occupied(client: RawClient, uri: str, covers: NamespaceFilter) -> list[str]:
    """The namespaces a restore would write that already hold documents (or are views)."""
    with translated(f"inspect target {where(uri)}"):
        return [
            f"{db}.{name}"
            for db, name, info in _covered(client, uri, covers)
            if info.get("type") == "view" or client[db][name].find_one({}, {"_id": 1})
        ]


def existing(client: RawClient, uri: str, covers: NamespaceFilter) -> list[str]:
    """Every namespace in the target's covered databases, empty or not."""
    return [f"{db}.{name}" for db, name, _ in _covered(client, uri, covers)]


def drop(client: RawClient, uri: str, namespaces: Iterable[str]) -> None:
    with translated(f"drop collections in {where(uri)}"):
        for ns in namespaces:
            db, _, name = ns.partition(".")
            client[db].drop_collection(name)


def fingerprint(client: RawClient, uri: str, namespaces: Iterable[str]) -> Fingerprint:
    """The fingerprint (drbot/engines/mongodb/fingerprint.py) of each namespace in the target."""
    tables = {}
    with translated(f"fingerprint {where(uri)}"):
        for ns in namespaces:
            db, _, name = ns.partition(".")
            summer = CollectionSummer()
            for batch in client[db][name].find_raw_batches():
                for doc in split_batch(cast(bytes, batch)):
                    summer.add(bytes(doc))
            tables[ns] = summer.result()
    return Fingerprint(tables=tables)
