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
