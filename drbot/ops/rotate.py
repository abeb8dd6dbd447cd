"""Key rotation and retirement: re-wrap data keys under a new key without touching any data.

What a policy's key wraps, per destination:

- each backup's manifest holds its data key wrapped for that destination: rotation replaces the
  manifest with one holding the same data key wrapped by the new key (same body otherwise,
  authenticated again with that data key), after checking the new manifest opens with the new
  key and yields the same data key. The artifacts are never read or written.
- each WAL object's header holds its streamer's data key wrapped by the key of the day:
  rotation stores a re-wrapped entry for every distinct wrapped key (drbot/ops/rewrap.py).

`inventory` reads what is there (manifests unverified, WAL headers only); `plan_rotation` is
pure; `execute_rotation` carries a plan out one item at a time, each a single object put
followed by a read-back check, so it can be killed anywhere and run again: an item already
under the new key is not planned again, and until the end every object opens with one of the
two keys. Audit segments and drill records are signed, not encrypted: no key wraps them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from drbot.errors import IntegrityFailure, KeyProblem, StorageUnavailable
from drbot.manifest import authenticate_manifest, encode_manifest, read_manifest_unverified
from drbot.ops.rewrap import read_entry, write_entry
from drbot.ops.walstore import list_wal
from drbot.pipeline.keys import KeyProvider, WrappedKey
from drbot.pipeline.stream import parse_header
from drbot.storage import layout
from drbot.storage.base import Storage

log = structlog.get_logger(__name__)

_HEADER_PROBE = 4096  # a stream header is well under this (KMS blobs are ~200 bytes)


@dataclass(frozen=True)
class ManifestItem:
    destination: str
    backup_id: str
    key_id: str


@dataclass(frozen=True)
class WalGroup:
    """WAL objects of one destination whose headers carry the same wrapped data key."""

    destination: str
    wrapped: WrappedKey
    objects: int
    example: str
    rewrapped_to: str | None = None
    """The key id of this group's re-wrapped entry, if rotation already made one."""

    @property
    def effective_key_id(self) -> str:
        return self.rewrapped_to or self.wrapped.key_id


@dataclass
class KeyInventory:
    manifests: list[ManifestItem] = field(default_factory=list)
    wal: list[WalGroup] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def inventory(policy: str, storages: Sequence[Storage]) -> KeyInventory:
    """Which key wraps each manifest and each group of WAL objects, in every destination.

    Reads manifests without authenticating them and the first bytes of each WAL object; never
    needs a key. Raises `StorageUnavailable` for an unreachable destination (a rotation or a
    retirement check must see everything). Damaged objects are listed in `problems`.
    """
    inv = KeyInventory()
    for storage in storages:
        for obj in storage.list(layout.backups_prefix(policy)):
            parsed = layout.parse_key(policy, obj.key)
            if parsed is None or not parsed.is_manifest:
                continue
            where = f"{storage.name}:{obj.key}"
            try:
                manifest, _body, _mac = read_manifest_unverified(
                    b"".join(storage.open(obj.key)), where=where
                )
            except IntegrityFailure as exc:
                inv.problems.append(exc.message)
                continue
            inv.manifests.append(
                ManifestItem(storage.name, parsed.backup_id, manifest.wrapped_key.key_id)
            )
        groups: dict[WrappedKey, list[str]] = {}
        wal_inv = list_wal(policy, storage)
        objects = [
            *wal_inv.segments.values(),
            *wal_inv.partials.values(),
            *wal_inv.histories.values(),
            *([wal_inv.heartbeat] if wal_inv.heartbeat else []),
        ]
        for obj in objects:
            try:
                head = parse_header(storage.open(obj.key, offset=0, length=_HEADER_PROBE))
            except IntegrityFailure as exc:
                inv.problems.append(f"{storage.name}:{obj.key}: {exc.message}")
                continue
            groups.setdefault(head.wrapped, []).append(obj.key)
        for wrapped, keys in groups.items():
            entry = read_entry(storage, wrapped)
            inv.wal.append(
                WalGroup(storage.name, wrapped, len(keys), keys[0], entry.key_id if entry else None)
            )
    return inv


@dataclass(frozen=True)
class RotationPlan:
    to_key: dict[str, str]
    """Destination name -> the id of the new key in its region."""
    manifests: tuple[ManifestItem, ...]
    wal: tuple[WalGroup, ...]
    done_manifests: int
    done_wal: int

    @property
    def empty(self) -> bool:
        return not self.manifests and not self.wal


