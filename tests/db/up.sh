#!/usr/bin/env bash
# Starts a private PostgreSQL 15 instance and two PgBouncers in front of it, on free
# loopback ports, for tests and the demo: one with pool_mode=transaction (the setup
# docs/operations.md recommends for lease operations) and one with a stock configuration
# (session mode; nothing set but where to listen, whom to admit and where to log).
# Neither lists ignore_startup_parameters: the operator sends no startup parameter a
# default PgBouncer refuses.
#
#   tests/db/up.sh NAME    -> prints the path of an env file as the last line
#   tests/db/down.sh NAME  -> stops them all and removes the state
#
# The env file defines DATABASE_URL (direct), REAPER_TEST_DATABASE_URL (direct),
# REAPER_TEST_PGBOUNCER_URL (through the transaction-mode PgBouncer),
# REAPER_TEST_PGBOUNCER_SESSION_URL (through the stock one), REAPER_TEST_PGDATA and
# REAPER_TEST_PG_CTL (so tests can stop and restart the server), REAPER_TEST_PGBOUNCER_PID.
#
# REAPER_DB_TLS_DIR=DIR makes everything TLS-only. DIR holds ca.crt, server.crt and
# server.key (PEM; the certificate must name 127.0.0.1). PostgreSQL then runs with
# ssl=on, listens on 127.0.0.1 and 127.0.0.2, and its pg_hba.conf has only `hostssl`
# lines (password for user reaper, client certificate for user reaper_cert, a role it
# creates) and rejects every `hostnossl` connection. Both PgBouncers require TLS from
# clients (client_tls_sslmode=require, with the same certificate) and verify the server
# (server_tls_sslmode=verify-full). The URLs in the env file then carry
# sslmode=verify-full&sslrootcert=<ca.crt>, and the env file also defines
# REAPER_TEST_TLS_CA (that ca.crt) and REAPER_TEST_TLS_CERT_USER (reaper_cert).
#
# REAPER_DB_PG_STAT_STATEMENTS=1 also preloads pg_stat_statements (off by default), so a
# benchmark can count the statements each database receives (benches/failover.rs
# `footprint`); the benchmark creates the extension itself.
#
# REAPER_DB_STANDBY=sync|async makes it a pair: a primary and a streaming standby (a
# copy made by tests/db/standby.sh with pg_basebackup that follows the primary through a
# physical replication slot), so a test can lose the primary and go on with the standby,
# as often as it likes: tests/db/replication.sh NAME pause|resume|lag holds back or
# measures the WAL the standby gets, tests/db/failover.sh NAME kills the primary and
# promotes the standby, tests/db/standby.sh NAME then makes a new standby of it in the
# dead one's place. `sync` makes the primary wait for the standby at every commit
# (synchronous_standby_names = 'standby'), so no acknowledged commit is lost by a
# failover; `async` does not wait, so a failover loses what the standby had not received.
# A pair needs socat. Its addresses do not change with a failover, so what read the env
# file once follows the primary, as clients of a virtual IP or a Patroni HAProxy do:
#   DATABASE_URL, REAPER_TEST_DATABASE_URL  the primary address: a socat forwarder on a
#                                           port of its own that failover.sh points at
#                                           the new primary (connections it carried end)
#   REAPER_TEST_PGBOUNCER_URL,              the PgBouncers; they connect to the primary
#   REAPER_TEST_PGBOUNCER_SESSION_URL       itself, and failover.sh repoints them
#   REAPER_TEST_PGDATA                      $dir/primary, a symlink to the primary's data
#                                           directory: `pg_ctl -D` stops and starts the
#                                           current primary (its log goes where -l says)
# The env file also defines REAPER_TEST_STANDBY_MODE, REAPER_TEST_STANDBY_URL (the
# standby, directly) and REAPER_TEST_STANDBY_PGDATA ($dir/standby, a symlink); the two
# are empty from a failover until standby.sh. tests/db/lib.sh describes the directory.
# There is no direct URL of the primary: the forwarder adds a hop and nothing else. With
# REAPER_DB_TLS_DIR the standby replicates over TLS, and TLS goes through the forwarder.
# When the primary restarts (pg_ctl), the standby tries to stream again only
# wal_retrieve_retry_interval after it lost the primary (PostgreSQL's default of 5 s, as
# in production), and a sync primary holds every commit until then.
set -euo pipefail

name=${1:?usage: tests/db/up.sh NAME}
root=${REAPER_DB_DIR:-/tmp/reaper-db}
dir=$root/$name
here=$(dirname "$0")
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"

