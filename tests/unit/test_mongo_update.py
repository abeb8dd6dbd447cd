"""apply_update: a change event's `updateDescription` applied to a document in memory (pure).

Every test builds the document before the event, the description the server would send, and
the exact document the source holds afterwards.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drbot.engines.mongodb.update import UpdateConflict, apply_update, split_path

pytestmark = pytest.mark.unit

Doc = dict[str, Any]


# -- updatedFields ------------------------------------------------------------------------


def test_sets_top_level_and_nested_fields_in_place() -> None:
    doc: Doc = {"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "e": "same"}
    out = apply_update(doc, {"updatedFields": {"a": 5, "b.c": {"deep": [1, 2]}}})
    assert out is doc
    assert doc == {"_id": 1, "a": 5, "b": {"c": {"deep": [1, 2]}, "d": 3}, "e": "same"}


def test_setting_a_new_nested_path_creates_the_intermediate_documents() -> None:
    doc: Doc = {"_id": 1, "x": {"keep": 0}}
    apply_update(doc, {"updatedFields": {"x.y.z": 1, "p.q": "new"}})
    assert doc == {"_id": 1, "x": {"keep": 0, "y": {"z": 1}}, "p": {"q": "new"}}


def test_sets_an_array_element_by_position() -> None:
    doc: Doc = {"_id": 1, "a": [10, 20, 30], "b": [{"k": 0}, {"k": 1}]}
    apply_update(doc, {"updatedFields": {"a.1": "twenty", "b.1.k": 99}})
    assert doc == {"_id": 1, "a": [10, "twenty", 30], "b": [{"k": 0}, {"k": 99}]}


def test_setting_past_the_end_of_an_array_pads_with_null() -> None:
    doc: Doc = {"_id": 1, "a": [1]}
    apply_update(doc, {"updatedFields": {"a.3": "x"}})
    assert doc == {"_id": 1, "a": [1, None, None, "x"]}


def test_setting_inside_a_padded_array_element_creates_a_document_there() -> None:
    doc: Doc = {"_id": 1, "a": []}
    apply_update(doc, {"updatedFields": {"a.1.k": "v"}})
    assert doc == {"_id": 1, "a": [None, {"k": "v"}]}


# -- removedFields ------------------------------------------------------------------------


def test_removes_fields_and_nulls_array_elements() -> None:
    doc: Doc = {"_id": 1, "a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2, 3]}
    apply_update(doc, {"removedFields": ["a", "b.c", "l.1"]})
    assert doc == {"_id": 1, "b": {"d": 3}, "l": [1, None, 3]}


def test_removing_what_is_not_there_changes_nothing() -> None:
    doc: Doc = {"_id": 1, "b": {"d": 3}, "l": [1], "s": 5}
    before = copy.deepcopy(doc)
    apply_update(doc, {"removedFields": ["zz", "b.zz", "q.r.s", "l.7", "s.t"]})
    assert doc == before


# -- truncatedArrays ----------------------------------------------------------------------


def test_truncated_arrays_are_cut_before_fields_are_set() -> None:
    doc: Doc = {"_id": 1, "a": [1, 2, 3, 4], "n": {"arr": ["x", "y", "z"]}}
    apply_update(
        doc,
        {
            "truncatedArrays": [{"field": "a", "newSize": 2}, {"field": "n.arr", "newSize": 0}],
            "updatedFields": {"a.2": 9},
        },
    )
    assert doc == {"_id": 1, "a": [1, 2, 9], "n": {"arr": []}}


def test_truncating_a_missing_array_or_a_non_array_changes_nothing() -> None:
    doc: Doc = {"_id": 1, "s": "text", "l": [1, 2]}
    before = copy.deepcopy(doc)
    apply_update(
        doc,
        {
            "truncatedArrays": [
                {"field": "missing", "newSize": 0},
                {"field": "s", "newSize": 0},
                {"field": "l", "newSize": 5},
                {"field": "x.y", "newSize": 0},
            ]
        },
    )
    assert doc == before


# -- disambiguatedPaths -------------------------------------------------------------------


def test_a_field_name_with_a_dot_is_set_at_top_level_not_nested() -> None:
    doc: Doc = {"_id": 1, "a": {"b": 0}}
    apply_update(doc, {"updatedFields": {"a.b": 1}, "disambiguatedPaths": {"a.b": ["a.b"]}})
    assert doc == {"_id": 1, "a": {"b": 0}, "a.b": 1}


def test_without_disambiguation_the_same_text_is_a_nested_path() -> None:
    doc: Doc = {"_id": 1, "a": {"b": 0}}
    apply_update(doc, {"updatedFields": {"a.b": 1}})
    assert doc == {"_id": 1, "a": {"b": 1}}


def test_a_field_name_with_a_dot_is_removed_not_the_nested_field() -> None:
    doc: Doc = {"_id": 1, "a.b": 1, "a": {"b": 2}}
    apply_update(doc, {"removedFields": ["a.b"], "disambiguatedPaths": {"a.b": ["a.b"]}})
    assert doc == {"_id": 1, "a": {"b": 2}}


def test_a_dotted_field_name_inside_an_array_element() -> None:
    doc: Doc = {"_id": 1, "arr": [{"x.y": 0}, {"x.y": 0}]}
    apply_update(
        doc,
        {"updatedFields": {"arr.1.x.y": 5}, "disambiguatedPaths": {"arr.1.x.y": ["arr", 1, "x.y"]}},
    )
    assert doc == {"_id": 1, "arr": [{"x.y": 0}, {"x.y": 5}]}


def test_a_numeric_field_name_in_an_object_is_a_key() -> None:
    doc: Doc = {"_id": 1, "o": {"1": "old", "2": "keep"}}
    apply_update(doc, {"updatedFields": {"o.1": "x"}, "disambiguatedPaths": {"o.1": ["o", "1"]}})
    assert doc == {"_id": 1, "o": {"1": "x", "2": "keep"}}


def test_a_numeric_field_name_under_a_missing_field_creates_an_object_not_an_array() -> None:
    doc: Doc = {"_id": 1}
    apply_update(doc, {"updatedFields": {"o.1": "x"}, "disambiguatedPaths": {"o.1": ["o", "1"]}})
    assert doc == {"_id": 1, "o": {"1": "x"}}


def test_a_numeric_component_of_an_array_is_a_position() -> None:
    doc: Doc = {"_id": 1, "a": ["p", "q"]}
    apply_update(doc, {"updatedFields": {"a.1": "x"}, "disambiguatedPaths": {"a.1": ["a", 1]}})
    assert doc == {"_id": 1, "a": ["p", "x"]}


def test_split_path_uses_the_disambiguated_components_only_for_its_own_path() -> None:
    disambiguated = {"a.b": ["a.b"], "o.1": ["o", 1]}
    assert split_path("a.b", disambiguated) == ["a.b"]
    assert split_path("o.1", disambiguated) == ["o", 1]
    assert split_path("c.d.0", disambiguated) == ["c", "d", "0"]


# -- idempotence and conflicts ------------------------------------------------------------


def test_applying_the_same_description_twice_gives_the_same_document() -> None:
    description: dict[str, Any] = {
        "truncatedArrays": [{"field": "a", "newSize": 2}],
        "removedFields": ["b.c", "l.0"],
        "updatedFields": {"a.3": "x", "b.new.deep": [1], "a.b": 7, "n": None},
        "disambiguatedPaths": {"a.b": ["a.b"]},
    }
    doc: Doc = {"_id": 1, "a": [1, 2, 3, 4, 5], "b": {"c": 1, "d": 2}, "l": [0, 1], "n": 1}
    once = copy.deepcopy(apply_update(doc, copy.deepcopy(description)))
    assert once == {
        "_id": 1,
        "a": [1, 2, None, "x"],
        "b": {"d": 2, "new": {"deep": [1]}},
        "l": [None, 1],
        "n": None,
        "a.b": 7,
    }
    assert apply_update(doc, copy.deepcopy(description)) == once


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"_id": 1, "a": {"b": 5}}, "a.b.c"),  # parent is a number
        ({"_id": 1, "a": {"b": 5}}, "a.b.c.d"),  # the path crosses a number
        ({"_id": 1, "a": "text"}, "a.b"),  # parent is a string
        ({"_id": 1, "a": [1, 2]}, "a.x"),  # a name where an array wants a position
        ({"_id": 1, "a": [{"k": 1}]}, "a.k.z"),  # same, one level further down
    ],
)
def test_a_set_whose_path_does_not_fit_the_document_is_a_conflict(doc: Doc, path: str) -> None:
    with pytest.raises(UpdateConflict):
        apply_update(doc, {"updatedFields": {path: 1}})


def test_a_conflict_is_a_value_error_naming_the_path() -> None:
    with pytest.raises(ValueError, match=r"a\.b\.c"):
        apply_update({"_id": 1, "a": {"b": 5}}, {"updatedFields": {"a.b.c": 1}})


def test_truncating_an_array_at_a_position_past_the_end_changes_nothing() -> None:
    doc: Doc = {"_id": 1, "a": [[1, 2, 3]]}
    apply_update(doc, {"truncatedArrays": [{"field": "a.3", "newSize": 1}]})
    assert doc == {"_id": 1, "a": [[1, 2, 3]]}


def test_truncating_through_a_scalar_is_a_conflict() -> None:
    doc: Doc = {"_id": 1, "a": {"b": 5}}
    with pytest.raises(UpdateConflict):
        apply_update(doc, {"truncatedArrays": [{"field": "a.b.c", "newSize": 0}]})


def test_replaying_events_over_a_document_that_already_shows_later_ones_converges() -> None:
    events = [
        {"updatedFields": {"a.b.c": 1}},  # needs a.b to be a document
        {"updatedFields": {"a.b": 5}},  # later: a.b becomes a number
    ]
    source: Doc = {"_id": 1, "a": {"b": {}}}
    for e in events:
        apply_update(source, e)
    assert source == {"_id": 1, "a": {"b": 5}}
    dumped = copy.deepcopy(source)  # the dump read the document after both events
    with pytest.raises(UpdateConflict):  # strict, as for slices replayed over exact state
        apply_update(copy.deepcopy(dumped), events[0])
    skipped: list[UpdateConflict] = []
    for e in events:  # as over a fuzzy dump: the path that no longer fits is skipped
        apply_update(dumped, e, on_conflict=skipped.append)
    assert dumped == source
    assert len(skipped) == 1 and "a.b.c" in str(skipped[0])


# -- property -----------------------------------------------------------------------------

_names = st.text(alphabet="abcxyz_", min_size=1, max_size=3)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**31), 2**31 - 1), st.text(max_size=5)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_names, inner, max_size=4)
    ),
    max_leaves=12,
)
_documents = st.dictionaries(_names, _values, min_size=1, max_size=5)


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every path that exists in `value` (document keys and array positions)."""
    out: list[tuple[str, ...]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append((*prefix, str(i)))
            out += _paths(v, (*prefix, str(i)))
    return out


def _get(doc: Doc, path: tuple[str, ...]) -> Any:
    value: Any = doc
    for part in path:
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


@settings(max_examples=300, deadline=None)
@given(doc=_documents, new=_values, data=st.data())
def test_setting_an_existing_path_twice_equals_setting_it_once(
    doc: Doc, new: Any, data: st.DataObject
) -> None:
    path = data.draw(st.sampled_from(_paths(doc)))
    description = {"updatedFields": {".".join(path): new}}
    once = apply_update(copy.deepcopy(doc), copy.deepcopy(description))
    assert _get(once, path) == new
    twice = apply_update(copy.deepcopy(once), copy.deepcopy(description))
    assert twice == once
