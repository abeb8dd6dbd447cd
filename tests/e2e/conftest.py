"""A person's setup for e2e tests: a PostgreSQL source, two S3 regions, a key, a policy."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drbot.engines.postgres.localserver import LocalPostgres
from tests.fixtures.s3 import S3Server

DRBOT = str(Path(sys.executable).parent / "drbot")

POLICY = """\
version: 1
name: shop
source:
  kind: postgresql
  mode: logical
  uri: ${{SHOP_DB_URI}}
  databases: [{database}]
encryption:
  key: file:${{DRBOT_KEY_DIR}}/shop.key
compression:
  level: 3
destinations:
  - name: primary
    url: s3://{bucket1}/shop
    region: us-east-1
  - name: replica
    url: s3://{bucket2}/shop
    region: eu-west-1
targets:
  rpo: 5m
  rto: 30m
"""

SAMPLE = """
CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, total numeric(10,2),
                     placed_at timestamptz NOT NULL, note text, payload jsonb, receipt bytea);
INSERT INTO orders (customer, total, placed_at, note, payload, receipt)
SELECT 'secret-customer-' || i, i * 1.25,
       timestamptz '2026-01-01 00:00+00' + i * interval '1 minute',
       CASE WHEN i % 5 = 0 THEN E'tab\\there\\nnewline' END, jsonb_build_object('i', i),
       decode(md5(i::text), 'hex')
FROM generate_series(1, {rows}) AS i;
CREATE TABLE empty_table (id int);
"""


@dataclass
class Env:
    """Everything a test needs to type drbot commands against real parts."""

    tmp: Path
    pg: LocalPostgres
    s3: S3Server
    database: str
    buckets: tuple[str, str]
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DRBOT, *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [DRBOT, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def client(self, region: str) -> Any:
        """A boto3 S3 client for `region` on the test server, to look at or damage objects."""
        return self.s3.client("s3", region)

    def objects(self, bucket_index: int) -> list[str]:
        region = ("us-east-1", "eu-west-1")[bucket_index]
        resp = self.client(region).list_objects_v2(Bucket=self.buckets[bucket_index])
        return sorted(o["Key"] for o in resp.get("Contents", []))


@pytest.fixture
def e2e(tmp_path: Path, pg_server: LocalPostgres, s3_server: S3Server) -> Env:
    """A source database with 5,000 orders, two buckets in two regions, a key and a policy."""
    database = f"shop_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(database)
    pg_server.execute(database, SAMPLE.format(rows=5000))
    buckets = (s3_server.make_bucket("us-east-1"), s3_server.make_bucket("eu-west-1"))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(
        POLICY.format(database=database, bucket1=buckets[0], bucket2=buckets[1])
    )
    keys = tmp_path / "keys"
    keys.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DRBOT_", "PG"))}
    env.update(
        AWS_ENDPOINT_URL=s3_server.endpoint_url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        SHOP_DB_URI=pg_server.uri(database),
        DRBOT_KEY_DIR=str(keys),
        DRBOT_POLICIES=str(policies),
        DRBOT_STATE_DIR=str(tmp_path / "state"),
        DRBOT_LOG_FORMAT="json",
    )
    e = Env(tmp_path, pg_server, s3_server, database, buckets, env)
    res = e.run("keys", "generate", "--out", str(keys / "shop.key"))
    assert res.returncode == 0, res.stderr
    return e
