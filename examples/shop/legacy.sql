-- The old shop database (legacy), schema shop: the reference scenario of docs/ARCHITECTURE.md.
-- Idempotent: safe to run on a database that already has it.
CREATE SCHEMA IF NOT EXISTS shop;

CREATE TABLE IF NOT EXISTS shop.users (
    id             bigint PRIMARY KEY,
    handle         text NOT NULL UNIQUE,
    display_name   text NOT NULL,
    email          text,
    phone          text,
    follower_count int NOT NULL DEFAULT 0,
    bio            text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shop.merchants (
    id            bigint PRIMARY KEY,
    owner_user_id bigint NOT NULL,
    shop_name     text NOT NULL,
    status        text NOT NULL CHECK (status IN ('active', 'suspended', 'closed')),
    rating        numeric(3,2),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shop.products (
    id          bigint PRIMARY KEY,
    merchant_id bigint NOT NULL,
    title       text NOT NULL,
    description text,
    price_idr   numeric(14,2) NOT NULL,
    stock       int NOT NULL,
    status      text NOT NULL CHECK (status IN ('live', 'hidden', 'deleted')),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS products_merchant_idx ON shop.products (merchant_id);

CREATE TABLE IF NOT EXISTS shop.orders (
    id          bigint PRIMARY KEY,
    buyer_id    bigint NOT NULL,
    merchant_id bigint NOT NULL,
    status      text NOT NULL
                CHECK (status IN ('created', 'paid', 'shipped', 'completed', 'cancelled')),
    total_idr   numeric(14,2) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shop.order_items (
    order_id       bigint NOT NULL,
    line_no        int NOT NULL,
    product_id     bigint NOT NULL,
    qty            int NOT NULL,
    unit_price_idr numeric(14,2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);

CREATE TABLE IF NOT EXISTS shop.payments (
    id          bigint PRIMARY KEY,
    order_id    bigint NOT NULL,
    method      text NOT NULL CHECK (method IN ('card', 'ewallet', 'bank_transfer', 'cod')),
    amount_idr  numeric(14,2) NOT NULL,
    status      text NOT NULL CHECK (status IN ('pending', 'settled', 'failed', 'refunded')),
    provider_ref text,
    paid_at     timestamptz
);
CREATE INDEX IF NOT EXISTS payments_order_idx ON shop.payments (order_id);

CREATE TABLE IF NOT EXISTS shop.invoices (
    id         bigint PRIMARY KEY,
    order_id   bigint NOT NULL,
    invoice_no text NOT NULL UNIQUE,
    url        text NOT NULL,
    issued_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS invoices_order_idx ON shop.invoices (order_id);
