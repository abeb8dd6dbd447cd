"""The drbot command as a person uses it: two regions, damage, wrong keys, kills, typos."""

from __future__ import annotations

import base64
import json
import re
import signal
import time
from typing import Any, cast

import psycopg
import pytest

from tests.e2e.conftest import Env

pytestmark = pytest.mark.e2e


def _backup(e2e: Env) -> str:
    res = e2e.run("backup", "--policy", "shop", "--json")
    assert res.returncode == 0, res.stderr
    return str(json.loads(res.stdout)["id"])


def _listed(e2e: Env) -> list[dict[str, object]]:
    res = e2e.run("list", "--policy", "shop", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert isinstance(rows, list)
    return rows


def _count(uri: str, sql: str) -> int:
    with psycopg.connect(uri) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


def test_backup_lists_in_both_regions_and_restores_identical_data(e2e: Env) -> None:
    """A backup lands verified in both regions, lists with the documented fields, and restores."""
    backup_id = _backup(e2e)
    rows = _listed(e2e)
    assert [r["id"] for r in rows] == [backup_id]
    row = rows[0]
    for field in ("id", "type", "started_at", "completed_at", "size_bytes", "destinations"):
        assert field in row
    assert row["type"] == "full"
    assert row["destinations"] == ["primary", "replica"]
    target = e2e.pg.uri(f"{e2e.database}_restored")
    res = e2e.run("restore", "--policy", "shop", "--to", target, "--yes")
    assert res.returncode == 0, res.stderr
    assert "match the backup's fingerprint" in res.stdout
    assert _count(target, "select count(*) from orders") == 5000
    src = e2e.env["SHOP_DB_URI"]
    q = "select md5(string_agg(o::text, '|' order by id)) from orders o"
    with psycopg.connect(src) as a, psycopg.connect(target) as b:
        assert a.execute(q).fetchone() == b.execute(q).fetchone()


def test_no_plaintext_in_any_stored_object(e2e: Env) -> None:
    """Every object in both buckets is ciphertext: no row value or table name can be found in it."""
    _backup(e2e)
    for i, region in enumerate(("us-east-1", "eu-west-1")):
        client = e2e.client(region)
        keys = e2e.objects(i)
        assert keys, "nothing stored"
        for key in keys:
            body = client.get_object(Bucket=e2e.buckets[i], Key=key)["Body"].read()
            # Manifests included: table and column names are sealed in them too.
            for needle in (b"secret-customer-", b"orders", b"placed_at", b"CREATE TABLE", b"PGDMP"):
                assert needle not in body, f"{needle!r} in {key}"


def test_flipped_byte_in_one_region_fails_verify_and_other_region_restores(e2e: Env) -> None:
    """A flipped byte in the primary copy: verify exits 13 naming it; a restore still succeeds."""
    _backup(e2e)
    client = e2e.client("us-east-1")
    key = next(k for k in e2e.objects(0) if k.endswith(".pgdump.zst.enc"))
    body = bytearray(client.get_object(Bucket=e2e.buckets[0], Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=e2e.buckets[0], Key=key, Body=bytes(body))

    res = e2e.run("verify", "--policy", "shop")
    assert res.returncode == 13, res.stderr
    assert "primary" in res.stderr and key.split("/", 1)[1] in res.stderr
    assert e2e.run("verify", "--policy", "shop", "--destination", "replica").returncode == 0

    target = e2e.pg.uri(f"{e2e.database}_r1")
    res = e2e.run("restore", "--policy", "shop", "--to", target, "--from", "replica", "--yes")
    assert res.returncode == 0, res.stderr
    assert _count(target, "select count(*) from orders") == 5000

    # without --from, drbot notices the bad primary copy and falls back to the replica
    target2 = e2e.pg.uri(f"{e2e.database}_r2")
    res = e2e.run("restore", "--policy", "shop", "--to", target2, "--yes")
    assert res.returncode == 0, res.stderr
    assert "primary" in res.stderr  # the warning about the unusable copy
    assert _count(target2, "select count(*) from orders") == 5000


def test_wrong_key_exits_12_and_writes_nothing(e2e: Env) -> None:
    """With another key, list and restore exit 12 and the target database is not created."""
    _backup(e2e)
    keyfile = e2e.tmp / "keys" / "shop.key"
    keyfile.unlink()
    assert e2e.run("keys", "generate", "--out", str(keyfile)).returncode == 0
    target_db = f"{e2e.database}_wrongkey"
    res = e2e.run("restore", "--policy", "shop", "--to", e2e.pg.uri(target_db), "--yes")
    assert res.returncode == 12, res.stderr
    assert "key" in res.stderr.lower()
    exists = _count(
        e2e.pg.uri("postgres"),
        f"select count(*) from pg_database where datname = '{target_db}'",
    )
    assert exists == 0
    assert e2e.run("list", "--policy", "shop").returncode == 12


def test_killed_backups_never_list_as_complete_and_are_cleaned_up(e2e: Env) -> None:
    """SIGKILL at random moments never leaves a listed backup; the next backup removes leftovers."""
    e2e.pg.execute(
        e2e.database,
        "insert into orders (customer, placed_at, payload) "
        "select repeat(md5(i::text), 40), now(), '{}' from generate_series(1, 60000) i",
    )
    killed_midway = 0
    for delay in (0.4, 0.9, 1.6):
        before = len(_listed(e2e))
        proc = e2e.popen("backup", "--policy", "shop")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # A kill after the manifests were written may still leave a complete backup; whatever
        # is listed must be complete: every listed backup verifies.
        if len(_listed(e2e)) == before:
            killed_midway += 1
        res = e2e.run("verify", "--policy", "shop")
        assert res.returncode == 0, res.stdout + res.stderr
    assert killed_midway >= 1, "no kill landed in the middle of a backup; enlarge the data"
    complete_before = {r["id"] for r in _listed(e2e)}
    backup_id = _backup(e2e)
    rows = _listed(e2e)
    assert {r["id"] for r in rows} == complete_before | {backup_id}
    # A kill between the two destinations' manifests leaves a backup complete in the first
    # only: listed, with its partial copy in the second removed as a leftover like any other.
    for i, destination in enumerate(("primary", "replica")):
        ids = {m.group(1) for k in e2e.objects(i) if (m := re.search(r"backups/([^/]+)/", k))}
        complete_here = {r["id"] for r in rows if destination in cast(list[str], r["destinations"])}
        assert ids == complete_here, f"bucket {i}: leftovers {ids - complete_here}"


def test_typo_in_policy_exits_16_naming_the_field(e2e: Env) -> None:
    """An unknown field in a policy is rejected with the file and the field path, exit 16."""
    policy = e2e.tmp / "policies" / "shop.yaml"
    policy.write_text(policy.read_text().replace("region: eu-west-1", "regoin: eu-west-1"))
    res = e2e.run("backup", "--policy", "shop")
    assert res.returncode == 16
    assert "shop.yaml" in res.stderr and "regoin" in res.stderr
    assert e2e.run("policy", "validate").returncode == 16


def test_unreachable_database_exits_14_and_unreachable_storage_15(e2e: Env) -> None:
    """A database nobody listens for is exit 14; an S3 endpoint nobody listens on is exit 15."""
    res = e2e.run("backup", "--policy", "shop", SHOP_DB_URI="postgresql://postgres@127.0.0.1:1/x")
    assert res.returncode == 14, res.stderr
    res = e2e.run("list", "--policy", "shop", AWS_ENDPOINT_URL="http://127.0.0.1:1")
    assert res.returncode == 15, res.stderr
    res = e2e.run("verify", "--policy", "shop", AWS_ENDPOINT_URL="http://127.0.0.1:1")
    assert res.returncode == 15, res.stderr


def test_restore_refuses_non_empty_target_and_dry_run_writes_nothing(e2e: Env) -> None:
    """A non-empty target needs --replace (exit 2); --dry-run prints the plan, changes nothing."""
    _backup(e2e)
    res = e2e.run("restore", "--policy", "shop", "--to", e2e.env["SHOP_DB_URI"], "--yes")
    assert res.returncode == 2
    assert "--replace" in res.stderr
    target_db = f"{e2e.database}_dry"
    res = e2e.run("restore", "--policy", "shop", "--to", e2e.pg.uri(target_db), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "Restore plan" in res.stdout and ".pgdump.zst.enc" in res.stdout
    exists = _count(
        e2e.pg.uri("postgres"),
        f"select count(*) from pg_database where datname = '{target_db}'",
    )
    assert exists == 0
    res = e2e.run("restore", "--policy", "shop", "--to", e2e.pg.uri(target_db))
    assert res.returncode == 2, "without --yes and without a terminal, restore must refuse"


def test_every_command_has_help_with_an_example(e2e: Env) -> None:
    """`--help` works for every command and shows an example."""
    for cmd in (
        ["backup"],
        ["list"],
        ["verify"],
        ["restore"],
        ["keys", "generate"],
        ["policy", "validate"],
        ["policy", "schema"],
        ["demo"],
    ):
        res = e2e.run(*cmd, "--help")
        assert res.returncode == 0, (cmd, res.stderr)
        assert "Example" in res.stdout, cmd


def test_every_action_lands_in_a_verifiable_audit_trail(e2e: Env) -> None:
    """Backup, verify and restore each leave signed, chained events; an edit is caught (13)."""
    backup_id = _backup(e2e)
    assert e2e.run("verify", "--policy", "shop").returncode == 0
    target = e2e.pg.uri(f"{e2e.database}_audited")
    assert e2e.run("restore", "--policy", "shop", "--to", target, "--yes").returncode == 0
    res = e2e.run("audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: every event is signed" in res.stdout
    res = e2e.run("audit", "show", "--json", "--last", "100")
    assert res.returncode == 0, res.stderr
    events = json.loads(res.stdout)
    actions = [e["action"] for e in events]
    for action in (
        "key.generated",
        "policy.loaded",
        "backup.started",
        "artifact.stored",
        "backup.completed",
        "verify.completed",
        "restore.planned",
        "restore.started",
        "restore.completed",
    ):
        assert action in actions, actions
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    completed = next(e for e in events if e["action"] == "backup.completed")
    assert completed["subject"]["backup_id"] == backup_id
    assert set(completed["details"]["manifest_sha256"]) == {"primary", "replica"}
    stored = [e for e in events if e["action"] == "artifact.stored"]
    assert {e["subject"]["destination"] for e in stored} == {"primary", "replica"}
    restored = next(e for e in events if e["action"] == "restore.completed")
    assert restored["outcome"] == "ok"
    assert "@" in restored["actor"]

    res = e2e.run(
        "restore", "--policy", "shop", "--to", target, "--backup", "20000101T000000Z-000000"
    )
    assert res.returncode == 10, res.stderr
    refused = json.loads(e2e.run("audit", "show", "--json", "--last", "1").stdout)[0]
    assert refused["action"] == "restore.refused"
    assert refused["details"]["exit_code"] == 10
    assert refused["subject"]["backup_id"] == "20000101T000000Z-000000"

    policy = e2e.tmp / "policies" / "shop.yaml"
    policy.write_text(policy.read_text() + "# reviewed\n")
    assert e2e.run("list", "--policy", "shop").returncode == 0
    res = e2e.run("audit", "show", "--json", "--last", "1")
    changed = json.loads(res.stdout)[0]
    assert changed["action"] == "policy.changed"
    assert changed["details"]["previous_sha256"] != changed["details"]["sha256"]

    trail = e2e.tmp / "state" / "audit" / "trail.jsonl"
    lines = trail.read_bytes().split(b"\n")
    index = actions.index("backup.completed")
    lines[index] = lines[index].replace(b'"outcome":"ok"', b'"outcome":"partial"')
    trail.write_bytes(b"\n".join(lines))
    res = e2e.run("audit", "verify")
    assert res.returncode == 13, res.stdout + res.stderr
    assert f"event {index + 1}" in res.stderr
    assert "edited" in res.stderr


def test_audit_trail_ships_to_both_regions_and_anchors_catch_a_cut(e2e: Env) -> None:
    """`audit ship` stores segments and anchors in each region; deleting the newest segment
    there is reported as a cut trail (exit 13) because the anchor still records its head."""
    _backup(e2e)
    res = e2e.run("audit", "ship")
    assert res.returncode == 0, res.stdout + res.stderr
    _backup(e2e)
    res = e2e.run("audit", "ship", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    shipped = json.loads(res.stdout)
    assert set(shipped["shipped_bytes"]) == {"primary", "replica"}
    for destination in ("primary", "replica"):
        res = e2e.run("audit", "verify", "--from", destination)
        assert res.returncode == 0, res.stdout + res.stderr
    segments = sorted(k for k in e2e.objects(1) if "/segments/" in k)
    assert len(segments) == 2
    e2e.client("eu-west-1").delete_object(Bucket=e2e.buckets[1], Key=segments[-1])
    res = e2e.run("audit", "verify", "--from", "replica")
    assert res.returncode == 13, res.stdout + res.stderr
    assert "truncated" in res.stderr
    assert e2e.run("audit", "verify", "--from", "primary").returncode == 0


def test_evidence_export_marks_controls_as_the_events_say(e2e: Env) -> None:
    """A period with a backup, a failed backup and a restore: controls follow the events; the
    JSON export verifies on its own, and an edit to it is caught."""
    backup_id = _backup(e2e)
    failed = e2e.run(
        "backup", "--policy", "shop", SHOP_DB_URI="postgresql://postgres@127.0.0.1:1/x"
    )
    assert failed.returncode == 14
    target = e2e.pg.uri(f"{e2e.database}_evidence")
    assert e2e.run("restore", "--policy", "shop", "--to", target, "--yes").returncode == 0
    assert e2e.run("audit", "ship").returncode == 0
    period = ("--since", "2000-01-01", "--until", "2100-01-01")
    out = e2e.tmp / "evidence.json"
    res = e2e.run("audit", "export", *period, "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(out.read_text())
    shop = doc["policies"]["shop"]
    assert [b["id"] for b in shop["backups"]] == [backup_id]
    assert shop["backups"][0]["destinations"]["replica"]["region"] == "eu-west-1"
    assert shop["backups"][0]["key_ids"]["primary"].startswith("file:")
    assert [c["action"] for c in shop["policy_changes"]] == ["policy.loaded"]
    assert [f["action"] for f in shop["failures"]] == ["backup.failed"]
    assert shop["failures"][0]["details"]["exit_code"] == 14
    assert shop["failures"][0]["details"]["started"] is True  # the probe failed, after start
    status = {name: c["status"] for name, c in shop["controls"].items()}
    assert status == {
        "backups_on_schedule": "not applicable",  # the policy schedules nothing
        "encryption_in_force": "met",
        "copies_in_two_regions": "met",
        "immutability": "not met",  # no object lock on these buckets
        "restore_tested": "met",  # within the 30m RTO
    }
    res = e2e.run("audit", "verify", "--trail", str(out))
    assert res.returncode == 0, res.stdout + res.stderr

    html_out = e2e.tmp / "evidence.html"
    assert (
        e2e.run("audit", "export", *period, "--format", "html", "--out", str(html_out)).returncode
        == 0
    )
    page = html_out.read_text()
    assert "<svg" in page and "restore tested" in page and backup_id in page
    csv_out = e2e.tmp / "evidence.csv"
    assert (
        e2e.run("audit", "export", *period, "--format", "csv", "--out", str(csv_out)).returncode
        == 0
    )
    assert "backup.completed" in csv_out.read_text()

    assert {a["destination"] for a in doc["chain"]["anchors"]} == {"primary", "replica"}

    def with_trail(lines: list[bytes]) -> dict[str, Any]:
        changed: dict[str, Any] = json.loads(json.dumps(doc))
        changed["chain"]["trail_base64"] = base64.b64encode(b"\n".join(lines) + b"\n").decode()
        return changed

    lines = base64.b64decode(doc["chain"]["trail_base64"]).rstrip(b"\n").split(b"\n")
    # Cutting the export's chain short, head included, still contradicts the anchors.
    cut = with_trail(lines[:-4])
    last = json.loads(lines[-5])
    cut["chain"]["head"] = {"seq": last["seq"], "hash": last["hash"], "time": last["time"]}
    out.write_text(json.dumps(cut))
    res = e2e.run("audit", "verify", "--trail", str(out))
    assert res.returncode == 13, res.stdout + res.stderr
    assert "truncated" in res.stderr

    # A verdict changed by hand no longer matches what the chain's events give.
    forged = json.loads(json.dumps(doc))
    forged["policies"]["shop"]["controls"]["immutability"]["status"] = "met"
    out.write_text(json.dumps(forged))
    res = e2e.run("audit", "verify", "--trail", str(out))
    assert res.returncode == 13, res.stdout + res.stderr
    assert "evidence-edited" in res.stderr

    edited = next(i for i, line in enumerate(lines) if b'"outcome":"ok"' in line)
    lines[edited] = lines[edited].replace(b'"outcome":"ok"', b'"outcome":"failed"')
    doc = with_trail(lines)
    out.write_text(json.dumps(doc))
    res = e2e.run("audit", "verify", "--trail", str(out))
    assert res.returncode == 13, res.stdout + res.stderr