[ -x "$pgbin/initdb" ] || die "PostgreSQL server binaries not found (set PG_BIN); on Debian: apt-get install postgresql"
command -v pgbouncer >/dev/null || die "pgbouncer not found; on Debian: apt-get install pgbouncer"
[ -e "$dir" ] && die "$dir exists: run tests/db/down.sh $name first"
tls_src=${REAPER_DB_TLS_DIR:-}
if [ -n "$tls_src" ]; then
  for f in ca.crt server.crt server.key; do
    [ -r "$tls_src/$f" ] || die "REAPER_DB_TLS_DIR=$tls_src has no readable $f"
  done
fi
standby_mode=${REAPER_DB_STANDBY:-}
case "$standby_mode" in
  '' | sync | async) ;;
  *) die "REAPER_DB_STANDBY=$standby_mode: expected sync or async (or unset for no standby)" ;;
esac
if [ -n "$standby_mode" ]; then
  command -v socat >/dev/null || die "socat not found (a pair's primary address); on Debian: apt-get install socat"
fi

mkdir -p "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir" "$root"
user=reaper
password=reaper
read -r pg_port bouncer_port session_port standby_port forwarder_port <<<"$(free_ports 5)"
data=$dir/data
if [ -n "$standby_mode" ]; then
  data=$dir/node-a
  printf 'node-a %s\nnode-b %s\n' "$pg_port" "$standby_port" >"$dir/nodes"
else
  standby_port=
  forwarder_port=
fi

# PostgreSQL refuses a key file that others can read; the copies belong to the server.
tls=$dir/tls
if [ -n "$tls_src" ]; then
  mkdir -p "$tls"
  cp "$tls_src/ca.crt" "$tls_src/server.crt" "$tls_src/server.key" "$tls/"
  chmod 0600 "$tls/server.key"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$tls"
fi

printf '%s\n' "$password" >"$dir/pwfile"
[ "$(id -u)" = 0 ] && chown postgres: "$dir/pwfile"
"${as_db_user[@]}" "$pgbin/initdb" -D "$data" -U "$user" --pwfile="$dir/pwfile" \
  --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; die "initdb failed"; }

cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
max_connections = 300
shared_buffers = 128MB
log_min_messages = warning
CONF
if [ -n "$tls_src" ]; then
  # 127.0.0.2 too, so a test can reach the server under a name its certificate lacks.
  cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1, 127.0.0.2'
ssl = on
ssl_cert_file = '$tls/server.crt'
ssl_key_file = '$tls/server.key'
ssl_ca_file = '$tls/ca.crt'
CONF
  cat >"$data/pg_hba.conf" <<HBA
# TYPE    DATABASE USER        ADDRESS      METHOD
local     all      all                      trust
hostssl   all      reaper_cert 127.0.0.0/8  cert
hostssl   all      all         127.0.0.0/8  scram-sha-256
hostnossl all      all         0.0.0.0/0    reject
hostnossl all      all         ::/0         reject
HBA
  # `all` does not cover replication connections; initdb's own file admits them from
  # 127.0.0.1, this one must say so itself.
  if [ -n "$standby_mode" ]; then
    echo "hostssl   replication reaper   127.0.0.0/8  scram-sha-256" >>"$data/pg_hba.conf"
  fi
fi
if [ "${REAPER_DB_PG_STAT_STATEMENTS:-0}" = 1 ]; then
  cat >>"$data/postgresql.conf" <<'CONF'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = top
pg_stat_statements.max = 1000
CONF
fi

if [ -n "$standby_mode" ]; then
  # Last, so it has the last word; relative, so the copy in a standby includes the
  # standby's own.
  echo "include = 'node.conf'" >>"$data/postgresql.conf"
  write_node_conf node-a "$pg_port" ''
  ln -s node-a "$dir/primary"
  pg_log=$dir/node-a.log
else
  echo "port = $pg_port" >>"$data/postgresql.conf"
  pg_log=$dir/postgres.log
fi
"${as_db_user[@]}" "$pgbin/pg_ctl" -D "$data" -l "$pg_log" -w -t 60 start >/dev/null \
  || { tail -n 30 "$pg_log" >&2; die "PostgreSQL did not start"; }

if [ -n "$tls_src" ]; then
  "${as_db_user[@]}" "$pgbin/psql" -qAtX -h "$dir" -p "$pg_port" -U "$user" -d postgres \
    -c 'CREATE ROLE reaper_cert LOGIN' -c 'GRANT CREATE ON DATABASE postgres TO reaper_cert' \
    >/dev/null || die "cannot create the role reaper_cert"
fi

query=
if [ -n "$tls_src" ]; then
  query="?sslmode=verify-full&sslrootcert=$tls/ca.crt"
fi

