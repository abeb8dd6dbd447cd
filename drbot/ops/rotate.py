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
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from drbot.errors import IntegrityFailure, KeyProblem, StorageUnavailable
from drbot.manifest import authenticate_manifest, encode_manifest, read_manifest_unverified
from drbot.ops.rewrap import read_entry, write_entry
from drbot.pipeline.keys import KeyProvider, WrappedKey
from drbot.pipeline.stream import StreamHeader, parse_header
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
    artifact_key_ids: set[tuple[str, str]] = field(default_factory=set)
    """(destination, key id) of the wrappings in data objects' own headers: what they were
    written under. Rotation leaves them; only shredding cares (see `inventory`)."""
    problems: list[str] = field(default_factory=list)


def inventory(
    policy: str,
    storages: Sequence[Storage],
    keys: KeyProvider | None = None,
    *,
    artifacts: bool = False,
) -> KeyInventory:
    """Which key wraps each manifest and each group of WAL objects, in every destination.

    Reads manifests without authenticating them and the first bytes of each WAL object (and,
    with `artifacts`, of each data object). A group's re-wrapped entry counts only if `keys`
    is given and the entry opens with them into the data key that authenticates the group's
    header: an entry that does not is listed in `problems` and the group stays under its old
    key. Raises `StorageUnavailable` for an unreachable destination (a rotation or a retirement
    check must see everything). Damaged objects are listed in `problems`.
    """
    inv = KeyInventory()
    for storage in storages:
        for obj in storage.list(layout.backups_prefix(policy)):
            parsed = layout.parse_key(policy, obj.key)
            if parsed is None:
                continue
            where = f"{storage.name}:{obj.key}"
            try:
                if not parsed.is_manifest:
                    if artifacts:
                        head = _header(storage, obj.key)
                        inv.artifact_key_ids.add((storage.name, head.wrapped.key_id))
                    continue
                manifest, _body, _mac = read_manifest_unverified(
                    b"".join(storage.open(obj.key)), where=where
                )
            except IntegrityFailure as exc:
                inv.problems.append(exc.message)
                continue
            inv.manifests.append(
                ManifestItem(storage.name, parsed.backup_id, manifest.wrapped_key.key_id)
            )
        groups: dict[WrappedKey, list[tuple[str, StreamHeader]]] = {}
        # Every WAL object drbot recognises, whatever the cluster's segment size.
        for obj in storage.list(layout.wal_prefix(policy)):
            if layout.parse_wal_key(policy, obj.key) is None:
                continue
            try:
                head = _header(storage, obj.key)
            except IntegrityFailure as exc:
                inv.problems.append(exc.message)
                continue
            groups.setdefault(head.wrapped, []).append((obj.key, head))
        for wrapped, members in groups.items():
            to = _checked_entry(storage, wrapped, members[0], keys, inv.problems)
            inv.wal.append(WalGroup(storage.name, wrapped, len(members), members[0][0], to))
    return inv


def _header(storage: Storage, key: str) -> StreamHeader:
    try:
        return parse_header(storage.open(key, offset=0, length=_HEADER_PROBE))
    except IntegrityFailure as exc:
        raise IntegrityFailure(f"{storage.name}:{key}: {exc.message}") from None


def _checked_entry(
    storage: Storage,
    wrapped: WrappedKey,
    example: tuple[str, StreamHeader],
    keys: KeyProvider | None,
    problems: list[str],
) -> str | None:
    """The key id of `wrapped`'s re-wrapped entry, if it holds the right data key."""
    where = f"{storage.name}: re-wrapped entry for WAL objects like {example[0]}"
    try:
        entry = read_entry(storage, wrapped)
    except IntegrityFailure as exc:
        problems.append(exc.message)
        return None
    if entry is None or keys is None:
        return None
    try:
        example[1].authenticate(keys.unwrap(entry, storage.region))
    except (KeyProblem, IntegrityFailure) as exc:
        problems.append(f"{where}: ignored, it does not open that object's header ({exc.message})")
        return None
    return entry.key_id


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


