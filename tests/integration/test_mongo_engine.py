"""The MongoDB engine against a real server (mongod, or SecantusDB: see tests/fixtures/mongo.py):
what only the engine's own steps can show, deterministically."""

from __future__ import annotations

import pytest

from drbot.engines.mongodb import archive
from drbot.engines.mongodb.dump import ChangesDump, DatabaseDump
from drbot.engines.mongodb.engine import MongoEngine
from drbot.engines.mongodb.position import ts_key, ts_parse
from drbot.errors import DatabaseError, NoRestorePoint
from tests.fixtures.mongo import MongoServer

pytestmark = pytest.mark.integration


def test_a_rename_while_the_dump_runs_fails_the_backup(
    mongo_server: MongoServer, mongo_db: str
) -> None:
    with mongo_server.client() as client:
        client[mongo_db]["logs"].insert_many([{"_id": i} for i in range(10)])
        engine = MongoEngine(mongo_server.uri, [mongo_db])
        dumps = engine.full_dumps()
        assert [type(d) for d in dumps] == [DatabaseDump, ChangesDump]
        dump_bytes = b"".join(dumps[0].chunks())
        assert [t for t, _ in archive.read_records([dump_bytes])].count(archive.DOCUMENT) == 10
        client[mongo_db]["logs"].rename("logs_old")  # after listing, before the end
        with pytest.raises(DatabaseError, match=rf"{mongo_db}\.logs was renamed") as caught:
            b"".join(dumps[1].chunks())
        assert caught.value.hint is not None and "run the backup again" in caught.value.hint
        engine.close()


def test_events_during_the_dump_are_kept_up_to_the_consistent_moment(
    mongo_server: MongoServer, mongo_db: str
) -> None:
    with mongo_server.client() as client:
        client[mongo_db]["c"].insert_many([{"_id": i} for i in range(5)])
        engine = MongoEngine(mongo_server.uri, [mongo_db])
        dumps = engine.full_dumps()
        b"".join(dumps[0].chunks())
        with client.start_session() as s, s.start_transaction():
            client[mongo_db]["c"].insert_one({"_id": "t1"}, session=s)
            client[mongo_db]["c"].insert_one({"_id": "t2"}, session=s)
        client[mongo_db]["c"].delete_one({"_id": 0})
        raw = b"".join(dumps[1].chunks())
        events = [archive.decode(r) for t, r in archive.read_records([raw]) if t == archive.EVENT]
        kinds = [(e["operationType"], e["documentKey"]["_id"]) for e in events]
        assert kinds == [("insert", "t1"), ("insert", "t2"), ("delete", 0)]
        positions = dumps[1].positions()
        assert positions is not None and positions["events"] == 3
        consistent = ts_parse(str(positions["consistent_time"]))
        assert ts_key(consistent) >= ts_key(events[-1]["clusterTime"])
        engine.close()


def test_a_database_the_policy_names_must_exist(mongo_server: MongoServer) -> None:
    engine = MongoEngine(mongo_server.uri, ["no_such_db_here"])
    with pytest.raises(NoRestorePoint, match="has no database no_such_db_here"):
        engine.probe()
    engine.close()


def test_collections_read_in_parallel_come_out_one_after_the_other(
    mongo_server: MongoServer, mongo_db: str
) -> None:
    sizes = {"a": 3000, "b": 0, "c": 1, "d": 2500, "e": 700}
    with mongo_server.client() as client:
        for name, n in sizes.items():
            client[mongo_db].create_collection(name)
            if n:
                client[mongo_db][name].insert_many([{"_id": i, "pad": "x" * 400} for i in range(n)])
    engine = MongoEngine(mongo_server.uri, [mongo_db])
    dump = engine.full_dumps()[0]
    records = list(archive.read_records(list(dump.chunks())))
    seen: list[tuple[str, int]] = []
    current: str | None = None
    count = 0
    for tag, raw in records[1:-1]:
        if tag == archive.COLLECTION:
            assert current is None, "a collection began inside another"
            current, count = archive.decode(raw)["name"], 0
        elif tag == archive.DOCUMENT:
            assert current is not None
            count += 1
        elif tag == archive.END:
            end = archive.decode(raw)
            assert current is not None and end["name"] == current and end["count"] == count
            seen.append((current, count))
            current = None
    assert seen == sorted(sizes.items())
    fingerprint = dump.fingerprint()
    assert fingerprint is not None
    assert {k: t.rows for k, t in fingerprint.tables.items()} == {
        f"{mongo_db}.{k}": v for k, v in sizes.items()
    }
    engine.close()
