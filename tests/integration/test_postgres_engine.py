"""PostgresEngine against a real server: dump, fingerprint, restore, and every way a load fails.

One source database (many column types, odd names, partitions, a large object, 100k rows) is
dumped once per module; each test restores those bytes into databases of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from drbot.engines.base import Fingerprint, compare_fingerprints
from drbot.engines.postgres import engine as pg_engine
from drbot.engines.postgres.archive import SHA256_128, XXH3_128, ArchiveFingerprinter
from drbot.engines.postgres.engine import PostgresEngine
from drbot.engines.postgres.localserver import LocalPostgres, free_port
from drbot.errors import DatabaseError, IntegrityFailure, SourceUnavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LO_OID = 424242
LO_BYTES = bytes(range(256)) * 40 + b"\x00end"

SOURCE_SQL = r"""
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a integer, b text);

CREATE TABLE types (
    id serial PRIMARY KEY,
    i integer, bi bigint, si smallint, n numeric, f4 real, f8 double precision,
    t text, b bytea, ok boolean, d date, ts timestamp, tstz timestamptz, iv interval,
    tm time, u uuid, j json, jb jsonb, ia integer[], ta text[], ip inet, net cidr,
    g bigint GENERATED ALWAYS AS (i::bigint * 2) STORED,
    m mood, p posint, c pair
);
INSERT INTO types (i, bi, si, n, f4, f8, t, b, ok, d, ts, tstz, iv, tm, u, j, jb, ia, ta,
                   ip, net, m, p, c) VALUES
 (1, 9223372036854775807, 32767, 'NaN', 'NaN', 'NaN',
  E'tab\there\nnewline\\backslash\r\n', '\x00ff0a5c', true, 'infinity',
  '2024-02-29 23:59:59.999999', '2024-03-10 02:30:00+05', '1 year 2 mons 3 days 04:05:06.789',
  '23:59:59.999999', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1,  "a": [1, 2]}',
  '{"b": 1, "a": [1, 2], "u": "\u00e9"}', '{1,NULL,3}', '{"a b","c\"d",NULL,""}',
  '192.168.0.1/24', '10.0.0.0/8', 'happy', 1, ROW(1, 'x,y')),
 (-2147483648, -9223372036854775808, -32768,
  123456789012345678901234567890.123456789012345678901234567890, 'Infinity', '-Infinity',
  'ünïcödé 日本語 😀 \.', '\x', false, '-infinity', '1970-01-01 00:00:00',
  '1999-12-31 23:59:59.5-08', '-1 days +02:03:04', '00:00', '00000000-0000-0000-0000-000000000000',
  '[]', '{}', '{}', '{}', '::1', '2001:db8::/32', 'sad', 2147483647, ROW(NULL, NULL)),
 (0, 0, 0, -0.000000000000000000001, '-Infinity', '-0', '', '\x5c2e', NULL, '2000-01-01',
  '0001-01-01 00:00:00', '2038-01-19 03:14:08+00', '0', '12:00',
  'ffffffff-ffff-ffff-ffff-ffffffffffff',
  'null', 'null', '{{1,2},{3,4}}', '{"\\."}', '0.0.0.0', '0.0.0.0/0', 'ok', 7, ROW(0, '')),
 (3, 3, 3, 0.1, 0.1, 0.1, '\.', NULL, true, '2024-01-01', NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (NULL, NULL, NULL, NULL, '-0', 1e308, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

CREATE TABLE "Order Items" (id integer PRIMARY KEY, "Qty" integer NOT NULL, "Note" text);
INSERT INTO "Order Items" SELECT g, g * 10, 'note ' || g FROM generate_series(1, 5) g;

CREATE SCHEMA other;
CREATE TABLE other.things (k text PRIMARY KEY, v jsonb);
INSERT INTO other.things VALUES ('a', '{"x": 1}'), ('b', NULL), ('c\d', '[1, "two"]');

CREATE TABLE empty_table (id integer, t text);

CREATE TABLE meas (id integer, logdate date NOT NULL, v double precision)
    PARTITION BY RANGE (logdate);
CREATE TABLE meas_2023 PARTITION OF meas FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE meas_2024 PARTITION OF meas FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO meas SELECT g, DATE '2023-09-01' + g * 30, g / 3.0 FROM generate_series(1, 10) g;

CREATE TABLE big AS
    SELECT g AS id, md5(g::text) AS h, g * 1.5 AS x, (g % 7 = 0) AS flag
    FROM generate_series(1, 100000) g;
"""

EXPECTED_ROWS = {
    "public.types": 5,
    "public.Order Items": 5,
    "other.things": 3,
    "public.empty_table": 0,
    "public.meas_2023": 4,
    "public.meas_2024": 6,
    "public.big": 100_000,
}
# Every table to compare row by row (the partitioned parent too).
COMPARED = [*(tuple(name.split(".", 1)) for name in EXPECTED_ROWS), ("public", "meas")]


class Boom(Exception):
    """Raised by a chunk iterator standing in for a corrupt or undecryptable artifact."""


@dataclass(frozen=True)
class Dumped:
    engine: PostgresEngine
    source: str
    source_uri: str
    globals_sql: bytes
    archive: bytes
    fingerprint: Fingerprint


@pytest.fixture(scope="module")
def dumped(pg_server: LocalPostgres) -> Dumped:
    source = f"src_{uuid.uuid4().hex[:10]}"
    source_uri = pg_server.create_database(source)
    pg_server.execute(source, SOURCE_SQL)
    pg_server.execute(source, f"SELECT lo_from_bytea({LO_OID}, '\\x{LO_BYTES.hex()}')")

    engine = PostgresEngine(pg_server.uri(), [source])
    streams = engine.full_dumps()
    assert [(s.name, s.kind, s.database) for s in streams] == [
        ("globals.sql", "pg_globals", None),
        (f"db/{source}.pgdump", "pg_dump", source),
    ]
    globals_sql = b"".join(streams[0].chunks())
    archive = b"".join(streams[1].chunks())
    assert streams[0].fingerprint() is None
    fingerprint = streams[1].fingerprint()
    assert fingerprint is not None
    return Dumped(engine, source, source_uri, globals_sql, archive, fingerprint)


def _pieces(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _failing(data: bytes, fraction: float = 0.5) -> Iterator[bytes]:
    cut = int(len(data) * fraction)
    yield from _pieces(data[:cut])
    raise Boom("the artifact failed to decrypt")


def _new_name() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def _digests(uri: str) -> dict[str, object]:
    """Per table an order-independent digest of its rows' text, and the large object."""
    out: dict[str, object] = {}
    with psycopg.connect(uri, autocommit=True) as conn:
        for schema, table in COMPARED:
            ident = sql.Identifier(schema, table)
            query = sql.SQL(
                "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {} t"
            ).format(ident)
            row = conn.execute(query).fetchone()
            out[f"{schema}.{table}"] = row
        lo = conn.execute(
            "SELECT lo_get(oid) FROM pg_largeobject_metadata WHERE oid = %s", (LO_OID,)
        ).fetchone()
        out["large object"] = bytes(lo[0]) if lo is not None else None
    return out


def _table_names(uri: str) -> set[str]:
    with psycopg.connect(uri, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return {str(r[0]) for r in rows}


# -- dump and restore -------------------------------------------------------------------


def test_globals_stream_is_sql_with_roles(dumped: Dumped) -> None:
    text = dumped.globals_sql.decode()
    assert "CREATE ROLE" in text
    assert "postgres" in text


def test_fingerprint_covers_every_table(dumped: Dumped) -> None:
    fp = dumped.fingerprint
    assert {name: t.rows for name, t in fp.tables.items()} == EXPECTED_ROWS
    for table in fp.tables.values():
        assert len(table.checksum) == 32
        assert table.checksum == table.checksum.lower()
        assert table.alg == XXH3_128
    assert fp.tables["public.empty_table"].checksum == "0" * 32
    assert '"Qty"' in fp.tables["public.Order Items"].columns
    # Generated columns are not in the dump's COPY, so not in the recomputed one either.
    assert " g," not in fp.tables["public.types"].columns
    assert Fingerprint.from_json(fp.to_json()) == fp


def test_fingerprint_matches_source(dumped: Dumped) -> None:
    again = dumped.engine.fingerprint_target(dumped.source_uri, dumped.fingerprint)
    assert compare_fingerprints(dumped.fingerprint, again) == []
    assert again == dumped.fingerprint


def _sha256_sums(uri: str, tables: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Rows and SHA-256 checksum of each table, by hand, as docs/postgres-logical.md defines it."""
    out: dict[str, tuple[int, str]] = {}
    with psycopg.connect(uri, autocommit=True) as conn:
        for setting in ("DateStyle = ISO", "IntervalStyle = postgres", "extra_float_digits = 3"):
            conn.execute(f"SET {setting}")
        conn.execute("SET TimeZone = 'UTC'")
        for name, columns in tables.items():
            schema, _, table = name.partition(".")
            text = b""
            query = sql.SQL("COPY {} ({}) TO STDOUT").format(
                sql.Identifier(schema, table), sql.SQL(columns)
            )
            with conn.cursor().copy(query) as copy:
                text = b"".join(bytes(data) for data in copy)
            lines = text.split(b"\n")[:-1]
            total = sum(int.from_bytes(hashlib.sha256(x).digest()[:16], "big") for x in lines)
            out[name] = (len(lines), f"{total % 2**128:032x}")
    return out


@pytest.fixture(params=["pg_dump", "copy"])
def read_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test both ways a target is read: pg_dump, and COPY for a server newer than it."""
    if request.param == "copy":
        monkeypatch.setattr(PostgresEngine, "_pg_dump_major", lambda self: 9)
    return str(request.param)


def test_both_ways_of_reading_a_target_agree(dumped: Dumped, read_by: str) -> None:
    again = dumped.engine.fingerprint_target(dumped.source_uri, dumped.fingerprint)
    assert again == dumped.fingerprint


def test_pg_dump_major_version(dumped: Dumped) -> None:
    with psycopg.connect(dumped.source_uri) as conn:
        server_major = conn.info.server_version // 10000
    # The tests' pg_dump and server come from the same installation.
    assert dumped.engine._pg_dump_major() == server_major


def test_backups_before_xxh3_are_checked_with_sha256(dumped: Dumped, read_by: str) -> None:
    # A manifest written before 2026-12-02 names no checksum: its rows were summed with SHA-256.
    names = ["public.types", "public.Order Items", "public.big", "public.empty_table"]
    by_hand = _sha256_sums(
        dumped.source_uri, {n: dumped.fingerprint.tables[n].columns for n in names}
    )
    legacy = Fingerprint(
        tables={
            name: dataclasses.replace(
                dumped.fingerprint.tables[name], checksum=by_hand[name][1], alg=SHA256_128
            )
            for name in names
        }
    )
    assert "alg" not in legacy.to_json()["public.big"]
    again = dumped.engine.fingerprint_target(
        dumped.source_uri, Fingerprint.from_json(legacy.to_json())
    )
    assert again == legacy
    assert {n: (t.rows, t.checksum) for n, t in again.tables.items()} == by_hand
    assert by_hand["public.big"][1] != dumped.fingerprint.tables["public.big"].checksum


def test_unknown_checksum_is_integrity_failure(dumped: Dumped) -> None:
    table = dumped.fingerprint.tables["public.big"]
    future = Fingerprint(tables={"public.big": dataclasses.replace(table, alg="blake9")})
    with pytest.raises(IntegrityFailure, match="unknown row checksum 'blake9'"):
        dumped.engine.fingerprint_target(dumped.source_uri, future)


WEIRD_SQL = r"""
CREATE SCHEMA "my.schema";
CREATE TABLE "my.schema"."we""ird.*?$[x]" (id integer, "Quo""ted" text);
INSERT INTO "my.schema"."we""ird.*?$[x]" VALUES (1, 'a'), (2, NULL);
CREATE TABLE public."UPPER case" (id integer);
INSERT INTO public."UPPER case" SELECT generate_series(1, 7);
CREATE TABLE public."upper case" (id integer);
INSERT INTO public."upper case" VALUES (1);
CREATE TABLE public.weXird (id integer);
"""


def test_names_that_are_patterns_to_pg_dump(pg_server: LocalPostgres) -> None:
    # The target is read through pg_dump --table: every name must match itself only.
    db = f"w_{uuid.uuid4().hex[:10]}"
    uri = pg_server.create_database(db)
    pg_server.execute(db, WEIRD_SQL)
    engine = PostgresEngine(pg_server.uri(), [db])
    archive = engine.full_dumps()[1]
    for _ in archive.chunks():
        pass
    expected = archive.fingerprint()
    assert expected is not None
    assert expected.tables['my.schema.we"ird.*?$[x]'].rows == 2
    assert expected.tables["public.UPPER case"].rows == 7
    assert engine.fingerprint_target(uri, expected) == expected
    only_upper = Fingerprint(tables={"public.UPPER case": expected.tables["public.UPPER case"]})
    assert engine.fingerprint_target(uri, only_upper) == only_upper


def test_many_tables_read_from_a_whole_dump(
    dumped: Dumped, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past MAX_TABLE_ARGS the whole database's data is dumped; tables not asked for are dropped.
    monkeypatch.setattr(pg_engine, "MAX_TABLE_ARGS", 1)
    again = dumped.engine.fingerprint_target(dumped.source_uri, dumped.fingerprint)
    assert again == dumped.fingerprint
    some = Fingerprint(tables={"public.big": dumped.fingerprint.tables["public.big"]})
    assert dumped.engine.fingerprint_target(dumped.source_uri, some) == some


def test_tables_missing_from_the_target_are_left_out(dumped: Dumped) -> None:
    extra = dataclasses.replace(dumped.fingerprint.tables["public.big"], rows=1)
    asked = Fingerprint(tables={**dumped.fingerprint.tables, "public.gone": extra})
    again = dumped.engine.fingerprint_target(dumped.source_uri, asked)
    assert again == dumped.fingerprint
    assert [m.problem for m in compare_fingerprints(asked, again)] == ["missing"]
    nothing = Fingerprint(tables={"public.gone": extra})
    assert dumped.engine.fingerprint_target(dumped.source_uri, nothing) == Fingerprint()


def test_restore_round_trip(dumped: Dumped, pg_server: LocalPostgres) -> None:
    engine = dumped.engine
    target = pg_server.uri(_new_name())
    assert engine.target_is_empty(target)
    assert engine.prepare_target(target) is True
    try:
        engine.load("pg_dump", _pieces(dumped.archive), target)
        restored = engine.fingerprint_target(target, dumped.fingerprint)
        assert compare_fingerprints(dumped.fingerprint, restored) == []
        assert restored == dumped.fingerprint
        source_digests = _digests(dumped.source_uri)
        assert source_digests["large object"] == LO_BYTES
        assert _digests(target) == source_digests
        assert not engine.target_is_empty(target)
    finally:
        engine.drop_target(target)


def test_fingerprint_independent_of_chunking(dumped: Dumped) -> None:
    rng = random.Random(20240229)
    data = dumped.archive
    fp = ArchiveFingerprinter("chunked")
    pos = 0
    while pos < len(data):
        size = rng.randint(1, 5000)
        fp.feed(data[pos : pos + size])
        pos += size
    assert fp.result() == dumped.fingerprint


def test_fingerprint_of_truncated_dump_is_none(dumped: Dumped) -> None:
    fp = ArchiveFingerprinter("truncated")
    fp.feed(dumped.archive[: len(dumped.archive) // 2])
    assert fp.result() is None


# -- failed loads leave the target as it was --------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.999])
def test_failing_input_leaves_empty_target_empty(
    dumped: Dumped, pg_server: LocalPostgres, pg_database: str, fraction: float
) -> None:
    target = pg_server.uri(pg_database)
    with pytest.raises(Boom):
        dumped.engine.load("pg_dump", _failing(dumped.archive, fraction), target)
    assert dumped.engine.target_is_empty(target)
    assert _table_names(target) == set()


def test_failing_input_leaves_existing_data_unchanged(
    dumped: Dumped, pg_server: LocalPostgres, pg_database: str
) -> None:
    pg_server.execute(
        pg_database,
        "CREATE TABLE keep (id integer PRIMARY KEY, t text);"
        "INSERT INTO keep SELECT g, 'row ' || g FROM generate_series(1, 50) g;",
    )
    target = pg_server.uri(pg_database)
    before = _keep_rows(target)
    with pytest.raises(Boom):
        dumped.engine.load("pg_dump", _failing(dumped.archive), target, replace=True)
    assert _table_names(target) == {"public.keep"}
    assert _keep_rows(target) == before


def _keep_rows(uri: str) -> list[tuple[object, ...]]:
    with psycopg.connect(uri, autocommit=True) as conn:
        return conn.execute("SELECT * FROM keep ORDER BY id").fetchall()


def test_garbage_input_is_database_error(
    dumped: Dumped, pg_server: LocalPostgres, pg_database: str
) -> None:
    target = pg_server.uri(pg_database)
    with pytest.raises(DatabaseError) as info:
        dumped.engine.load("pg_dump", iter([b"this is not an archive\n" * 1000]), target)
    assert "pg_restore" in info.value.message
    assert dumped.engine.target_is_empty(target)


def test_truncated_archive_is_database_error(
    dumped: Dumped, pg_server: LocalPostgres, pg_database: str
) -> None:
    target = pg_server.uri(pg_database)
    with pytest.raises(DatabaseError):
        dumped.engine.load("pg_dump", _pieces(dumped.archive[: len(dumped.archive) // 2]), target)
    assert dumped.engine.target_is_empty(target)


def test_unknown_kind_is_database_error(dumped: Dumped, pg_server: LocalPostgres) -> None:
    with pytest.raises(DatabaseError):
        dumped.engine.load("mongo_dump", iter([b""]), pg_server.uri(_new_name()))


def test_replace_overwrites_modified_target(
    dumped: Dumped, pg_server: LocalPostgres, pg_database: str
) -> None:
    engine = dumped.engine
    target = pg_server.uri(pg_database)
    engine.load("pg_dump", _pieces(dumped.archive), target)
    pg_server.execute(
        pg_database,
        'UPDATE "Order Items" SET "Qty" = 0; DELETE FROM big WHERE id % 2 = 0;'
        "INSERT INTO empty_table VALUES (1, 'x'); TRUNCATE other.things;"
        f"SELECT lo_put({LO_OID}, 0, '\\xffff');",
    )
    assert compare_fingerprints(
        dumped.fingerprint, engine.fingerprint_target(target, dumped.fingerprint)
    )
    engine.load("pg_dump", _pieces(dumped.archive), target, replace=True)
    assert engine.fingerprint_target(target, dumped.fingerprint) == dumped.fingerprint
    assert _digests(target) == _digests(dumped.source_uri)


def test_load_without_replace_into_populated_target_fails_cleanly(
    dumped: Dumped, pg_server: LocalPostgres, pg_database: str
) -> None:
    engine = dumped.engine
    target = pg_server.uri(pg_database)
    engine.load("pg_dump", _pieces(dumped.archive), target)
    pg_server.execute(pg_database, "DELETE FROM big WHERE id > 10")
    with pytest.raises(DatabaseError):
        engine.load("pg_dump", _pieces(dumped.archive), target)
    assert engine.fingerprint_target(target, dumped.fingerprint).tables["public.big"].rows == 10


# -- probe and targets ------------------------------------------------------------------


def test_unreachable_server_is_source_unavailable() -> None:
    port = free_port()
    engine = PostgresEngine(f"postgresql://u:s3cretpw@127.0.0.1:{port}/db")
    with pytest.raises(SourceUnavailable) as info:
        engine.probe()
    assert info.value.exit_code == 14
    assert info.value.retryable
    assert f"127.0.0.1:{port}" in info.value.message
    assert "s3cretpw" not in str(info.value)
    assert "s3cretpw" not in (info.value.hint or "")


def test_unreachable_server_dump_is_source_unavailable() -> None:
    engine = PostgresEngine(f"postgresql://u:s3cretpw@127.0.0.1:{free_port()}/db")
    with pytest.raises(SourceUnavailable) as info:
        engine.full_dumps()
    assert "s3cretpw" not in str(info.value)


def test_probe_lists_databases(dumped: Dumped, pg_server: LocalPostgres) -> None:
    info = PostgresEngine(pg_server.uri()).probe()
    assert info.server_version.startswith("15")
    assert dumped.source in info.databases
    assert "template0" not in info.databases
    assert PostgresEngine(pg_server.uri(), [dumped.source]).probe().databases == (dumped.source,)


def test_missing_configured_database_is_database_error(pg_server: LocalPostgres) -> None:
    engine = PostgresEngine(pg_server.uri(), ["postgres", "no_such_db_xyz"])
    with pytest.raises(DatabaseError) as info:
        engine.probe()
    assert "no_such_db_xyz" in info.value.message
    assert not isinstance(info.value, SourceUnavailable)


def test_target_lifecycle(pg_server: LocalPostgres) -> None:
    engine = PostgresEngine(pg_server.uri())
    name = _new_name()
    target = pg_server.uri(name)
    assert engine.target_is_empty(target)  # does not exist
    assert engine.prepare_target(target) is True
    try:
        assert engine.target_is_empty(target)  # fresh
        assert engine.prepare_target(target) is False  # exists already
        pg_server.execute(name, "CREATE TABLE t (id integer)")
        assert not engine.target_is_empty(target)
    finally:
        engine.drop_target(target)
    with psycopg.connect(pg_server.uri(), autocommit=True) as conn:
        gone = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert gone is None
    assert engine.target_is_empty(target)
    engine.drop_target(target)  # dropping a missing database is not an error


def test_target_with_only_a_function_or_schema_is_not_empty(
    pg_server: LocalPostgres, pg_database: str
) -> None:
    engine = PostgresEngine(pg_server.uri())
    target = pg_server.uri(pg_database)
    pg_server.execute(pg_database, "CREATE SCHEMA lonely")
    assert not engine.target_is_empty(target)


def test_apply_globals_warns_about_existing_roles(dumped: Dumped, pg_server: LocalPostgres) -> None:
    warnings = dumped.engine.apply_globals(iter([dumped.globals_sql]), pg_server.uri())
    assert warnings
    assert any("already exists" in w for w in warnings)
    # Through load() as well, which must not raise either.
    dumped.engine.load("pg_globals", iter([dumped.globals_sql]), pg_server.uri())
