#!/usr/bin/env bash
# `make demo`: the reference shop on the local stack, narrated. Run by the Makefile after
# `make up`, with the stack's CUTOVER_* variables exported. Safe to run again: it starts from a
# fresh legacy schema each time (the local stack is a sandbox).
set -euo pipefail
cd "$(dirname "$0")/../.."
CUTOVER=.venv/bin/cutover
ORDERS=${DEMO_ORDERS:-100000}
RATE=${DEMO_RATE:-500}
DURATION=${DEMO_DURATION:-15}
export CUTOVER_CONFIG=examples/shop/cutover.toml

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. The old shop: a fresh legacy schema (examples/shop/legacy.sql)"
psql "$CUTOVER_SOURCE_DSN" -q -v ON_ERROR_STOP=1 \
  -c "SET client_min_messages = warning" -c "DROP SCHEMA IF EXISTS shop CASCADE" \
  -f examples/shop/legacy.sql

step "2. Prefill: $ORDERS orders with their lines, payments and invoices, plus users, merchants, products"
$CUTOVER workload --prefill --orders "$ORDERS" --seed 7

step "3. Live traffic: $RATE transactions/s for $DURATION s (signups, listings, orders, payments, rollbacks)"
$CUTOVER workload --rate "$RATE" --duration "$DURATION" --seed 7

step "4. What the old shop holds now"
psql "$CUTOVER_SOURCE_DSN" -q -v ON_ERROR_STOP=1 <<'SQL'
SELECT 'users' AS "table", count(*) AS rows FROM shop.users
UNION ALL SELECT 'merchants', count(*) FROM shop.merchants
UNION ALL SELECT 'products', count(*) FROM shop.products
UNION ALL SELECT 'orders', count(*) FROM shop.orders
UNION ALL SELECT 'order_items', count(*) FROM shop.order_items
UNION ALL SELECT 'payments', count(*) FROM shop.payments
UNION ALL SELECT 'invoices', count(*) FROM shop.invoices;
SELECT count(*) FILTER (WHERE o.total_idr <> s.sum) AS orders_with_wrong_total,
       count(*) AS orders_checked
FROM shop.orders o
JOIN (SELECT order_id, sum(qty * unit_price_idr) AS sum FROM shop.order_items GROUP BY order_id) s
  ON s.order_id = o.id;
SQL

step "Done. The stack keeps running (make down stops it)."
