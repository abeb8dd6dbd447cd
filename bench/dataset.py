"""A realistic benchmark database of a chosen size: mixed types, ordinary compressibility.

Not pgbench's blank-padded rows alone (they compress 50:1 and flatter every compressor): a
shop's tables with names and e-mail addresses drawn from pools, money, timestamps, statuses,
JSON events with varying keys, prose made of dictionary words, and a share of random bytes
(already-compressed attachments), with the primary keys and secondary indexes a real schema
has. Rows are added in batches until the database reaches the target size.
"""

from __future__ import annotations

import psycopg

SCHEMA = """
CREATE TABLE customers (
    id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, country char(2) NOT NULL,
    created_at timestamptz NOT NULL, balance numeric(12, 2) NOT NULL, vip boolean NOT NULL);
CREATE TABLE orders (
    id bigint PRIMARY KEY, customer_id bigint NOT NULL, placed_at timestamptz NOT NULL,
    status text NOT NULL, total numeric(12, 2) NOT NULL, items int NOT NULL, note text);
CREATE TABLE order_lines (
    order_id bigint NOT NULL, line int NOT NULL, sku text NOT NULL, qty int NOT NULL,
    price numeric(10, 2) NOT NULL, PRIMARY KEY (order_id, line));
CREATE TABLE events (
    id bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, payload jsonb NOT NULL);
CREATE TABLE documents (
    id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL, attachment bytea);
CREATE TABLE words (i int PRIMARY KEY, w text NOT NULL);
INSERT INTO words
SELECT i, (ARRAY['order','invoice','shipment','customer','payment','refund','warehouse',
  'delivery','address','street','city','north','south','river','garden','blue','green','small',
  'large','quick','quiet','bright','signal','window','market','coffee','winter','summer',
  'account','balance','ledger','product','service','support','ticket','urgent','standard',
  'return','policy','contract','partner','supplier','quality','review','report','monthly',
  'weekly','daily','project','meeting','schedule','update','status','pending','complete',
  'cancel','express','economy','premium','basic','the','and','of','to','in','for','with',
  'on','at','by','from','about','after','before','under','over','between','through',
  'during','without','within','against','among','toward','upon','including','until',
  'engine','battery','cable','screen','keyboard','printer','paper','bottle','table','chair',
  'lamp','door','glass','metal','wood','stone','cotton','silk','leather','plastic'])[i]
FROM generate_series(1, 100) i;
"""

INDEXES = """
CREATE INDEX orders_customer ON orders (customer_id);
CREATE INDEX orders_placed ON orders (placed_at);
CREATE INDEX events_at ON events (at);
CREATE INDEX customers_email ON customers (email);
"""

# One batch: about 25 MB of table data. {lo} is the first id of the batch, {n} its size.
# Ids are bigint from the start ({lo}::bigint): generate_series of two int4 gives int4, and
# g * 1000 overflowed past ~2.1 M ids (a database of ~1.6 GB). hashint8 returns int4, whose
# abs() overflows for -2^31: each abs(hashint8(..)) widens first. Neither changes a value.
BATCH = """
INSERT INTO customers
SELECT g, initcap(w1.w) || ' ' || initcap(w2.w) || '-' || (g % 97),
       lower(w1.w) || '.' || g || '@' || w2.w || '.example',
       (ARRAY['DE','FR','US','GB','NL','ES','IT','PL','SE','JP'])
         [1 + abs(hashint8(g + 7)::bigint) % 10],
       timestamptz '2020-01-01' + random() * interval '2000 days',
       round((random() * 10000)::numeric, 2), random() < 0.06
FROM generate_series({lo}::bigint, {lo} + {n} / 10 - 1) g
JOIN words w1 ON w1.i = 1 + abs(hashint8(g)::bigint) % 100
JOIN words w2 ON w2.i = 1 + abs(hashint8(-g)::bigint) % 100;

INSERT INTO orders
SELECT g, 1 + abs(hashint8(g)::bigint) % ({lo} / 10 + {n} / 10),
       timestamptz '2023-01-01' + g * interval '17 s' + random() * interval '17 s',
       (ARRAY['new','paid','packed','shipped','delivered','returned'])
         [1 + abs(hashint8(g)::bigint) % 6],
       round((random() * 500)::numeric, 2), 1 + abs(hashint8(g + 1)::bigint) % 7,
       CASE WHEN random() < 0.25 THEN 'please ' || w.w || ' before ' || (g % 28 + 1) || ' ' ||
            to_char(timestamptz '2023-01-01' + g * interval '17 s', 'Mon') END
FROM generate_series({lo}::bigint, {lo} + {n} - 1) g
JOIN words w ON w.i = 1 + abs(hashint8(g + 2)::bigint) % 100;

INSERT INTO order_lines
SELECT o, l, 'SKU-' || lpad((abs(hashint8(o * 4 + l)::bigint) % 50000)::text, 6, '0'),
       1 + abs(hashint8(o * 4 - l)::bigint) % 5,
       round((1 + random() * 200)::numeric, 2)
FROM generate_series({lo}::bigint, {lo} + {n} - 1) o, generate_series(1, 3) l;

INSERT INTO events
SELECT g, timestamptz '2024-01-01' + g * interval '3 s' + random() * interval '3 s',
       (ARRAY['login','view','cart','checkout','logout','search'])
         [1 + abs(hashint8(g)::bigint) % 6],
       jsonb_build_object('user', abs(hashint8(g)::bigint) % 100000,
         'ip', '10.' || (abs(hashint8(g + 1)::bigint) % 256)
           || '.' || (abs(hashint8(g + 2)::bigint) % 256)
           || '.' || (abs(hashint8(g + 3)::bigint) % 256),
         'agent', (ARRAY['firefox','chrome','safari'])[1 + abs(hashint8(g + 4)::bigint) % 3],
         'query', CASE WHEN random() < 0.17 THEN w.w END, 'ms', (random() * 900)::int,
         'ok', random() > 0.02)
FROM generate_series({lo}::bigint, {lo} + {n} - 1) g
JOIN words w ON w.i = 1 + abs(hashint8(g + 5)::bigint) % 100;

INSERT INTO documents
SELECT g, initcap(w.w) || ' report ' || g,
       (SELECT string_agg(x.w, ' ' ORDER BY k)
          FROM generate_series(1, 40 + g % 80) k
          JOIN words x ON x.i = 1 + abs(hashint8(g * 1000 + k)::bigint) % 100),
       CASE WHEN g % 3 = 0 THEN (SELECT decode(string_agg(md5(random()::text), ''), 'hex')
                                 FROM generate_series(1, 16 + g % 2))  -- ~260 random bytes
       END
FROM generate_series({lo}::bigint, {lo} + {n} / 4 - 1) g
JOIN words w ON w.i = 1 + abs(hashint8(g + 6)::bigint) % 100;
"""

BATCH_ROWS = 100_000


def database_size(uri: str) -> int:
    with psycopg.connect(uri) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def generate(uri: str, target_bytes: int, *, batch_rows: int = BATCH_ROWS) -> int:
    """Fill the (empty) database at `uri` up to about `target_bytes`; returns its final size."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(SCHEMA.encode())
        conn.execute(INDEXES.encode())
        lo = 1
        while True:
            conn.execute(BATCH.format(lo=lo, n=batch_rows).encode())
            lo += batch_rows
            size = database_size(uri)
            if size >= target_bytes:
                break
        conn.execute(b"VACUUM ANALYZE")
    return database_size(uri)
