# kafka-cutover: the two commands are `make demo` and `make test`; each does its own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUTOVER := $(VENV)/bin/cutover
STACK_ENV := .stack/env
PY_DIRS := cutover producers consumers schemas control cli console devtools tests bench
# Export the local stack's CUTOVER_* variables to every recipe that needs them.
WITH_ENV = set -a && . ./$(STACK_ENV) && set +a &&

.PHONY: help venv up down status test test-durations unit integration lint demo bench bench-vs-debezium bench-write-window clean

help:
	@echo "make demo    stack up, load the reference shop, prefill, a short workload, a summary"
	@echo "make test    stack up, lint (ruff, mypy strict), unit + integration tests"
	@echo "make up      start Kafka (KRaft) + legacy and commerce PostgreSQL 15 on 127.0.0.1"
	@echo "             (BROKERS=3: a three-node Kafka cluster, replication factor 3)"
	@echo "             (REGISTRY=1: and a Confluent-compatible schema registry, Apicurio)"
	@echo "             (SECURE=1: PostgreSQL over TLS only, DSNs with sslmode=verify-full;"
	@echo "             Kafka over TLS + SASL/SCRAM with per-component users and ACLs)"
	@echo "             (PROMETHEUS=1: and Prometheus scraping produce/apply, ops/ alert rules)"
	@echo "make down    stop everything 'make up' started"
	@echo "make bench   run the benchmarks under bench/ (figures in bench/results/)"
	@echo "make bench-vs-debezium [N=1000000]   cutover produce vs Debezium, same WAL backlog"
	@echo "make bench-write-window [REPEATS=5]  switch-writes/rollback-writes window under the router workload"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# BROKERS=3: a three-node KRaft cluster (devtools/kafka_cluster.py). Unset: the stack keeps its
# size (one node for a new stack); `make down` stops every node. SECURE=1: TLS, SASL/SCRAM and
# ACLs (devtools/kafka_security.py); unset, a stack keeps its mode (plaintext for a new one).
BROKERS ?=
up: venv
	$(PY) -m devtools.stack up $(if $(BROKERS),--brokers $(BROKERS)) $(if $(REGISTRY),--registry) $(if $(SECURE),--secure) $(if $(PROMETHEUS),--prometheus)

down:
	@if [ -x $(PY) ]; then $(PY) -m devtools.stack down; else echo "nothing to stop"; fi

status: venv
	$(PY) -m devtools.stack status

lint: venv
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest tests/unit -q

integration: up
	$(WITH_ENV) $(VENV)/bin/pytest tests/integration -q

# The registry tests need the schema registry: `make test` starts it (built once, ~18 s).
# Most tests wait on Kafka and PostgreSQL, so TEST_WORKERS pytest-xdist workers share the stack
# (each test has its own databases, topics, slots, groups). --dist loadgroup keeps an
# xdist_group on one worker (tests/conftest.py), which hands the groups out longest first by
# tests/durations.json (refresh it with `make test-durations` after a run). The `serial` tests
# stop a server of the shared stack, so they run alone afterwards; both runs always run, either
# failing fails.
TEST_WORKERS ?= 2
test: REGISTRY := 1
test: up lint
	$(WITH_ENV) rc=0; \
	$(VENV)/bin/pytest tests -q -m "not quarantine and not serial" \
	  -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=30 \
	  --junitxml=.stack/junit.xml $(PYTEST_ARGS) || rc=$$?; \
	$(VENV)/bin/pytest tests -q -m "serial and not quarantine" $(PYTEST_ARGS) || rc=$$?; \
	exit $$rc

# tests/durations.json from the last `make test` (.stack/junit.xml): commit it when it moved.
test-durations: venv
	$(PY) -m devtools.test_durations

demo: up
	$(WITH_ENV) bash examples/shop/demo.sh

# All of the design's §9 benchmarks, one after the other (about 30 minutes); each writes
# bench/results/<name>.json, then bench/report.py writes bench/results/summary.md. The registry's
# cost (producer and end to end, registry on vs off) needs the stack's schema registry.
bench: REGISTRY := 1
bench: up
	$(WITH_ENV) $(PY) -m bench.workload_rate
	$(WITH_ENV) $(PY) -m bench.producer_throughput
	$(WITH_ENV) $(PY) -m bench.apply_throughput
	$(WITH_ENV) $(PY) -m bench.e2e_throughput
	$(WITH_ENV) $(PY) -m bench.cdc_latency
	$(WITH_ENV) $(PY) -m bench.verify_throughput
	$(WITH_ENV) $(PY) -m bench.replay_throughput
	$(WITH_ENV) $(PY) -m bench.registry_overhead
	$(PY) -m bench.decode_cost
	$(PY) -m bench.report

# cutover produce against Debezium 3.6.1 (Kafka Connect 4.1.1, jars fetched with Maven on first
# use): N synthetic changes (default 1,000,000); not part of `make bench` nor `make test`.
N ?= 1000000
# The demo's deployment up to reads_switched with both pipelines, then bench.write_window
# (bench/results/write_window.json), then the rest of the demo. ~10 minutes.
REPEATS ?= 5
bench-write-window: up
	$(WITH_ENV) DEMO_ORDERS=$${DEMO_ORDERS:-10000} DEMO_WRITE_WINDOW=$(REPEATS) bash examples/shop/demo.sh

bench-vs-debezium: up
	$(WITH_ENV) $(PY) -m bench.vs_debezium $(N)

clean: down
	rm -rf .stack