cat >"$dir/userlist.txt" <<LIST
"$user" "$password"
LIST

# pgbouncer_ini PORT NAME: the settings every PgBouncer here shares. With a standby they
# go to the primary address (the forwarder), as they would to a virtual IP or a Service:
# a failover needs no change to them. (Repointing `*` and RELOADing is not enough: the
# pools PgBouncer made from `*` keep the old address while any client stays connected.)
pgbouncer_ini() {
  cat <<INI
[databases]
* = host=127.0.0.1 port=${forwarder_port:-$pg_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $1
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
logfile = $dir/$2.log
pidfile = $dir/$2.pid
admin_users = $user
INI
  if [ -n "$tls_src" ]; then
    cat <<INI
client_tls_sslmode = require
client_tls_cert_file = $tls/server.crt
client_tls_key_file = $tls/server.key
client_tls_ca_file = $tls/ca.crt
server_tls_sslmode = verify-full
server_tls_ca_file = $tls/ca.crt
INI
  fi
}

{
  pgbouncer_ini "$bouncer_port" pgbouncer
  cat <<'INI'
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
server_reset_query =
# Recommended for a lease database (docs/operations.md): the default of 15 s refuses
# every client for 15 s after one failed server login, e.g. during a PostgreSQL restart.
server_login_retry = 1
INI
} >"$dir/pgbouncer.ini"
pgbouncer_ini "$session_port" pgbouncer-session >"$dir/pgbouncer-session.ini"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"/*
for ini in pgbouncer pgbouncer-session; do
  "${as_db_user[@]}" pgbouncer -d "$dir/$ini.ini" \
    || { tail -n 30 "$dir/$ini.log" >&2; die "PgBouncer ($ini.ini) did not start"; }
done

direct="postgres://$user:$password@127.0.0.1:$pg_port/postgres$query"
if [ -n "$standby_mode" ]; then
  start_forwarder "$forwarder_port" "$pg_port"
  direct="postgres://$user:$password@127.0.0.1:$forwarder_port/postgres$query"
fi
bounced="postgres://$user:$password@127.0.0.1:$bouncer_port/postgres$query"
session="postgres://$user:$password@127.0.0.1:$session_port/postgres$query"
for url in "$bounced" "$session" ${standby_mode:+"$direct"}; do
  for _ in $(seq 1 100); do
    if PGPASSWORD=$password "$pgbin/psql" -qAtX "$url" -c 'select 1' >/dev/null 2>&1; then
      break
    fi
    sleep 0.1
  done
  PGPASSWORD=$password "$pgbin/psql" -qAtX "$url" -c 'select 1' >/dev/null \
    || { tail -n 30 "$dir"/pgbouncer*.log "$dir"/forwarder.log 2>/dev/null >&2; die "$url does not answer"; }
done

pgdata=$data
[ -n "$standby_mode" ] && pgdata=$dir/primary
# Quoted: a TLS URL has '&' in it.
cat >"$dir/env" <<ENV
DATABASE_URL='$direct'
REAPER_TEST_DATABASE_URL='$direct'
REAPER_TEST_PGBOUNCER_URL='$bounced'
REAPER_TEST_PGBOUNCER_SESSION_URL='$session'
REAPER_TEST_PGDATA=$pgdata
REAPER_TEST_PG_CTL=$pgbin/pg_ctl
REAPER_TEST_PG_RUN_AS=${as_db_user[*]:+postgres}
REAPER_TEST_PGBOUNCER_PID=$(cat "$dir/pgbouncer.pid")
ENV
if [ -n "$tls_src" ]; then
  cat >>"$dir/env" <<ENV
REAPER_TEST_TLS_CA=$tls/ca.crt
REAPER_TEST_TLS_CERT_USER=reaper_cert
ENV
fi
if [ -n "$standby_mode" ]; then
  # standby.sh fills in the other two once the standby streams.
  cat >>"$dir/env" <<ENV
REAPER_TEST_STANDBY_MODE=$standby_mode
REAPER_TEST_STANDBY_URL=
REAPER_TEST_STANDBY_PGDATA=
ENV
  "$here/standby.sh" "$name" >/dev/null
fi
summary="PostgreSQL on 127.0.0.1:$pg_port, PgBouncer (transaction mode) on 127.0.0.1:$bouncer_port,"
summary="$summary PgBouncer (stock, session mode) on 127.0.0.1:$session_port"
if [ -n "$standby_mode" ]; then
  summary="$summary, $standby_mode standby on 127.0.0.1:$standby_port, the primary address on 127.0.0.1:$forwarder_port"
fi
echo "$summary${tls_src:+, TLS only}" >&2
echo "$dir/env"
