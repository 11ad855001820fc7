# The two commands a fresh machine needs: `make demo` and `make test`. Every set-up step lives here.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test-rocketmq demo demo-rocketmq test lint services services-core install clean bench bench-quick chaos cluster cluster-stop rocketmq rocketmq-stop

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Start any local service that does not answer (commands from the machine's env page).
# The RocketMQ test server too (rocketmq://127.0.0.1:18081?namesrv=127.0.0.1:19876, ~7 s to start,
# ~570 MiB, ~5 % of a core idle): `zeroloss demo --target rocketmq://...` works after this alone.
services: services-core
	$(BIN)/python -m tests.rocketmq_server start

# The services without the RocketMQ server (what the benchmarks use).
services-core: install
	bash scripts/services.sh

demo: install
	$(BIN)/zeroloss demo

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	$(BIN)/mypy tests bench examples

# Three workers; the tests of each fixed-port server (Kafka cluster, RocketMQ) run on one worker
# (tests/conftest.py). Ends with bench-quick (about 2 minutes) so the benchmarks cannot rot unnoticed; it checks they run, not speed.
test: install services lint
	$(BIN)/pytest -q -n 3 --dist loadgroup
	$(MAKE) bench-quick

# Only the RocketMQ tests (the server is started if it is down).
test-rocketmq: install services
	$(BIN)/pytest -q -m rocketmq

# Every fault-injection scenario at full size (the cluster-* ones on the three-broker Kafka cluster,
# started if it is not up); prints the table, writes bench/results/chaos.md; then every crash-test
# variant (make test runs a subset to stay under 20 minutes).
chaos: install services
	$(BIN)/python -m tests.chaos
	ZEROLOSS_CRASH_MATRIX=full $(BIN)/pytest -q tests/crash/test_relay_crash.py tests/crash/test_brokers_crash.py \
	  tests/test_half_messages.py tests/test_rocketmq_server.py tests/test_rocketmq_new_group.py \
	  tests/test_rocketmq_hung_broker.py tests/test_rocketmq_acl.py
	ZEROLOSS_CRASH_MATRIX=full $(BIN)/pytest -q tests/crash/test_subscription_crash.py -k rocketmq

# Benchmarks print zeroloss's figure, a baseline measured in the same run, the ratio, the issue's
# target and met?; then every row again in one table (bench.summary). The output goes to
# bench/results/latest.md (generated; notes.md keeps the hand-written notes). The cluster rows
# run last: bench.cluster --start starts the three-broker cluster if it is down and stops it after,
# so the other rows do not share the 2 cores with three idle JVMs. The RocketMQ server is not
# needed (services-core). A script that fails is listed (FAILED) and fails the target.
BENCH_SCRIPTS := relay_throughput cli_relay enqueue consumer latency scale_out growth pg_hot_path pg_claim
bench: install services-core
	mkdir -p bench/results
	rows=$$(mktemp) && export ZEROLOSS_BENCH_ROWS=$$rows && \
	  { for m in $(BENCH_SCRIPTS); do $(BIN)/python -m bench.$$m || echo "FAILED: bench.$$m exited $$?"; done; \
	    $(BIN)/python -m bench.cluster --start || echo "FAILED: bench.cluster exited $$?"; \
	    $(BIN)/python -m bench.summary $$rows; } | tee bench/results/latest.md; rm -f $$rows
	! grep -q '^FAILED' bench/results/latest.md

# Small counts, to keep every benchmark script (and its rows) from rotting; not a pass/fail on speed.
bench-quick: install services
	rows=$$(mktemp) && export ZEROLOSS_BENCH_ROWS=$$rows && \
	  $(BIN)/python -m bench.relay_throughput --messages 2000 --reps 1 && \
	  $(BIN)/python -m bench.cli_relay --messages 1000 --keys 100,0 --reps 1 && \
	  $(BIN)/python -m bench.cluster --messages 1000 --keys 100 --reps 1 && \
	  $(BIN)/python -m bench.enqueue --txns 100 --reps 1 && \
	  $(BIN)/python -m bench.consumer --messages 2000 --reps 1 && \
	  $(BIN)/python -m bench.latency --rates 200,500 --seconds 2 && \
	  $(BIN)/python -m bench.scale_out --messages 2000 --relays 1,2 --reps 1 && \
	  $(BIN)/python -m bench.growth --messages 1000 --small-history 0 --large-history 20000 \
	    --small-pending 1000 --large-pending 5000 --reps 1 && \
	  $(BIN)/python -m bench.pg_hot_path --messages 2000 --batch 500 --pairs 1 && \
	  $(BIN)/python -m bench.pg_claim --messages 2000 --batch 500 && \
	  $(BIN)/python -m bench.summary $$rows; st=$$?; rm -f $$rows; exit $$st

# Three Apache Kafka brokers (KRaft) on 127.0.0.1:19092-19094 for fault tests; jars fetched once by Maven.
# Tests reuse it when up (fixture kafka_cluster). `make cluster-stop WIPE=1` also deletes its data.
cluster: install
	$(BIN)/python -m tests.kafka_cluster start

cluster-stop: install
	$(BIN)/python -m tests.kafka_cluster stop $(if $(WIPE),--wipe)

# Apache RocketMQ 5: a name server on 127.0.0.1:19876 and a broker (10911) with its gRPC proxy on
# 127.0.0.1:18081 in the same JVM (rocketmq://127.0.0.1:18081), SYNC_FLUSH; jars fetched once by Maven.
# Tests reuse it when up (fixture rocketmq). `make rocketmq-stop WIPE=1` also deletes its data.
rocketmq: install
	$(BIN)/python -m tests.rocketmq_server start

# The demo on that server (started if down): outbox -> relay (SIGKILLed once) -> RocketMQ -> consumer.
demo-rocketmq: rocketmq
	$(BIN)/zeroloss demo --target "$$($(BIN)/python -c 'from tests.rocketmq_server import RocketMQServer; print(RocketMQServer().zeroloss_url)')"

rocketmq-stop: install
	$(BIN)/python -m tests.rocketmq_server stop $(if $(WIPE),--wipe)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
