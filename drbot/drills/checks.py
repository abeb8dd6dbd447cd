"""What a drill checks in the restored PostgreSQL server, over its private unix socket.

Every check returns a `CheckResult` rather than raising: a drill reports all its checks, and
only the runner decides what a failure means.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import psycopg

from drbot.drills.plan import CheckResult
from drbot.engines.base import Mismatch
from drbot.policy.schema import Check

PORT = 5432
"""The sandbox server's port: only the socket file's name, since it has no TCP listener."""

_STATEMENT_TIMEOUT_MS = 10 * 60 * 1000

# Every valid btree index of a permanent relation; amcheck's bt_index_check with
# heapallindexed also proves each heap tuple is in the index.
_BTREE_INDEXES = """
SELECT c.oid::regclass::text
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_am am ON am.oid = c.relam
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE am.amname = 'btree' AND c.relpersistence = 'p' AND i.indisvalid AND i.indisready
  AND n.nspname NOT LIKE 'pg_temp%'
ORDER BY 1
"""


def conninfo(socket_dir: Path, user: str, dbname: str, port: int = PORT) -> str:
    return psycopg.conninfo.make_conninfo(
        host=str(socket_dir), port=str(port), user=user, dbname=dbname, connect_timeout="10"
    )


def find_superuser(socket_dir: Path, login: str, dbname: str) -> str:
    """A superuser of the restored cluster (trust auth lets drbot log in as any role)."""
    with psycopg.connect(conninfo(socket_dir, login, dbname), autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolsuper AND rolcanlogin ORDER BY oid LIMIT 1"
        ).fetchone()
    return str(row[0]) if row else login


def databases(socket_dir: Path, user: str, dbname: str) -> list[str]:
    """Every database a restore holds (template0 takes no connections)."""
    with psycopg.connect(conninfo(socket_dir, user, dbname), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname"
        ).fetchall()
    return [str(r[0]) for r in rows]


def fingerprint_check(database: str, checked: bool, mismatches: Sequence[Mismatch]) -> CheckResult:
    name = f"fingerprint:{database}"
    if not checked:
        return CheckResult(name, False, "the backup's manifest has no fingerprint to compare")
    if not mismatches:
        return CheckResult(name, True, "row counts and checksums of every table match")
    shown = "; ".join(
        f"{m.table}: {m.problem} ({m.expected} vs {m.actual})" for m in mismatches[:5]
    )
    more = f" and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""
    return CheckResult(name, False, f"{len(mismatches)} difference(s): {shown}{more}")


def amcheck(socket_dir: Path, user: str, dbs: Sequence[str]) -> CheckResult:
    """amcheck's bt_index_check (with heapallindexed) on every btree index of every database."""
    checked = 0
    for db in dbs:
        try:
            with psycopg.connect(conninfo(socket_dir, user, db), autocommit=True) as conn:
                conn.execute(f"SET statement_timeout = {_STATEMENT_TIMEOUT_MS}")
                conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
                indexes = [str(r[0]) for r in conn.execute(_BTREE_INDEXES).fetchall()]
                for index in indexes:
                    try:
                        conn.execute(
                            "SELECT bt_index_check(index => %s::regclass, heapallindexed => true)",
                            (index,),
                        )
                    except psycopg.Error as exc:
                        return CheckResult(
                            "amcheck", False, f"index {index} in database {db}: {_first(exc)}"
                        )
                    checked += 1
        except psycopg.Error as exc:
            return CheckResult("amcheck", False, f"database {db}: {_first(exc)}")
    return CheckResult(
        "amcheck", True, f"{checked} btree index(es) in {len(dbs)} database(s) verified"
    )


CHECK_ROLE = "drbot_drill_check"


def check_role(socket_dir: Path, superuser: str, dbname: str, *, port: int = PORT) -> str:
    """A role that can read every table but is no superuser, to run the policy's checks as:
    a check must not be able to write, or run programs on the host (COPY ... TO PROGRAM)."""
    with psycopg.connect(conninfo(socket_dir, superuser, dbname, port), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CHECK_ROLE,))
        if exists.fetchone() is None:
            conn.execute(f"CREATE ROLE {CHECK_ROLE} LOGIN")
        conn.execute(f"GRANT pg_read_all_data, pg_monitor TO {CHECK_ROLE}")
    return CHECK_ROLE


def custom_checks(
    socket_dir: Path, user: str, checks: Sequence[Check], default_db: str, *, port: int = PORT
) -> list[CheckResult]:
    """The policy's own checks; each passes only if its first value is exactly true.

    Each is one statement (a prepared statement refuses more), run by `user` (see `check_role`)
    in a read-only transaction that is rolled back. What a failing check returned is described
    by its type only: the record goes to every destination, and values may be personal data.
    """
    out: list[CheckResult] = []
    for check in checks:
        name = str(check.name)
        db = check.database or default_db
        try:
            with psycopg.connect(conninfo(socket_dir, user, db, port)) as conn:
                conn.execute(f"SET statement_timeout = {_STATEMENT_TIMEOUT_MS}")
                conn.execute("SET TRANSACTION READ ONLY")
                row = conn.execute(check.sql, prepare=True).fetchone()
                conn.rollback()
        except psycopg.Error as exc:
            out.append(CheckResult(name, False, f"failed in database {db}: {_first(exc)}"))
            continue
        value = row[0] if row else None
        passed = value is True
        if passed:
            seen = "returned true"
        elif row is None:
            seen = "returned no row, not true"
        elif value is None or isinstance(value, bool):
            seen = f"returned {'null' if value is None else 'false'}, not true"
        else:
            seen = f"returned a {type(value).__name__}, not a boolean true"
        out.append(CheckResult(name, passed, seen))
    return out


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
