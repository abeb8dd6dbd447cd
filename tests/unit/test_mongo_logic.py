"""The pure parts of MongoDB support: transaction grouping, the record format, fingerprints,
slice chains, slice bodies, namespace selection and restore planning.

Cluster times are built from `T`, a whole second: `_k(s, i)` is the slice-key integer of
Timestamp(T + s, i). Restore targets (`--at`) are whole seconds, which `ts_at` turns into the
last cluster time of that second.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pytest
from bson.binary import Binary
from bson.int64 import Int64
from bson.timestamp import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from drbot.catalog import BackupEntry, CatalogScan, Copy
from drbot.engines.base import Fingerprint, TableFingerprint
from drbot.engines.mongodb import archive
from drbot.engines.mongodb.fingerprint import CollectionSummer, canonical_bson
from drbot.engines.mongodb.position import ts_at, ts_datetime, ts_key, ts_parse, ts_text
from drbot.engines.mongodb.replay import group, group_time, select, txn_of
from drbot.errors import IntegrityFailure, NoRestorePoint, UsageError
from drbot.manifest import ArtifactRecord, Manifest
from drbot.ops.changestore import Gap, SliceRef, chain_from, decode_changes, encode_slice
from drbot.ops.mongo_restore import MongoRestorePlan, Selection, plan_mongo_restore
from drbot.pipeline.keys import WrappedKey

pytestmark = pytest.mark.unit

T = 1_800_000_000  # 2027-01-15T08:00:00Z


def _ts(s: int, i: int = 1) -> Timestamp:
    return Timestamp(T + s, i)


def _k(s: int, i: int = 1) -> int:
    return ts_key(_ts(s, i))


def _at(s: int) -> datetime:
    return datetime.fromtimestamp(T + s, UTC)


# -- position ------------------------------------------------------------------------------


def test_cluster_times_round_trip_as_text_and_order_by_key() -> None:
    assert ts_text(Timestamp(1764633600, 7)) == "1764633600.7"
    assert ts_parse("1764633600.7") == Timestamp(1764633600, 7)
    # As text "5.10" < "5.9", as cluster times 5.9 comes first.
    assert ts_key(ts_parse("5.9")) < ts_key(ts_parse("5.10")) < ts_key(ts_parse("6.0"))
    assert ts_at(_at(10)) == Timestamp(T + 10, 0xFFFFFFFF)
    assert ts_datetime(_ts(10, 3)) == _at(10)
    for bad in ("", "5", "5.", ".5", "a.1", "1.-1"):
        with pytest.raises(ValueError, match="not a cluster time"):
            ts_parse(bad)


# -- transactions: group / select ----------------------------------------------------------

LSID_A = {"id": Binary(b"\x01" * 16, 4), "uid": Binary(b"\xaa" * 32, 0)}
LSID_B = {"id": Binary(b"\x02" * 16, 4), "uid": Binary(b"\xaa" * 32, 0)}


def _ev(n: int, s: int, *, lsid: dict[str, Any] | None = None, txn: int | None = None) -> Any:
    event: dict[str, Any] = {"n": n, "clusterTime": _ts(s), "operationType": "insert"}
    if lsid is not None and txn is not None:
        event["lsid"] = lsid
        event["txnNumber"] = Int64(txn)
    return event


def _ns(groups: Iterable[list[dict[str, Any]]]) -> list[list[int]]:
    return [[e["n"] for e in g] for g in groups]


def test_txn_of_identifies_a_transaction_by_session_and_number() -> None:
    assert txn_of(_ev(1, 0)) is None
    assert txn_of({"lsid": LSID_A}) is None  # a session without a transaction number
    a1 = txn_of(_ev(1, 0, lsid=LSID_A, txn=1))
    assert a1 is not None
    assert a1 == txn_of(_ev(2, 5, lsid=dict(reversed(list(LSID_A.items()))), txn=1))
    assert a1 != txn_of(_ev(3, 0, lsid=LSID_A, txn=2))
    assert a1 != txn_of(_ev(4, 0, lsid=LSID_B, txn=1))


def test_consecutive_events_of_one_transaction_form_one_group() -> None:
    events = [_ev(i, 5, lsid=LSID_A, txn=7) for i in range(3)]
    assert _ns(group(events)) == [[0, 1, 2]]


def test_events_outside_transactions_are_one_group_each() -> None:
    assert _ns(group([_ev(0, 1), _ev(1, 1), _ev(2, 2)])) == [[0], [1], [2]]


def test_transactions_and_single_events_interleaved() -> None:
    events = [
        _ev(0, 1),
        _ev(1, 2, lsid=LSID_A, txn=1),
        _ev(2, 2, lsid=LSID_A, txn=1),
        _ev(3, 3, lsid=LSID_A, txn=2),  # next transaction of the same session
        _ev(4, 3, lsid=LSID_A, txn=2),
        _ev(5, 4, lsid=LSID_B, txn=2),  # same number, other session
        _ev(6, 5),
        _ev(7, 6),
    ]
    assert _ns(group(events)) == [[0], [1, 2], [3, 4], [5], [6], [7]]


def test_group_of_nothing_is_nothing() -> None:
    assert list(group([])) == []


def test_group_time_is_the_latest_cluster_time_of_the_group() -> None:
    g = [_ev(0, 3), {"n": 1, "clusterTime": Timestamp(T + 3, 9)}, _ev(2, 2)]
    assert group_time(g) == Timestamp(T + 3, 9)


def test_select_takes_groups_up_to_and_including_until() -> None:
    groups = list(group([_ev(0, 1), _ev(1, 2), _ev(2, 3), _ev(3, 4)]))
    assert _ns(select(groups, _ts(3))) == [[0], [1], [2]]
    assert _ns(select(groups, Timestamp(T + 3, 0))) == [[0], [1]]
    assert _ns(select(groups, None)) == [[0], [1], [2], [3]]
    assert _ns(select(groups, _ts(0))) == []


def test_select_takes_a_transaction_whole_or_not_at_all() -> None:
    events = [
        _ev(0, 1),
        {**_ev(1, 2, lsid=LSID_A, txn=1), "clusterTime": Timestamp(T + 2, 1)},
        {**_ev(2, 2, lsid=LSID_A, txn=1), "clusterTime": Timestamp(T + 2, 3)},
        _ev(3, 4),
    ]
    groups = list(group(events))
    assert _ns(groups) == [[0], [1, 2], [3]]
    assert _ns(select(groups, Timestamp(T + 2, 2))) == [[0]]  # between its two events: none
    assert _ns(select(groups, Timestamp(T + 2, 3))) == [[0], [1, 2]]


def test_select_stops_at_the_first_group_past_until() -> None:
    groups = [[_ev(0, 1)], [_ev(1, 9)], [_ev(2, 2)]]
    assert _ns(select(groups, _ts(5))) == [[0]]


def test_select_is_lazy() -> None:
    def endless() -> Iterator[list[dict[str, Any]]]:
        s = 0
        while True:
            s += 1
            yield [_ev(s, s)]

    assert _ns(select(endless(), _ts(3))) == [[1], [2], [3]]


# -- archive records -----------------------------------------------------------------------


def _artifact(*, trailer: bool = True) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    doc = bson.encode({"_id": 1, "b": {"y": 2, "x": 1}})
    records = [
        archive.record(archive.HEADER, {"format": archive.DUMP_FORMAT, "version": 1}),
        archive.record(archive.COLLECTION, {"db": "shop", "name": "orders"}),
        archive.record(archive.DOCUMENT, doc),
        archive.record(archive.END, {"db": "shop", "name": "orders", "count": 1}),
        archive.record(archive.EVENT, {"clusterTime": _ts(1)}),
    ]
    if trailer:
        records.append(archive.record(archive.TRAILER, {}))
    return b"".join(records), [(r[:1], r[1:]) for r in records]


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_record_stores_raw_bson_bytes_as_they_are() -> None:
    raw = bson.encode({"b": 1, "a": 2})
    assert archive.record(archive.DOCUMENT, raw) == b"D" + raw
    assert archive.record(archive.END, {"b": 1, "a": 2}) == b"E" + raw


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 1 << 20])
def test_read_records_round_trips_in_any_chunking(size: int) -> None:
    data, expected = _artifact()
    assert list(archive.read_records(_pieces(data, size))) == expected


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_read_records_round_trips_at_random_cut_points(cuts: list[int]) -> None:
    data, expected = _artifact()
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [piece for a, b in itertools.pairwise(points) for piece in (b"", data[a:b])]
    assert list(archive.read_records(chunks)) == expected


def test_read_records_handles_artifacts_larger_than_its_buffer() -> None:
    rng = random.Random(7)
    docs = [bson.encode({"_id": i, "pad": rng.randbytes(9000)}) for i in range(300)]
    data = b"".join(archive.record(archive.DOCUMENT, d) for d in docs)
    data += archive.record(archive.TRAILER, {"count": 300})
    got = [raw for tag, raw in archive.read_records(_pieces(data, 65536)) if tag == b"D"]
    assert got == docs


def test_decode_is_exact() -> None:
    big = Int64(5)
    got = archive.decode(archive.record(archive.END, {"n": big, "i": 5})[1:])
    assert got == {"n": 5, "i": 5}
    assert type(got["n"]) is Int64
    assert type(got["i"]) is int


@pytest.mark.parametrize("cut", [1, 3, 5, 7, 20])
def test_truncation_inside_a_record_is_an_integrity_failure(cut: int) -> None:
    data, _ = _artifact()
    with pytest.raises(IntegrityFailure, match=r"shop-1: data ends inside a record"):
        list(archive.read_records(_pieces(data[:-cut], 3), artifact="shop-1"))


def test_a_missing_trailer_is_an_integrity_failure() -> None:
    data, _ = _artifact(trailer=False)
    with pytest.raises(IntegrityFailure, match="no trailer record"):
        list(archive.read_records([data]))


def test_nothing_at_all_is_an_integrity_failure() -> None:
    with pytest.raises(IntegrityFailure, match="no trailer record"):
        list(archive.read_records([]))


def test_an_unknown_tag_is_an_integrity_failure() -> None:
    data, _ = _artifact()
    bad = b"X" + bson.encode({"a": 1})
    with pytest.raises(IntegrityFailure, match=r"unknown record tag b'X' at byte 0"):
        list(archive.read_records([bad + data]))


def test_a_bad_length_is_an_integrity_failure() -> None:
    with pytest.raises(IntegrityFailure, match="bad BSON length 4"):
        list(archive.read_records([b"D\x04\x00\x00\x00" + b"\x00" * 8]))


def test_records_after_the_trailer_are_an_integrity_failure() -> None:
    data, expected = _artifact()
    extra = archive.record(archive.DOCUMENT, {"_id": 2})
    seen: list[tuple[bytes, bytes]] = []
    with pytest.raises(IntegrityFailure, match="records after the trailer"):
        seen.extend(archive.read_records(_pieces(data + extra, 4)))
    assert seen == expected


def test_resume_tokens_round_trip_as_canonical_text() -> None:
    token = {"_data": "8265A1B2C3000000012B022C0100296E5A1004"}
    text = archive.token_text(token)
    assert text == '{"_data": "8265A1B2C3000000012B022C0100296E5A1004"}'
    assert archive.token_parse(text) == token
    assert archive.token_text({"b": 1, "a": "x"}) == archive.token_text({"a": "x", "b": 1})
    assert archive.token_text(None) == ""
    assert archive.token_parse("") is None
    with pytest.raises(ValueError, match="a resume token is a document"):
        archive.token_parse("[1]")


def test_resume_tokens_keep_exact_bson_types() -> None:
    token = {"_data": Binary(b"\x82\x00\x01", 0), "n": Int64(3)}
    back = archive.token_parse(archive.token_text(token))
    assert back is not None
    assert bson.encode(back) == bson.encode(token)  # binary subtype 0 decodes as bytes
    assert type(back["n"]) is Int64


# -- fingerprint ---------------------------------------------------------------------------


def _sum(*docs: dict[str, Any]) -> str:
    return _summer(*docs).checksum


def _summer(*docs: dict[str, Any]) -> CollectionSummer:
    s = CollectionSummer()
    for d in docs:
        s.add(bson.encode(d))
    return s


def test_field_order_does_not_matter_at_any_depth() -> None:
    left = {"a": 1, "b": {"x": 1, "y": 2}, "l": [{"p": 1, "q": 2}]}
    right = {"l": [{"q": 2, "p": 1}], "b": {"y": 2, "x": 1}, "a": 1}
    assert bson.encode(left) != bson.encode(right)
    assert canonical_bson(bson.encode(left)) == canonical_bson(bson.encode(right))
    assert canonical_bson(bson.encode(left)) == bson.encode(
        {"a": 1, "b": {"x": 1, "y": 2}, "l": [{"p": 1, "q": 2}]}
    )
    assert _sum(left) == _sum(right)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ({"a": [1, 2]}, {"a": [2, 1]}),  # array order is data
        ({"a": 1}, {"a": Int64(1)}),  # int32 is not int64
        ({"a": 1}, {"a": 1.0}),  # an integer is not a double
        ({"a": None}, {}),  # null is not missing
        ({"a": {"b": 1}}, {"a.b": 1}),
        ({"a": "1"}, {"a": 1}),
    ],
)
def test_values_and_their_exact_types_matter(left: dict[str, Any], right: dict[str, Any]) -> None:
    assert canonical_bson(bson.encode(left)) != canonical_bson(bson.encode(right))
    assert _sum(left) != _sum(right)


def test_collection_checksum_is_independent_of_document_order_and_counts() -> None:
    docs = [{"_id": i, "v": {"z": i, "a": -i}} for i in range(5)]
    forward = _summer(*docs)
    backward = _summer(*reversed(docs))
    assert forward.count == backward.count == 5
    assert forward.checksum == backward.checksum
    assert len(forward.checksum) == 32
    assert forward.result() == TableFingerprint(rows=5, checksum=forward.checksum)
    assert _sum(*docs[:4]) != forward.checksum
    assert _sum(*docs, docs[0]) != forward.checksum  # a duplicate counts


def test_an_empty_collection_has_the_zero_checksum() -> None:
    assert CollectionSummer().result() == TableFingerprint(rows=0, checksum="0" * 32)


# -- slice chains --------------------------------------------------------------------------


def _s(start: int, end: int, key: str = "") -> SliceRef:
    return SliceRef(_k(start), _k(end), key or f"shop/changes/{start}-{end}")


def test_no_slices_is_no_chain_and_no_gap() -> None:
    assert chain_from([], _k(5)) == ([], None)


def test_the_slice_covering_the_start_begins_the_chain() -> None:
    slices = [_s(20, 30), _s(0, 10), _s(10, 20), _s(30, 40)]
    run, gap = chain_from(slices, _k(15))
    assert run == [_s(10, 20), _s(20, 30), _s(30, 40)]
    assert gap is None


def test_a_start_at_a_slice_boundary_continues_exactly_there() -> None:
    slices = [_s(0, 10), _s(10, 20), _s(20, 30)]
    assert chain_from(slices, _k(10)) == ([_s(10, 20), _s(20, 30)], None)
    # At the very end of the newest slice: nothing more, and nothing missing.
    assert chain_from(slices, _k(30)) == ([], None)


def test_a_gap_ends_the_chain_and_says_between_what() -> None:
    slices = [_s(0, 10), _s(10, 20), _s(25, 30), _s(30, 40)]
    run, gap = chain_from(slices, _k(5))
    assert run == [_s(0, 10), _s(10, 20)]
    assert gap == Gap(_k(20), _k(25))


def test_duplicate_and_older_slices_are_skipped() -> None:
    first = _s(10, 20, "first")
    again = _s(10, 20, "shipped-twice")
    slices = [_s(0, 10), first, again, _s(12, 20), _s(20, 30)]
    run, gap = chain_from(slices, _k(10))
    assert [(r.start, r.end) for r in run] == [(_k(10), _k(20)), (_k(20), _k(30))]
    assert gap is None


def test_of_two_covering_slices_with_one_start_the_longer_begins_the_chain() -> None:
    # A restart re-read from 10 and shipped a longer slice than the first one from 10.
    slices = [_s(0, 10), _s(10, 20), _s(10, 25), _s(25, 30)]
    assert chain_from(slices, _k(12)) == ([_s(10, 25), _s(25, 30)], None)


def test_an_overlapping_slice_is_not_a_gap() -> None:
    # a holds 10-20, 20-30; the streamer then resumed at 10 from another destination and
    # shipped 10-25, 25-40 here too. 10-25-40 is unbroken.
    slices = [_s(10, 20), _s(20, 30), _s(10, 25), _s(25, 40)]
    assert chain_from(slices, _k(12)) == ([_s(10, 25), _s(25, 40)], None)


def test_the_covering_slice_that_reaches_furthest_begins_the_chain() -> None:
    slices = [_s(0, 10), _s(10, 20), _s(0, 50)]
    assert chain_from(slices, _k(15)) == ([_s(0, 50)], None)


def test_a_start_before_every_slice_is_a_gap_up_to_the_first() -> None:
    assert chain_from([_s(10, 20), _s(20, 30)], _k(5)) == ([], Gap(_k(5), _k(10)))


def test_a_start_after_every_slice_is_no_chain_and_no_gap() -> None:
    assert chain_from([_s(10, 20), _s(20, 30)], _k(35)) == ([], None)


def test_a_start_between_slices_is_a_gap_up_to_the_next() -> None:
    assert chain_from([_s(0, 10), _s(20, 30)], _k(15)) == ([], Gap(_k(15), _k(20)))


# -- slice bodies --------------------------------------------------------------------------

EVENTS = [
    bson.encode({"_id": {"_data": f"82{i:04d}"}, "clusterTime": _ts(i), "operationType": "insert"})
    for i in range(1, 4)
]


def test_a_slice_round_trips() -> None:
    data = encode_slice(_ts(0), {"_data": "8200"}, _ts(3), {"_data": "820003"}, EVENTS)
    body = decode_changes(_pieces(data, 7), "a:slice")
    assert body.start_time == _ts(0)
    assert body.start_token == {"_data": "8200"}
    assert body.end_time == _ts(3)
    assert body.end_token == {"_data": "820003"}
    assert body.events == EVENTS


def test_an_empty_slice_without_tokens_round_trips() -> None:
    body = decode_changes([encode_slice(_ts(0), None, _ts(0), None, [])], "a:slice")
    assert (body.start_time, body.start_token, body.end_time, body.end_token, body.events) == (
        _ts(0),
        None,
        _ts(0),
        None,
        [],
    )


def test_a_slice_whose_trailer_count_disagrees_is_an_integrity_failure() -> None:
    header = archive.record(
        archive.HEADER,
        {"format": archive.CHANGES_FORMAT, "version": 1, "start_time": _ts(0), "start_token": None},
    )
    trailer = archive.record(archive.TRAILER, {"count": 2, "end_time": _ts(3), "end_token": None})
    data = header + b"".join(archive.EVENT + e for e in EVENTS) + trailer
    with pytest.raises(IntegrityFailure, match="a:slice: 3 events, its trailer says 2"):
        decode_changes([data], "a:slice")


def test_a_slice_missing_an_event_is_an_integrity_failure() -> None:
    data = encode_slice(_ts(0), None, _ts(3), None, EVENTS)
    dropped = data.replace(archive.EVENT + EVENTS[1], b"")
    assert len(dropped) < len(data)
    with pytest.raises(IntegrityFailure, match="2 events, its trailer says 3"):
        decode_changes([dropped], "a:slice")


def test_a_dump_is_not_a_change_artifact() -> None:
    data, _ = _artifact()
    with pytest.raises(IntegrityFailure, match="not a drbot change-event artifact"):
        decode_changes([data], "a:dump")


# -- selection -----------------------------------------------------------------------------


def test_no_ns_selects_every_database_of_the_backup() -> None:
    sel = Selection.parse(["shop", "crm"], [])
    assert sel == Selection(frozenset({"shop", "crm"}))
    assert sel.covers("shop", "orders") and sel.covers("crm", None)
    assert not sel.covers("other", None)
    assert not sel.covers("other", "orders")


def test_ns_selects_whole_databases_and_single_collections() -> None:
    sel = Selection.parse(["shop", "crm"], ["shop", "crm.users", "crm.a.b"])
    assert sel == Selection(frozenset({"shop"}), frozenset({("crm", "users"), ("crm", "a.b")}))
    assert sel.covers("shop", "anything")
    assert sel.covers("shop", None)
    assert sel.covers("crm", "users")
    assert sel.covers("crm", "a.b")
    assert not sel.covers("crm", "leads")
    assert sel.covers("crm", None)  # the database holds a selected collection
    assert sel.describe() == ["shop", "crm.a.b", "crm.users"]


def test_a_db_with_an_empty_collection_name_is_the_whole_database() -> None:
    assert Selection.parse(["shop"], ["shop."]) == Selection(frozenset({"shop"}))


def test_an_unknown_database_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"--ns nope\.x: the backup has no database 'nope'"):
        Selection.parse(["shop", "crm"], ["shop", "nope.x"])
    with pytest.raises(UsageError, match=r"\(it has: none\)"):
        Selection.parse([], ["shop"])


# -- restore planning ----------------------------------------------------------------------

B1 = "20270115T080130Z-aaaaaa"
B2 = "20270115T080310Z-bbbbbb"
SHOP_FP = Fingerprint(
    {
        "shop.orders": TableFingerprint(3, "aa" * 16),
        "shop.users": TableFingerprint(2, "bb" * 16),
    }
)
CRM_FP = Fingerprint({"crm.leads": TableFingerprint(1, "cc" * 16)})


def _artifacts(backup_id: str) -> tuple[ArtifactRecord, ...]:
    prefix = f"shop/backups/{backup_id}"
    return (
        ArtifactRecord("shop", "mongo_dump", f"{prefix}/shop.enc", 100, "0" * 64, 90, "shop"),
        ArtifactRecord("crm", "mongo_dump", f"{prefix}/crm.enc", 100, "1" * 64, 90, "crm"),
        ArtifactRecord("changes", "mongo_changes", f"{prefix}/changes.enc", 50, "2" * 64, 40),
    )


def _entry(backup_id: str, consistent: int, destinations: Sequence[str] = ("a",)) -> BackupEntry:
    manifest = Manifest(
        policy="shop",
        backup_id=backup_id,
        type="full",
        mode="logical",
        engine="mongodb",
        source_version="7.0.14",
        started_at=_at(consistent - 60),
        completed_at=_at(consistent),
        destination=destinations[0],
        wrapped_key=WrappedKey("file:0011223344556677", b"\x01" * 60),
        compression={"algorithm": "zstd", "level": 3},
        encryption={"algorithm": "AES-256-GCM", "frame_size": 1 << 20},
        artifacts=_artifacts(backup_id),
        fingerprints={"shop": SHOP_FP, "crm": CRM_FP},
        databases=("crm", "shop"),
        positions={
            "consistent_time": ts_text(_ts(consistent)),
            "end_token": archive.token_text({"_data": f"82{consistent}"}),
            "start_time": ts_text(_ts(consistent - 60)),
        },
    )
    copies = tuple(
        Copy(d, dataclasses.replace(manifest, destination=d), b"k" * 32) for d in destinations
    )
    return BackupEntry(backup_id, copies)


def _scan(*entries: BackupEntry) -> CatalogScan:
    return CatalogScan(list(entries), [], [], {})


SCAN = _scan(_entry(B1, 100, ("a", "b")), _entry(B2, 200))
CHAIN = [_s(50, 150), _s(150, 250), _s(250, 300)]


def _plan(
    slices: dict[str, list[SliceRef]] | None = None,
    scan: CatalogScan = SCAN,
    **kwargs: Any,
) -> MongoRestorePlan:
    kwargs.setdefault("occupied", [])
    return plan_mongo_restore(
        scan,
        {"a": CHAIN} if slices is None else slices,
        policy="shop",
        target="mongodb://restore:27017",
        **kwargs,
    )


def test_at_picks_the_newest_backup_consistent_at_or_before_it() -> None:
    plan = _plan(at=_at(150))
    assert plan.backup_id == B1
    assert plan.consistent_time == _ts(100)
    assert plan.target_time == Timestamp(T + 150, 0xFFFFFFFF)
    assert plan.reach == Timestamp(T + 150, 0xFFFFFFFF)
    assert plan.slices == (_s(50, 150), _s(150, 250))  # the next one starts after the target
    assert plan.slice_source == "a"
    assert plan.sources == ("a", "b")
    assert plan.gap is None
    assert plan.warnings == ()


def test_a_backup_consistent_within_the_target_second_is_used_from_its_end() -> None:
    # Without data_since, a backup consistent at +200.1 counts from the end of second +200:
    # cluster times do not say where in the second it was.
    assert _plan(at=_at(199)).backup_id == B1
    assert _plan(at=_at(200)).backup_id == B1
    end_of_second = _at(201) - timedelta(microseconds=1)
    assert _plan(at=end_of_second).backup_id == B2


def test_a_backup_is_used_from_its_data_since_to_the_millisecond() -> None:
    since = _at(200) + timedelta(milliseconds=250)
    entry = _entry(B2, 200)
    copy = entry.copies[0]
    positions = {**copy.manifest.positions, "data_since": since.isoformat()}
    dated = dataclasses.replace(
        copy, manifest=dataclasses.replace(copy.manifest, positions=positions)
    )
    scan = _scan(_entry(B1, 100, ("a", "b")), BackupEntry(B2, (dated,)))
    assert _plan(scan=scan, at=since - timedelta(milliseconds=1)).backup_id == B1
    assert _plan(scan=scan, at=since).backup_id == B2
    assert _plan(scan=scan, at=since).target_at == since


def test_at_before_every_backup_says_when_the_earliest_restorable_moment_is() -> None:
    with pytest.raises(NoRestorePoint) as caught:
        _plan(at=_at(99))
    assert "is consistent at or before" in caught.value.message
    earliest = _at(100) + timedelta(seconds=1) - timedelta(microseconds=1)
    assert caught.value.hint == f"the earliest restorable moment is {earliest.isoformat()}"


def test_no_mongodb_backup_at_all_is_no_restore_point() -> None:
    with pytest.raises(NoRestorePoint, match="no complete MongoDB backup of policy 'shop'"):
        _plan(scan=_scan())


def test_backups_without_a_consistent_time_are_not_restore_points() -> None:
    entry = _entry(B1, 100)
    bare = dataclasses.replace(
        entry,
        copies=tuple(
            dataclasses.replace(c, manifest=dataclasses.replace(c.manifest, positions={}))
            for c in entry.copies
        ),
    )
    with pytest.raises(NoRestorePoint):
        _plan(scan=_scan(bare))
    assert _plan(scan=_scan(bare, _entry(B2, 200))).backup_id == B2


def test_latest_uses_the_newest_backup_and_its_whole_chain() -> None:
    plan = _plan()
    assert plan.backup_id == B2
    assert plan.consistent_time == _ts(200)
    assert plan.target_time is None
    assert plan.slices == (_s(150, 250), _s(250, 300))
    assert plan.reach == _ts(300)
    assert plan.gap is None
    assert plan.warnings == ()
    assert plan.to_json()["reach"] == f"{T + 300}.1"
    assert plan.to_json()["slices"] == 2


def test_latest_without_any_slices_reaches_the_backup_itself() -> None:
    plan = _plan({})
    assert (plan.backup_id, plan.slices, plan.slice_source, plan.reach) == (B2, (), None, _ts(200))


def test_the_destination_whose_chain_reaches_furthest_supplies_the_slices() -> None:
    plan = _plan({"a": CHAIN[:2], "b": CHAIN})
    assert plan.slice_source == "b"
    assert plan.slices == (_s(150, 250), _s(250, 300))
    assert plan.sources == ("a",)  # B2 itself is only in a


def test_a_gap_before_the_target_is_no_restore_point() -> None:
    holey = [_s(50, 150), _s(250, 300)]
    with pytest.raises(NoRestorePoint, match="have a gap after"):
        _plan({"a": holey}, at=_at(220))  # from B2 at 200: nothing until 250
    with pytest.raises(NoRestorePoint, match=f"from backup {B1}"):
        _plan({"a": holey}, at=_at(160))  # from B1 at 100: the chain stops at 150


def test_a_gap_after_the_target_does_not_matter() -> None:
    plan = _plan({"a": [_s(50, 150), _s(250, 300)]}, at=_at(120))
    assert plan.backup_id == B1
    assert plan.slices == (_s(50, 150),)
    assert plan.reach == Timestamp(T + 120, 0xFFFFFFFF)
    assert plan.gap == Gap(_k(150), _k(250))
    assert plan.warnings == ()


def test_a_target_beyond_the_last_slice_warns_and_reaches_the_last_change() -> None:
    plan = _plan(at=_at(400))
    assert plan.backup_id == B2
    assert plan.slices == (_s(150, 250), _s(250, 300))
    assert plan.target_time == Timestamp(T + 400, 0xFFFFFFFF)
    assert plan.reach == Timestamp(T + 300, 1)  # what the stored changes prove, not the target
    assert len(plan.warnings) == 1
    assert plan.warnings[0].startswith(
        f"the newest stored change is at {_at(300).isoformat()}; changes after that"
    )


def test_a_gap_is_reported_whatever_the_order_of_the_destinations() -> None:
    later = [_s(250, 300)]  # nothing between B2 (200) and 250
    with pytest.raises(NoRestorePoint, match="have a gap after"):
        _plan({"b": [], "a": later}, at=_at(280))  # passes today
    with pytest.raises(NoRestorePoint, match="have a gap after"):
        _plan({"a": later, "b": []}, at=_at(280))  # returns a plan with a warning today


def test_an_occupied_target_needs_drop() -> None:
    with pytest.raises(UsageError, match=r"already holds data in shop\.orders, crm\.leads") as e:
        _plan(occupied=["shop.orders", "crm.leads"])
    assert e.value.hint is not None and "--drop" in e.value.hint
    many = [f"shop.c{i}" for i in range(7)]
    with pytest.raises(UsageError, match=r"shop\.c4 and 2 more$"):
        _plan(occupied=many)


def test_an_occupied_target_with_drop_is_planned() -> None:
    plan = _plan(occupied=["shop.orders"], drop=True)
    assert plan.drop is True
    assert plan.occupied == ("shop.orders",)
    assert plan.backup_id == B2


def test_from_destination_restricts_backups_and_slices() -> None:
    slices = {"a": CHAIN, "b": [_s(50, 150), _s(150, 180)]}
    plan = _plan(slices, from_destination="b")
    assert plan.backup_id == B1  # B2 is only in a
    assert plan.sources == ("b",)
    assert plan.slice_source == "b"
    assert plan.slices == (_s(50, 150), _s(150, 180))
    assert plan.reach == _ts(180)


def test_from_a_destination_without_backups_is_no_restore_point() -> None:
    with pytest.raises(NoRestorePoint, match="in destination 'c'"):
        _plan(from_destination="c")


def test_everything_is_restored_without_ns() -> None:
    plan = _plan()
    assert [a.name for a in plan.dumps] == ["shop", "crm"]
    assert plan.changes is not None and plan.changes.kind == "mongo_changes"
    assert plan.expected == Fingerprint({**SHOP_FP.tables, **CRM_FP.tables})


def test_ns_limits_the_dumps_and_the_expected_fingerprint() -> None:
    plan = _plan(ns=["shop.orders"])
    assert [a.name for a in plan.dumps] == ["shop"]
    assert plan.expected == Fingerprint({"shop.orders": SHOP_FP.tables["shop.orders"]})
    assert plan.selection.describe() == ["shop.orders"]
    plan = _plan(ns=["crm"])
    assert [a.name for a in plan.dumps] == ["crm"]
    assert plan.expected == CRM_FP


def test_ns_outside_the_backup_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="the backup has no database 'billing'"):
        _plan(ns=["billing"])


def test_plan_to_json_names_what_will_happen() -> None:
    got = _plan(at=_at(150), ns=["shop"]).to_json()
    assert got == {
        "policy": "shop",
        "backup_id": B1,
        "consistent_time": f"{T + 100}.1",
        "consistent_at": _at(100).isoformat(),
        "target_time": f"{T + 150}.4294967295",
        "target_at": _at(150).isoformat(),
        "reach": f"{T + 150}.4294967295",
        "reach_at": _at(150).isoformat(),
        "target": "mongodb://restore:27017",
        "namespaces": ["shop"],
        "occupied": [],
        "drop": False,
        "sources": ["a", "b"],
        "dumps": ["shop"],
        "slices": 2,
        "slice_source": "a",
        "warnings": [],
    }


def test_the_plan_is_a_pure_function_of_its_arguments() -> None:
    slices = {"a": list(CHAIN)}
    before = (list(SCAN.backups), {k: list(v) for k, v in slices.items()})
    first = _plan(slices, at=_at(260))
    assert _plan(slices, at=_at(260)) == first
    assert (list(SCAN.backups), slices) == before
    assert first.reach == Timestamp(T + 260, 0xFFFFFFFF)


def test_a_heartbeat_at_the_chain_end_carries_the_restore_point_to_its_time() -> None:
    from drbot.ops.changestore import Heartbeat

    beat = Heartbeat(_at(500), _k(300))  # current at +500 with nothing after the +300 slice
    plan = _plan(at=_at(400), heartbeat=beat)
    assert plan.reach == Timestamp(T + 400, 0xFFFFFFFF) and plan.warnings == ()
    latest = _plan(heartbeat=beat)
    assert latest.reach == Timestamp(T + 500, 0xFFFFFFFF)
    beyond = _plan(at=_at(600), heartbeat=beat)
    assert beyond.reach == Timestamp(T + 500, 0xFFFFFFFF)
    assert "confirmed nothing changed until" in beyond.warnings[0]


def test_a_heartbeat_written_elsewhere_in_the_history_proves_nothing() -> None:
    from drbot.ops.changestore import Heartbeat

    stale = Heartbeat(_at(500), _k(250))  # written before the +300 slice was stored
    plan = _plan(at=_at(400), heartbeat=stale)
    assert plan.reach == _ts(300) and len(plan.warnings) == 1


def test_select_tells_events_of_one_second_apart_by_wall_time() -> None:
    from bson.datetime_ms import DatetimeMS

    def ev(i: int, ms: int) -> dict[str, Any]:
        return {"clusterTime": _ts(10, i), "wallTime": DatetimeMS((T + 10) * 1000 + ms)}

    groups = [[ev(1, 100)], [ev(2, 400)], [ev(3, 900)]]
    at = _at(10) + timedelta(milliseconds=400)
    until = Timestamp(T + 10, 0xFFFFFFFF)
    assert list(select(groups, until, at)) == groups[:2]
    assert list(select(groups, until)) == groups  # without `at`: the whole second
    assert list(select(groups, until, _at(10) + timedelta(milliseconds=99))) == []


def test_select_compares_wall_times_exactly() -> None:
    from bson.datetime_ms import DatetimeMS

    # 1796173438.501 s: as a float times 1000 it is ...500.9999, not ...501 ms
    event = {"clusterTime": Timestamp(1796173438, 1), "wallTime": DatetimeMS(1796173438501)}
    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=1796173438501)
    assert list(select([[event]], Timestamp(1796173438, 0xFFFFFFFF), at)) == [[event]]


def test_select_judges_by_wall_time_when_the_cluster_second_runs_ahead() -> None:
    from bson.datetime_ms import DatetimeMS

    # cluster time in second +11, wall clock still at +10.900: taken for a target of +10.950
    ahead = {"clusterTime": _ts(11, 1), "wallTime": DatetimeMS((T + 10) * 1000 + 900)}
    after = {"clusterTime": _ts(11, 2), "wallTime": DatetimeMS((T + 10) * 1000 + 990)}
    at = _at(10) + timedelta(milliseconds=950)
    assert list(select([[ahead], [after]], Timestamp(T + 10, 0xFFFFFFFF), at)) == [[ahead]]
    plan = _plan(at=_at(249) + timedelta(milliseconds=500))
    assert plan.slices[-1] == _s(250, 300)  # read too: its events may still be before +249.5
