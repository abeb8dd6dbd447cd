"""Turn a validated policy into the objects the core works with (the only place that does)."""

from __future__ import annotations

from typing import Any

from drbot.engines.base import BackupSource, Engine
from drbot.errors import UsageError
from drbot.ops.backup import BackupSettings
from drbot.pipeline.keyref import key_provider_from_ref
from drbot.pipeline.keys import KeyProvider
from drbot.storage.base import ObjectLock, Storage
from drbot.storage.open import open_storage


def build_storages(policy: Any) -> list[Storage]:
    out: list[Storage] = []
    for d in policy.destinations:
        lock = (
            ObjectLock(mode=d.object_lock.mode, days=d.object_lock.days)
            if d.object_lock is not None
            else None
        )
        out.append(
            open_storage(
                d.name, d.url, region=d.region, endpoint_url=d.endpoint_url, object_lock=lock
            )
        )
    return out


def only_destination(policy: Any, storages: list[Storage], name: str | None) -> list[Storage]:
    """`storages`, or only the one called `name`; `UsageError` naming the choices if none is."""
    if name is None:
        return storages
    chosen = [s for s in storages if s.name == name]
    if not chosen:
        names = ", ".join(s.name for s in storages)
        raise UsageError(f"policy {policy.name} has no destination {name!r} ({names})")
    return chosen


def build_keys(policy: Any) -> KeyProvider:
    """The policy's key, with its previous keys for opening what they still wrap."""
    from drbot.pipeline.keyring import ring

    enc = policy.encryption
    return ring(
        key_provider_from_ref(enc.key_ref), [key_provider_from_ref(r) for r in enc.previous_refs]
    )


def build_engine(policy: Any) -> BackupSource:
    if policy.source.kind == "mongodb":
        from drbot.engines.mongodb.engine import MongoEngine

        return MongoEngine(
            policy.source.uri,
            policy.source.databases,
            wants_incrementals=policy.schedule.incremental is not None,
        )
    from drbot.engines.postgres.engine import PostgresEngine

    return PostgresEngine(
        policy.source.uri,
        policy.source.databases,
        bin_dir=policy.source.bin_dir,
        mode=policy.source.mode,
    )


def build_target_engine(policy: Any, target_uri: str) -> Engine:
    """An engine for restores into `target_uri` (same kind and tools as the policy's source)."""
    from drbot.engines.postgres.engine import PostgresEngine

    return PostgresEngine(target_uri, None, bin_dir=policy.source.bin_dir)


def backup_settings(policy: Any) -> BackupSettings:
    return BackupSettings(
        policy=policy.name,
        engine_name=policy.source.kind,
        mode=policy.source.mode,
        compression_level=policy.compression.level,
        compression_threads=policy.compression.threads,
    )
