-- Sample data for `drbot demo`: a small shop with varied column types.
CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');

CREATE TABLE customers (
    id          bigserial PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    profile     jsonb
);

CREATE TABLE orders (
    id           bigserial PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES customers(id),
    status       order_status NOT NULL,
    total        numeric(12, 2) NOT NULL,
    weight_kg    double precision,
    placed_on    date NOT NULL,
    ship_window  interval,
    tracking     uuid,
    note         text,
    receipt      bytea
);

INSERT INTO customers (email, name, created_at, tags, profile)
SELECT format('customer%s@example.com', i),
       format('Customer %s', i),
       timestamptz '2026-01-01 00:00:00+00' + (i || ' minutes')::interval,
       ARRAY['tier-' || (i % 3), CASE WHEN i % 7 = 0 THEN 'vip' ELSE 'regular' END],
       jsonb_build_object('newsletter', i % 2 = 0, 'score', i * 1.5)
FROM generate_series(1, 2000) AS i;

INSERT INTO orders (customer_id, status, total, weight_kg, placed_on, ship_window, tracking, note, receipt)
SELECT 1 + (i % 2000),
       (ARRAY['new', 'paid', 'shipped', 'cancelled']::order_status[])[1 + i % 4],
       round((i * 13.37)::numeric % 1000, 2),
       CASE WHEN i % 11 = 0 THEN NULL ELSE i / 7.0 END,
       date '2026-01-01' + (i % 300),
       (i % 5 || ' days')::interval,
       md5(i::text)::uuid,
       CASE WHEN i % 13 = 0 THEN E'gift\twrap\nplease' ELSE 'ok' END,
       decode(md5(i::text), 'hex')
FROM generate_series(1, 20000) AS i;
