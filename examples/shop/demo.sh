#!/usr/bin/env bash
# `make demo`: the whole cutover of the reference shop on the local stack, narrated.
# Run by the Makefile after `make up`, with the stack's CUTOVER_* variables exported.
# Safe to run again: it starts from a fresh legacy shop, commerce DB, slot and topic prefix.
# Ctrl-C stops the producer and consumers it started (the stack itself keeps running).
set -euo pipefail
cd "$(dirname "$0")/../.."
CUTOVER=.venv/bin/cutover
ORDERS=${DEMO_ORDERS:-100000}
RATE=${DEMO_RATE:-300}
DURATION=${DEMO_DURATION:-20}
export CUTOVER_CONFIG=examples/shop/cutover.toml
# A new topic prefix per run: topics of earlier runs never mix into this one.
export CUTOVER_TOPIC_PREFIX="demo$(date +%s)"
LOGS=.stack/demo
mkdir -p "$LOGS"
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'echo; echo "interrupted: stopping the producer and consumers"; exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A secured stack (make up SECURE=1): each component runs as its own least-privilege PostgreSQL
# role and Kafka user (devtools/stack_roles.py), the stack's administrator only sets things up
# and plays the applications. On a plaintext stack these stay empty: everything runs as it is.
SECURED=${CUTOVER_KAFKA_SECURITY_PROTOCOL:+1}
PRODUCER=() APPLIER=() REVERSE_APPLIER=() SRE=()
stack_roles() { [ -z "$SECURED" ] || .venv/bin/python -m devtools.stack_roles "$@"; }
as_role() {  # as_role ARRAY PART KAFKA_USER: ARRAY = `env` with PART's DSNs and Kafka user
  local -n cmd=$1
  local src="CUTOVER_ROLE_${2^^}_SOURCE_DSN" tgt="CUTOVER_ROLE_${2^^}_TARGET_DSN"
  local user="CUTOVER_KAFKA_${3^^}_USER" secret="CUTOVER_KAFKA_${3^^}_PASSWORD_FILE"
  cmd=(env "CUTOVER_SOURCE_DSN=${!src}" "CUTOVER_TARGET_DSN=${!tgt}"
    "CUTOVER_KAFKA_SASL_USERNAME=${!user}" "CUTOVER_KAFKA_SASL_PASSWORD_FILE=${!secret}")
}
apply_grants() {  # after init (and init --reverse): the printed grants, as the administrator
  [ -n "$SECURED" ] || return 0
  stack_roles apply-grants
  set -a; . .stack/roles.env; set +a
  as_role PRODUCER producer producer
  as_role APPLIER applier applier
  as_role REVERSE_APPLIER reverse_applier applier
  as_role SRE sre operator
}
sql() { psql "$1" -q -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning" "${@:2}"; }

step "0. A clean sandbox: legacy shop, commerce DB, slot (topic prefix $CUTOVER_TOPIC_PREFIX)"
sql "$CUTOVER_SOURCE_DSN" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cutover_slot'" >/dev/null
sql "$CUTOVER_TARGET_DSN" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cutover_reverse_slot'" >/dev/null
sql "$CUTOVER_TARGET_DSN" -c "DROP PUBLICATION IF EXISTS cutover_reverse_pub"
sql "$CUTOVER_SOURCE_DSN" -c "DROP PUBLICATION IF EXISTS cutover_pub" -c "DROP SCHEMA IF EXISTS shop CASCADE" -c "DROP SCHEMA IF EXISTS cutover CASCADE"
sql "$CUTOVER_TARGET_DSN" -c "DROP SCHEMA IF EXISTS commerce CASCADE" -c "DROP SCHEMA IF EXISTS cutover CASCADE"
sql "$CUTOVER_SOURCE_DSN" -f examples/shop/legacy.sql

step "1. The old shop: $ORDERS orders with their lines, payments and invoices, plus users, merchants, products"
$CUTOVER workload --prefill --orders "$ORDERS" --seed 7
stack_roles acls  # the run's topic prefix (the secured stack grants only "shop" at start)

step "2. cutover init: preflight, publication without the social columns, slot, topics, commerce schema"
$CUTOVER init --target-ddl examples/shop/commerce.sql
apply_grants

step "3. The CDC producer (initial snapshot, then streaming) and two apply consumers (logs in $LOGS/)"
"${PRODUCER[@]}" $CUTOVER --log-json produce >"$LOGS/produce.log" 2>&1 & pids+=($!)
"${APPLIER[@]}" $CUTOVER --log-json apply >"$LOGS/apply-1.log" 2>&1 & pids+=($!)
"${APPLIER[@]}" $CUTOVER --log-json apply >"$LOGS/apply-2.log" 2>&1 & pids+=($!)
echo "producer pid ${pids[0]}, consumers ${pids[1]} ${pids[2]}"
# The web console (docs/CONSOLE.md) watches along: a one-off operator login for this run.
CONSOLE_PORT=${DEMO_CONSOLE_PORT:-$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
CONSOLE_PASSWORD=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(12))')
CUTOVER_CONSOLE_SECRET=$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')
export CUTOVER_CONSOLE_SECRET
sed "s#^file = \"mapping.toml\"#file = \"$PWD/examples/shop/mapping.toml\"#" "$CUTOVER_CONFIG" >"$LOGS/console.toml"
printf '[console.users.demo]\nrole = "operator"\npassword_hash = "%s"\n' \
  "$(printf '%s\n' "$CONSOLE_PASSWORD" | $CUTOVER console hash-password)" >>"$LOGS/console.toml"
"${SRE[@]}" $CUTOVER --config "$LOGS/console.toml" --log-json console --port "$CONSOLE_PORT" >"$LOGS/console.log" 2>&1 & pids+=($!)
echo "web console: http://127.0.0.1:$CONSOLE_PORT/ (user demo, password $CONSOLE_PASSWORD) while the demo runs"

step "4. The shop keeps selling: $RATE transactions/s for $DURATION s while the snapshot and stream run"
$CUTOVER workload --rate "$RATE" --duration "$DURATION" --seed 8

step "5. cutover verify: legacy mapped through the mapping vs commerce, row by row"
printf 'waiting for the initial snapshot to finish'
until [ "$(psql "$CUTOVER_SOURCE_DSN" -tAq -c "SELECT count(*) FROM cutover.snapshot_requests WHERE status IN ('pending', 'running')")" = 0 ]; do
  printf '.'; sleep 2
done
echo
for attempt in 1 2 3 4 5 6; do
  if "${SRE[@]}" $CUTOVER verify; then break; fi
  [ "$attempt" = 6 ] && { echo "verify failed"; exit 1; }
  echo "(consumers still catching up; verifying again)"; sleep 5
done

step "6. Switch reads, domain by domain, each through its gates"
for domain in data merchant payment; do
  "${SRE[@]}" $CUTOVER switch-reads "$domain" --dry-run || true
  "${SRE[@]}" $CUTOVER verify --domain "$domain" --no-progress >/dev/null
  "${SRE[@]}" $CUTOVER switch-reads "$domain" --yes
done

step "7. cutover status (reads on commerce)"
"${SRE[@]}" $CUTOVER status

step "8. The way back, prepared before any fence: reverse capture on commerce (slot, publication, topics), its producer and applier"
$CUTOVER init --reverse
apply_grants
"${PRODUCER[@]}" $CUTOVER --log-json produce --reverse >"$LOGS/produce-reverse.log" 2>&1 & pids+=($!)
"${REVERSE_APPLIER[@]}" $CUTOVER --log-json apply --reverse >"$LOGS/apply-reverse.log" 2>&1 & pids+=($!)
printf 'waiting for the reverse producer'"'"'s first heartbeat'
until [ -n "$(psql "$CUTOVER_TARGET_DSN" -tAq -c "SELECT 1 FROM cutover.producer_state WHERE slot_name = 'cutover_reverse_slot' AND heartbeat_at IS NOT NULL" 2>/dev/null)" ]; do
  printf '.'; sleep 1
done
echo

if [ -n "${DEMO_WRITE_WINDOW:-}" ]; then
  # `make bench-write-window`: every domain is in reads_switched and both pipelines run, which
  # is what bench.write_window needs; it switches and rolls back each domain DEMO_WRITE_WINDOW
  # times under the router workload and leaves them in reads_switched, so the demo goes on.
  step "8b. bench.write_window: the write-unavailability window, $DEMO_WRITE_WINDOW switches per domain"
  .venv/bin/python -m bench.write_window --repeats "$DEMO_WRITE_WINDOW" --rate "${DEMO_WRITE_RATE:-500}"
fi

step "9. Switch writes, domain by domain: fence legacy, drain up to the fence, final verify, open commerce"
for domain in data merchant payment; do
  "${SRE[@]}" $CUTOVER verify --domain "$domain" --no-progress >/dev/null
  "${SRE[@]}" $CUTOVER switch-writes "$domain" --dry-run || true
  "${SRE[@]}" $CUTOVER switch-writes "$domain" --yes
done

step "10. An application instance that missed the switch writes to legacy: the fence refuses it"
if sql "$CUTOVER_SOURCE_DSN" -c "UPDATE shop.orders SET status = 'paid' WHERE id = (SELECT min(id) FROM shop.orders)" 2>"$LOGS/stray.err"; then
  echo "the stray write went through: the fence is broken"; exit 1
fi
sed -n 1,2p "$LOGS/stray.err"

step "11. The shop now writes to commerce; reverse replication keeps legacy in sync for the rollback window"
sql "$CUTOVER_TARGET_DSN" -c "UPDATE commerce.sellers SET name = name || ' (renamed on commerce)' WHERE seller_id = (SELECT min(seller_id) FROM commerce.sellers)"
sleep 3
sql "$CUTOVER_SOURCE_DSN" -c "SELECT id, shop_name FROM shop.merchants ORDER BY id LIMIT 1"

step "12. Roll back the writes of merchant (fence commerce, drain the reverse stream, verify, reopen legacy), then switch them again"
"${SRE[@]}" $CUTOVER verify --domain merchant --no-progress >/dev/null
"${SRE[@]}" $CUTOVER rollback-writes merchant --yes
"${SRE[@]}" $CUTOVER verify --domain merchant --no-progress >/dev/null
"${SRE[@]}" $CUTOVER switch-writes merchant --yes

step "13. Complete every domain: the reverse stream stops, legacy's tables stay read-only; the last one drops the forward slot"
kill -TERM "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true  # the forward producer: its slot goes with the last domain
for domain in data merchant payment; do
  "${SRE[@]}" $CUTOVER verify --domain "$domain" --no-progress >/dev/null
  "${SRE[@]}" $CUTOVER complete "$domain" --yes
done

step "14. cutover status"
"${SRE[@]}" $CUTOVER status

step "15. The audit trail"
"${SRE[@]}" $CUTOVER audit

step "Done. Producers, consumers and the console are stopped; the stack keeps running (make down stops it)."