def plan_rotation(inv: KeyInventory, to_key: dict[str, str]) -> RotationPlan:
    """What is left to re-wrap: everything not yet under the destination's new key (pure)."""
    manifests = tuple(m for m in inv.manifests if m.key_id != to_key[m.destination])
    wal = tuple(g for g in inv.wal if g.effective_key_id != to_key[g.destination])
    return RotationPlan(
        to_key,
        manifests,
        wal,
        done_manifests=len(inv.manifests) - len(manifests),
        done_wal=len(inv.wal) - len(wal),
    )


@dataclass
class RotationResult:
    manifests: int = 0
    wal_groups: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def check_new_key(new: KeyProvider, storages: Sequence[Storage]) -> dict[str, str]:
    """The new key's id per destination, after proving it wraps and unwraps in each region.

    Raises `KeyProblem` (missing, too open, disabled, not in that region): nothing is written.
    """
    ids: dict[str, str] = {}
    for storage in storages:
        data_key, wrapped = new.generate(storage.region)
        if new.unwrap(wrapped, storage.region) != data_key:
            raise KeyProblem(f"{new.describe()} does not give back what it wrapped")
        ids[storage.name] = wrapped.key_id
    return ids


def execute_rotation(
    policy: str,
    plan: RotationPlan,
    storages: Sequence[Storage],
    old: KeyProvider,
    new: KeyProvider,
    *,
    progress: Callable[[str], None] | None = None,
) -> RotationResult:
    """Carry out `plan`; see the module docstring. A failing item is recorded and skipped
    (the others go on); `KeyProblem` for an item `old` cannot open is recorded the same way."""
    by_name = {s.name: s for s in storages}
    result = RotationResult()
    for item in plan.manifests:
        storage = by_name[item.destination]
        what = f"{storage.name}:{layout.manifest_key(policy, item.backup_id)}"
        try:
            _rewrap_manifest(policy, item, storage, old, new)
        except (KeyProblem, IntegrityFailure, StorageUnavailable) as exc:
            result.failed[what] = exc.message
            log.error("keys.rotate_failed", object=what, error=exc.message)
            continue
        result.manifests += 1
        if progress:
            progress(what)
    for group in plan.wal:
        storage = by_name[group.destination]
        what = f"{storage.name}: WAL objects like {group.example}"
        try:
            data_key = old.unwrap(group.wrapped, storage.region)
            rewrapped = new.wrap(data_key, storage.region)
            write_entry(storage, group.wrapped, rewrapped)
            back = read_entry(storage, group.wrapped)
            if back is None or new.unwrap(back, storage.region) != data_key:
                raise IntegrityFailure(f"{what}: the re-wrapped entry did not read back")
        except (KeyProblem, IntegrityFailure, StorageUnavailable) as exc:
            result.failed[what] = exc.message
            log.error("keys.rotate_failed", object=what, error=exc.message)
            continue
        result.wal_groups += 1
        if progress:
            progress(what)
    return result


def _rewrap_manifest(
    policy: str, item: ManifestItem, storage: Storage, old: KeyProvider, new: KeyProvider
) -> None:
    key = layout.manifest_key(policy, item.backup_id)
    where = f"{storage.name}:{key}"
    raw = b"".join(storage.open(key))
    manifest, data_key = authenticate_manifest(
        raw, lambda w: old.unwrap(w, storage.region), where=where
    )
    rewrapped = dataclasses.replace(manifest, wrapped_key=new.wrap(data_key, storage.region))
    storage.put(key, [encode_manifest(rewrapped, data_key)])
    # Read back and open with the new key alone: only then is the old wrapping gone for good.
    back, back_key = authenticate_manifest(
        b"".join(storage.open(key)), lambda w: new.unwrap(w, storage.region), where=where
    )
    same = dataclasses.replace(back, wrapped_key=manifest.wrapped_key) == manifest
    if back_key != data_key or not same:
        # The put replaced the manifest with something else: put the original back.
        storage.put(key, [raw])
        raise IntegrityFailure(f"{where}: the re-wrapped manifest did not read back the same")


def still_under(inv: KeyInventory, key_ids: dict[str, str]) -> KeyInventory:
    """The part of `inv` still wrapped by the key whose id per destination is `key_ids`."""
    return KeyInventory(
        manifests=[m for m in inv.manifests if m.key_id == key_ids.get(m.destination)],
        wal=[g for g in inv.wal if g.effective_key_id == key_ids.get(g.destination)],
        problems=list(inv.problems),
    )


def key_ids(provider: KeyProvider, storages: Sequence[Storage]) -> dict[str, str]:
    """`provider`'s key id in each destination's region. Raises `KeyProblem`."""
    return {s.name: provider.key_id(s.region) for s in storages}
