#!/usr/bin/env bash
# The chaos suite (tests/chaos.rs, docs/chaos.md) against a private PostgreSQL pair + PgBouncer
# of its own: the suite stops and restarts the database it is given, so it never gets
# the one other tests use. Extra arguments go to the test binary.
#
#   scripts/chaos.sh                            # short profile (150 s of faults, and at
#                                               # least one round of every kind)
#   REAPER_CHAOS_SECONDS=1800 scripts/chaos.sh  # long profile
#   REAPER_CHAOS_SEED=<seed> scripts/chaos.sh   # replay a run
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/reaper-operator/target}
db_name="chaos-$$"

cleanup() { tests/db/down.sh "$db_name" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM

# A primary with a synchronous standby: the `postgres-failover` fault promotes it (and
# makes a new one); every URL goes to whichever server is the primary.
env_file=$(REAPER_DB_STANDBY=sync tests/db/up.sh "$db_name" | tail -n 1)
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a

cargo test --locked --test chaos -- --ignored --nocapture "$@"
