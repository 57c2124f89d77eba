#!/usr/bin/env bash
# Stops what tests/db/up.sh NAME started (PostgreSQL, the other server of a pair and its
# forwarder, the PgBouncers) and removes its state. Also after tests/db/replication.sh
# paused the standby's walsender and after tests/db/failover.sh killed the primary.
set -euo pipefail

name=${1:?usage: tests/db/down.sh NAME}
dir=${REAPER_DB_DIR:-/tmp/reaper-db}/$name
[ -d "$dir" ] || exit 0
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/lib.sh"

stop_forwarder
for pidfile in "$dir"/pgbouncer*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done

# Every data directory, not the links to them: what a killed postmaster left behind is
# found by its working directory.
for data in "$dir"/*/; do
  data=${data%/}
  [ -L "$data" ] || [ ! -f "$data/PG_VERSION" ] && continue
  pids=$(instance_pids "$data")
  [ -n "$pids" ] || continue
  # A stopped walsender would hold up an immediate shutdown until PostgreSQL gives up
  # waiting for it.
  for pid in $pids; do kill -CONT "$pid" 2>/dev/null || true; done
  "${as_db_user[@]}" "$pgbin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  kill_instance "$data" 100 0.05
done
rm -rf "$dir"
