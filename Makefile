# `make demo` runs the operator locally; `make test` is the whole test suite (what CI runs).
export CARGO_TARGET_DIR ?= $(HOME)/.cache/reaper-operator/target

.PHONY: test demo chaos lint build bench
test:
	scripts/test.sh

demo:
	scripts/demo.sh

# The chaos suite alone (short profile ~3 min, also part of `make test`;
# REAPER_CHAOS_SECONDS=1800 for the long one). Starts a database of its own.
chaos:
	scripts/chaos.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	shellcheck scripts/*.sh tests/db/*.sh $(wildcard tests/cluster/*.sh) .ci/run
	shellcheck -x tests/e2e/lib/*.sh tests/e2e/kind/*.sh tests/e2e/local/*.sh tests/bench/*/*.sh

build:
	cargo build --locked --release

# Needs a running database: `set -a; . "$$(tests/db/up.sh bench | tail -n 1)"; set +a`
bench:
	cargo bench --locked --bench lease
