#!/usr/bin/env bash
# Starts a private PostgreSQL 15 instance and a PgBouncer (pool_mode=transaction) in
# front of it, on free loopback ports, for tests and the demo.
#
#   tests/db/up.sh NAME    -> prints the path of an env file as the last line
#   tests/db/down.sh NAME  -> stops both and removes the state
#
# The env file defines DATABASE_URL (direct), REAPER_TEST_DATABASE_URL (direct),
# REAPER_TEST_PGBOUNCER_URL (through PgBouncer), REAPER_TEST_PGDATA and
# REAPER_TEST_PG_CTL (so tests can stop and restart the server), REAPER_TEST_PGBOUNCER_PID.
#
# REAPER_DB_PG_STAT_STATEMENTS=1 also preloads pg_stat_statements (off by default), so a
# benchmark can count the statements each database receives (benches/failover.rs
# `footprint`); the benchmark creates the extension itself.
set -euo pipefail

name=${1:?usage: tests/db/up.sh NAME}
root=${REAPER_DB_DIR:-/tmp/reaper-db}
dir=$root/$name
pgbin=${PG_BIN:-$(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}

die() { echo "tests/db/up.sh: $*" >&2; exit 1; }
[ -x "$pgbin/initdb" ] || die "PostgreSQL server binaries not found (set PG_BIN); on Debian: apt-get install postgresql"
command -v pgbouncer >/dev/null || die "pgbouncer not found; on Debian: apt-get install pgbouncer"
[ -e "$dir" ] && die "$dir exists: run tests/db/down.sh $name first"

# PostgreSQL and PgBouncer refuse to run as root.
as_db_user=()
if [ "$(id -u)" = 0 ]; then
  as_db_user=(runuser -u postgres --)
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

mkdir -p "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir" "$root"
user=reaper
password=reaper
pg_port=$(free_port)
bouncer_port=$(free_port)
while [ "$bouncer_port" = "$pg_port" ]; do bouncer_port=$(free_port); done

printf '%s\n' "$password" >"$dir/pwfile"
[ "$(id -u)" = 0 ] && chown postgres: "$dir/pwfile"
"${as_db_user[@]}" "$pgbin/initdb" -D "$dir/data" -U "$user" --pwfile="$dir/pwfile" \
  --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; die "initdb failed"; }

cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$dir'
max_connections = 300
shared_buffers = 128MB
log_min_messages = warning
CONF
if [ "${REAPER_DB_PG_STAT_STATEMENTS:-0}" = 1 ]; then
  cat >>"$dir/data/postgresql.conf" <<'CONF'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = top
pg_stat_statements.max = 1000
CONF
fi

"${as_db_user[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null \
  || { tail -n 30 "$dir/postgres.log" >&2; die "PostgreSQL did not start"; }

cat >"$dir/userlist.txt" <<LIST
"$user" "$password"
LIST
cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
server_reset_query =
# Recommended for a lease database (docs/operations.md): the default of 15 s refuses
# every client for 15 s after one failed server login, e.g. during a PostgreSQL restart.
server_login_retry = 1
ignore_startup_parameters = extra_float_digits,options
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
admin_users = $user
INI
[ "$(id -u)" = 0 ] && chown postgres: "$dir"/*
"${as_db_user[@]}" pgbouncer -d "$dir/pgbouncer.ini" \
  || { tail -n 30 "$dir/pgbouncer.log" >&2; die "PgBouncer did not start"; }

direct="postgres://$user:$password@127.0.0.1:$pg_port/postgres"
bounced="postgres://$user:$password@127.0.0.1:$bouncer_port/postgres"
for _ in $(seq 1 100); do
  if PGPASSWORD=$password "$pgbin/psql" -qAtX "$bounced" -c 'select 1' >/dev/null 2>&1; then
    break
  fi
  sleep 0.1
done
PGPASSWORD=$password "$pgbin/psql" -qAtX "$bounced" -c 'select 1' >/dev/null \
  || { tail -n 30 "$dir/pgbouncer.log" >&2; die "PgBouncer does not answer"; }

cat >"$dir/env" <<ENV
DATABASE_URL=$direct
REAPER_TEST_DATABASE_URL=$direct
REAPER_TEST_PGBOUNCER_URL=$bounced
REAPER_TEST_PGDATA=$dir/data
REAPER_TEST_PG_CTL=$pgbin/pg_ctl
REAPER_TEST_PG_RUN_AS=${as_db_user[*]:+postgres}
REAPER_TEST_PGBOUNCER_PID=$(cat "$dir/pgbouncer.pid")
ENV
echo "PostgreSQL on 127.0.0.1:$pg_port, PgBouncer (transaction mode) on 127.0.0.1:$bouncer_port" >&2
echo "$dir/env"
