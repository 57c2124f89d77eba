#!/usr/bin/env bash
# The whole test suite: starts a private PostgreSQL + PgBouncer (transaction mode),
# makes sure the local control-plane binaries are built (cached outside the clone), runs
# every Rust test, then the local failover checks and the chaos suite's short profile,
# and stops what it started. Extra arguments go to `cargo test` (and skip the last two).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/reaper-operator/target}
if [ "$(id -u)" = 0 ]; then
  scripts/deps.sh --image --node
else
  scripts/deps.sh
fi
db_name="test-$$"

cleanup() { tests/db/down.sh "$db_name" || true; }
trap cleanup EXIT INT TERM

env_file=$(tests/db/up.sh "$db_name" | tail -n 1)
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a

if [ -x tests/cluster/build.sh ]; then
  tests/cluster/build.sh >/dev/null
fi

# The shipped image, built from the Dockerfile with podman and checked (non-root,
# read-only root, no shell, size), before the tests: tests/real_node.rs installs the
# chart with it on a real node. Rootful podman: root only.
if [ $# -eq 0 ]; then
  echo "--- operator image (tests/image/build.sh)"
  if [ "$(id -u)" = 0 ]; then
    export REAPER_TEST_IMAGE_ARCHIVE=${REAPER_TEST_IMAGE_ARCHIVE:-$HOME/.cache/reaper-operator/images/reaper-operator-test.tar}
    REAPER_IMAGE_ARCHIVE=$REAPER_TEST_IMAGE_ARCHIVE tests/image/build.sh >/dev/null
  elif [ "${CI:-}" = true ]; then
    echo "the image check needs root (rootful podman); CI must run as root" >&2
    exit 1
  else
    echo "skipped: building the image needs root (rootful podman)"
  fi
fi

cargo test --locked "$@"

# The failover scenarios of the kind kit, run with the same checker against two local
# control planes (uses the operator binary cargo test just built).
if [ $# -eq 0 ]; then
  echo "--- failover scenarios on local control planes (tests/e2e/local/check.sh)"
  tests/e2e/local/check.sh
  # Random faults for 150 s against two clusters of two replicas each: "at most one
  # reaper" and convergence (docs/chaos.md). Uses a database of its own.
  echo "--- chaos suite, short profile (scripts/chaos.sh)"
  scripts/chaos.sh
fi
