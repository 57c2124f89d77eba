# `make demo` runs the operator locally; `make test` is the whole test suite (what CI runs).
export CARGO_TARGET_DIR ?= $(HOME)/.cache/reaper-operator/target

.PHONY: test demo chaos lint build bench bench-failover bench-footprint
test:
	scripts/test.sh

demo:
	scripts/demo.sh

# The chaos suite alone (short profile ~4 min, also part of `make test`;
# REAPER_CHAOS_SECONDS=1800 for the long one). Starts a database of its own.
chaos:
	scripts/chaos.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	shellcheck scripts/*.sh tests/db/*.sh $(wildcard tests/cluster/*.sh) tests/image/*.sh .ci/run
	shellcheck -x tests/e2e/lib/*.sh tests/e2e/kind/*.sh tests/e2e/kind/*/*.sh tests/e2e/kind/node-image/files/kind/bin/*.sh tests/e2e/local/*.sh tests/bench/*/*.sh
	scripts/lint-chart.sh

build:
	cargo build --locked --release

# Needs a running database: `set -a; . "$$(tests/db/up.sh bench | tail -n 1)"; set +a`
bench:
	cargo bench --locked --bench lease

# End-to-end benchmarks of the release binary on local control planes (docs/benchmarks.md).
# Database: `set -a; . "$$(REAPER_DB_PG_STAT_STATEMENTS=1 tests/db/up.sh bench | tail -n 1)"; set +a`
bench-failover:
	cargo bench --locked --bench failover -- failover --mode kill9 --trials 30 --write
	cargo bench --locked --bench failover -- failover --mode kill9 --trials 30 --ttl 3 --deadline 2 --retry 1 --write
	cargo bench --locked --bench failover -- failover --mode graceful --trials 30 --write

bench-footprint:
	cargo bench --locked --bench failover -- footprint --write
