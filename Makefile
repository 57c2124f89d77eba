# `make test` is the whole test suite (what CI runs). `make lint` is what CI checks first.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/reaper-operator/target

.PHONY: test lint build bench db-up
test:
	scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	shellcheck scripts/*.sh tests/db/*.sh $(wildcard tests/cluster/*.sh) .ci/run

build:
	cargo build --locked --release

# Needs a running database: `set -a; . "$$(tests/db/up.sh bench | tail -n 1)"; set +a`
bench:
	cargo bench --locked --bench lease
