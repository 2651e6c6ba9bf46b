-- The commerce database (commerce), schema commerce: the target of the reference scenario
-- (docs/MAPPING.md, examples/shop/mapping.toml). Idempotent: safe to run on a database that
-- already has it.
--
-- Conventions:
--   * ids are bigint; money is held in minor units (`*_minor bigint`, IDR x 100), never float;
--   * states and methods are upper-case text with a CHECK listing the allowed values, so a value
--     the mapping lets through by mistake is refused here (a "target constraint violation" poison
--     message, routed to the dead-letter topic) instead of being stored;
--   * NO FOREIGN KEYS, on purpose: rows arrive through different Kafka topics (domains) and
--     partitions, each applied in its own order by independent consumers. An order line may be
--     applied before its listing, a payment before its order. Referential checks belong to
--     `cutover verify` (run once the consumers caught up), not to the apply path. For the same
--     reason there is no UNIQUE constraint besides the primary keys (legacy invoice_no is unique,
--     but two invoices applied from different partitions may pass through a transient state);
--   * every table carries two bookkeeping columns recording the source position that last wrote
--     the row (docs/ARCHITECTURE.md: no visible duplicates, no going backwards):
--       _src_lsn  commit LSN of the source transaction, as an integer (pg_lsn - '0/0'); LSNs stay
--                 far below 2^63 in practice, so bigint holds them;
--       _src_seq  ordinal of the change event inside that source transaction.
--     An upsert or delete applies only when its (_src_lsn, _src_seq) is newer than the row's, so
--     redelivered or replayed events (Kafka at-least-once, replay from offset 0) change nothing.
--     Deleted rows leave their position in the tool's control tables, not here.
-- The tool's own control tables (offsets, dead letters, cutover state, audit) are created by
-- `cutover init` in a separate schema; they are not part of the commerce schema.

CREATE SCHEMA IF NOT EXISTS commerce;

-- data domain: what a buyer needs, never the social profile (handle, follower_count and bio stay
-- in the old database: they are excluded from the publication, pgoutput never sends them).
CREATE TABLE IF NOT EXISTS commerce.customers (
    customer_id   bigint      NOT NULL PRIMARY KEY,
    display_name  text        NOT NULL,
    email         text,
    phone         text,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    _src_lsn      bigint      NOT NULL,
    _src_seq      bigint      NOT NULL
);

-- merchant domain
CREATE TABLE IF NOT EXISTS commerce.sellers (
    seller_id          bigint       NOT NULL PRIMARY KEY,
    owner_customer_id  bigint       NOT NULL,
    name               text         NOT NULL,
    state              text         NOT NULL
                       CONSTRAINT sellers_state_check
                       CHECK (state IN ('ACTIVE', 'SUSPENDED', 'CLOSED')),
    rating             numeric(3,2),
    created_at         timestamptz  NOT NULL,
    updated_at         timestamptz  NOT NULL,
    _src_lsn           bigint       NOT NULL,
    _src_seq           bigint       NOT NULL
);

-- A product whose legacy status is 'deleted' has no listing: the mapping deletes the row.
CREATE TABLE IF NOT EXISTS commerce.listings (
    listing_id   bigint  NOT NULL PRIMARY KEY,
    seller_id    bigint  NOT NULL,
    title        text    NOT NULL,
    description  text,
    price_minor  bigint  NOT NULL CONSTRAINT listings_price_minor_check CHECK (price_minor >= 0),
    stock        integer NOT NULL,
    visible      boolean NOT NULL,
    _src_lsn     bigint  NOT NULL,
    _src_seq     bigint  NOT NULL
);

-- payment domain: orders, their lines, payments and invoices travel together (key = order id).
CREATE TABLE IF NOT EXISTS commerce.orders (
    order_id     bigint      NOT NULL PRIMARY KEY,
    customer_id  bigint      NOT NULL,
    seller_id    bigint      NOT NULL,
    state        text        NOT NULL
                 CONSTRAINT orders_state_check
                 CHECK (state IN ('CREATED', 'PAID', 'SHIPPED', 'COMPLETED', 'CANCELLED')),
    total_minor  bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    _src_lsn     bigint      NOT NULL,
    _src_seq     bigint      NOT NULL
);

CREATE TABLE IF NOT EXISTS commerce.order_lines (
    order_id          bigint  NOT NULL,
    line_no           integer NOT NULL,
    listing_id        bigint  NOT NULL,
    quantity          integer NOT NULL CONSTRAINT order_lines_quantity_check CHECK (quantity > 0),
    unit_price_minor  bigint  NOT NULL,
    _src_lsn          bigint  NOT NULL,
    _src_seq          bigint  NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

CREATE TABLE IF NOT EXISTS commerce.payments (
    payment_id    bigint      NOT NULL PRIMARY KEY,
    order_id      bigint      NOT NULL,
    method        text        NOT NULL
                  CONSTRAINT payments_method_check
                  CHECK (method IN ('CARD', 'EWALLET', 'BANK_TRANSFER', 'COD')),
    amount_minor  bigint      NOT NULL,
    state         text        NOT NULL
                  CONSTRAINT payments_state_check
                  CHECK (state IN ('PENDING', 'SETTLED', 'FAILED', 'REFUNDED')),
    provider_ref  text,
    paid_at       timestamptz,
    _src_lsn      bigint      NOT NULL,
    _src_seq      bigint      NOT NULL
);

-- link points at the commerce domain (the invoice-link migration); the legacy url is not copied.
CREATE TABLE IF NOT EXISTS commerce.invoices (
    invoice_id  bigint      NOT NULL PRIMARY KEY,
    order_id    bigint      NOT NULL,
    invoice_no  text        NOT NULL,
    link        text        NOT NULL,
    issued_at   timestamptz NOT NULL,
    _src_lsn    bigint      NOT NULL,
    _src_seq    bigint      NOT NULL
);