def preflight(
    policy: str, plan: RotationPlan, storages: Sequence[Storage], old: KeyProvider
) -> None:
    """Open the first planned item of each destination with the current keys, so a missing or
    wrong old key stops the rotation (`KeyProblem`, exit 12) before anything is written."""
    by_name = {s.name: s for s in storages}
    seen: set[str] = set()
    for item in plan.manifests:
        if item.destination in seen:
            continue
        seen.add(item.destination)
        storage = by_name[item.destination]
        key = layout.manifest_key(policy, item.backup_id)
        authenticate_manifest(
            b"".join(storage.open(key)),
            functools.partial(old.unwrap, region=storage.region),
            where=f"{storage.name}:{key}",
        )
    for group in plan.wal:
        if group.destination not in seen:
            seen.add(group.destination)
            _group_data_key(group, by_name[group.destination], old)


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
    steps: list[tuple[str, str, Callable[[], None]]] = []
    for item in plan.manifests:
        storage = by_name[item.destination]
        what = f"{storage.name}:{layout.manifest_key(policy, item.backup_id)}"
        steps.append(
            (
                "manifests",
                what,
                functools.partial(_rewrap_manifest, policy, item, storage, old, new),
            )
        )
    for group in plan.wal:
        storage = by_name[group.destination]
        what = f"{storage.name}: WAL objects like {group.example}"
        steps.append(("wal_groups", what, functools.partial(_rewrap_wal, group, storage, old, new)))
    result = RotationResult()
    for counter, what, step in steps:
        try:
            step()
        except (KeyProblem, IntegrityFailure, StorageUnavailable) as exc:
            result.failed[what] = exc.message
            log.error("keys.rotate_failed", object=what, error=exc.message)
            continue
        setattr(result, counter, getattr(result, counter) + 1)
        if progress:
            progress(what)
    return result


def _rewrap_wal(group: WalGroup, storage: Storage, old: KeyProvider, new: KeyProvider) -> None:
    data_key = _group_data_key(group, storage, old)
    write_entry(storage, group.wrapped, new.wrap(data_key, storage.region))
    back = read_entry(storage, group.wrapped)
    if back is None or new.unwrap(back, storage.region) != data_key:
        raise IntegrityFailure(
            f"{storage.name}: the re-wrapped entry for WAL objects like {group.example} did not "
            "read back"
        )


def _group_data_key(group: WalGroup, storage: Storage, old: KeyProvider) -> bytes:
    """The data key of a WAL group, through its header's wrapping or, once that key is
    retired (a second rotation), through its existing re-wrapped entry; proven against the
    header of one of its objects before it is wrapped again."""
    try:
        data_key = old.unwrap(group.wrapped, storage.region)
    except KeyProblem:
        entry = read_entry(storage, group.wrapped)
        if entry is None:
            raise
        data_key = old.unwrap(entry, storage.region)
    _header(storage, group.example).authenticate(data_key)
    return data_key


_REWRAPPED_FIELDS = ("key", "mac", "fingerprints_sealed")
"""What re-wrapping changes in a stored manifest; everything else must stay byte-equal."""


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
    encoded = encode_manifest(rewrapped, data_key)
    # Verified before it replaces anything: opens with the new key alone, same data key, same
    # manifest, and no field of the stored one lost (a field this drbot does not know).
    check, check_key = authenticate_manifest(
        encoded, lambda w: new.unwrap(w, storage.region), where=where
    )
    if (
        check_key != data_key
        or dataclasses.replace(check, wrapped_key=manifest.wrapped_key) != manifest
        or _unchanged_part(encoded) != _unchanged_part(raw)
    ):
        raise IntegrityFailure(f"{where}: re-wrapping would change the manifest; left as it was")
    storage.put(key, [encoded])
    try:
        stored = b"".join(storage.open(key))
    except StorageUnavailable:
        stored = None
    if stored != encoded:
        # Not what was verified (or unreadable now): put the original back, best effort.
        storage.put(key, [raw])
        raise IntegrityFailure(f"{where}: the re-wrapped manifest did not read back the same")


def _unchanged_part(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    return {k: v for k, v in body.items() if k not in _REWRAPPED_FIELDS}


def still_under(inv: KeyInventory, ids: dict[str, set[str]]) -> KeyInventory:
    """The part of `inv` still wrapped only by a key whose id, per destination, is in `ids`."""
    return KeyInventory(
        manifests=[m for m in inv.manifests if m.key_id in ids.get(m.destination, set())],
        wal=[g for g in inv.wal if g.effective_key_id in ids.get(g.destination, set())],
        problems=list(inv.problems),
    )


def key_ids_in_use(inv: KeyInventory) -> set[tuple[str, str]]:
    """(destination, key id) of every wrapping that opens something: manifests, WAL headers,
    WAL re-wrapped entries, and data objects' own headers (needs `inventory(artifacts=True)`)."""
    used = {(m.destination, m.key_id) for m in inv.manifests}
    used |= {(g.destination, g.wrapped.key_id) for g in inv.wal}
    used |= {(g.destination, g.rewrapped_to) for g in inv.wal if g.rewrapped_to}
    return used | inv.artifact_key_ids


def key_ids(provider: KeyProvider, storages: Sequence[Storage]) -> dict[str, set[str]]:
    """`provider`'s key id in each destination's region. Raises `KeyProblem`."""
    return {s.name: {provider.key_id(s.region)} for s in storages}
