#!/usr/bin/env bash
# Stops what tests/db/up.sh NAME started (PostgreSQL and its PgBouncers) and removes
# its state.
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
if [ -f "$dir/data/postmaster.pid" ]; then
  "${as_db_user[@]}" "$pgbin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
fi
rm -rf "$dir"
