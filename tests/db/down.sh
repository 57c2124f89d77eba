#!/usr/bin/env bash
# Stops what tests/db/up.sh NAME started (PostgreSQL, its standby if any, and its
# PgBouncers) and removes its state. Also after tests/db/replication.sh paused the
# standby's walsender and after tests/db/failover.sh killed the primary.
set -euo pipefail

name=${1:?usage: tests/db/down.sh NAME}
dir=${REAPER_DB_DIR:-/tmp/reaper-db}/$name
pgbin=${PG_BIN:-$(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
[ -d "$dir" ] || exit 0

as_db_user=()
if [ "$(id -u)" = 0 ]; then
  as_db_user=(runuser -u postgres --)
fi

for pidfile in "$dir"/pgbouncer*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done

# The processes of an instance are the postgres processes whose working directory is its
# data directory: that finds what a killed postmaster left behind, and never a process
# that merely reuses a pid from a stale postmaster.pid.
instance_pids() {
  local pattern
  pattern=$(printf '%s' "$1" | sed 's/[][*?\\]/\\&/g')
  for pid in $(find /proc/[0-9]*/cwd -maxdepth 0 -lname "$pattern" 2>/dev/null | cut -d/ -f3); do
    comm=
    read -r comm <"/proc/$pid/comm" 2>/dev/null || true
    [ "$comm" = postgres ] && echo "$pid"
  done
  return 0
}

for data in "$dir/data" "$dir/standby"; do
  [ -d "$data" ] || continue
  data=$(cd "$data" && pwd -P)
  pids=$(instance_pids "$data")
  [ -n "$pids" ] || continue
  # A stopped walsender would hold up an immediate shutdown until PostgreSQL gives up
  # waiting for it.
  for pid in $pids; do kill -CONT "$pid" 2>/dev/null || true; done
  "${as_db_user[@]}" "$pgbin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do
    pids=$(instance_pids "$data")
    [ -z "$pids" ] && break
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.05
  done
done
rm -rf "$dir"
