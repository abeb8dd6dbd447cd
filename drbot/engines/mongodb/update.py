"""Apply a change event's `updateDescription` to a document, in memory (pure).

A delta update event says which paths were set (`updatedFields`), removed (`removedFields`)
and which arrays were cut to a length (`truncatedArrays`), each path written with dots. A field
whose name itself holds a dot, or is made of digits, makes that text ambiguous; the server then
lists the path's real components in `disambiguatedPaths` (numbers for array positions). Applying
the description to the document client-side, rather than sending `$set`/`$unset`, is what makes
such names, array positions and truncation all come out exactly as on the source, with ordinary
write privileges only. Every value is absolute, so applying an event twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

Path = Sequence[str | int]


class UpdateConflict(ValueError):
    """The document's shape does not fit the update (e.g. a path crosses a scalar)."""


def split_path(dotted: str, disambiguated: Mapping[str, Any]) -> list[str | int]:
    found = disambiguated.get(dotted)
    if found is not None:
        return list(found)
    return list(dotted.split("."))


def _index(part: str | int, path: Path) -> int:
    if isinstance(part, int):
        return part
    if part.isdigit():
        return int(part)
    raise UpdateConflict(f"{'.'.join(map(str, path))}: {part!r} is not an array position")


def _step(container: Any, part: str | int, path: Path, *, create: bool) -> Any:
    if isinstance(container, list):
        i = _index(part, path)
        if i >= len(container):
            if not create:
                return None
            container.extend([None] * (i + 1 - len(container)))
        if container[i] is None and create:
            container[i] = {}
        return container[i]
    if isinstance(container, dict):
        key = str(part)
        if key not in container or container[key] is None:
            if not create:
                return None
            container[key] = {}
        return container[key]
    raise UpdateConflict(f"{'.'.join(map(str, path))}: crosses a value that is not a document")


def _parent(doc: dict[str, Any], path: Path, *, create: bool) -> Any:
    container: Any = doc
    for part in path[:-1]:
        container = _step(container, part, path, create=create)
        if container is None:
            return None
    return container


def set_path(doc: dict[str, Any], path: Path, value: Any) -> None:
    parent = _parent(doc, path, create=True)
    last = path[-1]
    if isinstance(parent, list):
        i = _index(last, path)
        if i >= len(parent):
            parent.extend([None] * (i + 1 - len(parent)))
        parent[i] = value
    elif isinstance(parent, dict):
        parent[str(last)] = value
    else:
        raise UpdateConflict(f"{'.'.join(map(str, path))}: parent is not a document or array")


def unset_path(doc: dict[str, Any], path: Path) -> None:
    parent = _parent(doc, path, create=False)
    last = path[-1]
    if isinstance(parent, dict):
        parent.pop(str(last), None)
    elif isinstance(parent, list):
        i = _index(last, path)
        if i < len(parent):
            parent[i] = None  # $unset of an array element leaves null, as the server does


def truncate_path(doc: dict[str, Any], path: Path, size: int) -> None:
    parent = _parent(doc, path, create=False)
    if parent is None:
        return
    last = path[-1]
    if isinstance(parent, list):
        i = _index(last, path)
        target = parent[i] if i < len(parent) else None
    elif isinstance(parent, dict):
        target = parent.get(str(last))
    else:
        raise UpdateConflict(f"{'.'.join(map(str, path))}: parent is not a document or array")
    if isinstance(target, list):
        del target[size:]


def apply_update(
    doc: dict[str, Any],
    description: Mapping[str, Any],
    on_conflict: Callable[[UpdateConflict], None] | None = None,
) -> dict[str, Any]:
    """`doc` changed as `description` says (in place, and returned).

    Arrays are cut first, then fields removed, then fields set: the order the server computes
    the description in. A path that does not fit the document raises `UpdateConflict`, or,
    with `on_conflict`, is reported to it and skipped while the other paths still apply: what a
    replay over a fuzzy dump needs, where a document may already show later events (which are
    replayed after this one and settle it).
    """
    disambiguated = description.get("disambiguatedPaths") or {}

    def attempt(change: Callable[[], None]) -> None:
        try:
            change()
        except UpdateConflict as exc:
            if on_conflict is None:
                raise
            on_conflict(exc)

    for cut in description.get("truncatedArrays") or []:
        path = split_path(str(cut["field"]), disambiguated)
        attempt(partial(truncate_path, doc, path, int(cut["newSize"])))
    for dotted in description.get("removedFields") or []:
        path = split_path(str(dotted), disambiguated)
        attempt(partial(unset_path, doc, path))
    for dotted, value in (description.get("updatedFields") or {}).items():
        path = split_path(str(dotted), disambiguated)
        attempt(partial(set_path, doc, path, value))
    return doc
