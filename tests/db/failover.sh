#!/usr/bin/env bash
# Fails a database started with REAPER_DB_STANDBY=sync|async tests/db/up.sh NAME over to
# its standby, the way a primary that dies takes its clients with it: no shutdown, no
# last words.
#
#   tests/db/failover.sh NAME  -> prints the new primary's direct URL as the last line
#
# 1. Every process of the primary is stopped, then killed (SIGKILL), its walsenders
#    first: a walsender that tests/db/replication.sh paused must not send the standby
#    what it held back, or an async failover would lose nothing.
# 2. The standby is promoted (pg_ctl promote -w): it is a primary on a new timeline.
# 3. Both PgBouncers get the standby's port in their [databases] line and RELOAD it on
#    their admin console. A changed host or port is enough for PgBouncer to close the
#    server connections made under the old line as they are released (its docs for
#    RECONNECT: "not necessary ... when the connection string in pgbouncer.ini has been
#    changed and reloaded"), and the ones to the dead primary are closed already.
# 4. It returns once both PgBouncer URLs answer from the new primary, so what runs next
#    finds the database usable, and tells stderr how long each step took.
#
# The env file's DATABASE_URL, REAPER_TEST_DATABASE_URL and REAPER_TEST_PGDATA then name
# the new primary; its other lines stay. The old primary stays dead and is not made a
# standby again, so a second failover is refused. tests/db/down.sh stops what is left.
set -euo pipefail

name=${1:?usage: tests/db/failover.sh NAME}
dir=${REAPER_DB_DIR:-/tmp/reaper-db}/$name
pgbin=${PG_BIN:-$(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}

die() { echo "tests/db/failover.sh: $*" >&2; exit 1; }
[ -d "$dir" ] || die "$dir does not exist: start it with REAPER_DB_STANDBY=sync|async tests/db/up.sh $name"
[ -d "$dir/standby" ] || die "$name has no standby: start it with REAPER_DB_STANDBY=sync|async tests/db/up.sh $name"
[ -e "$dir/failed-over" ] \
  && die "$name has failed over already; its standby is the primary now and no standby is left (start a new one with tests/db/down.sh $name and up.sh)"
[ -f "$dir/standby/postmaster.pid" ] || die "the standby of $name is not running: there is nothing to fail over to"

# shellcheck source=/dev/null
. "$dir/env"
port_of() { local rest=${1#*@127.0.0.1:}; echo "${rest%%/*}"; }
pg_port=$(port_of "$REAPER_TEST_DATABASE_URL")
standby_port=$(port_of "$REAPER_TEST_STANDBY_URL")
tls_query=
if [ -n "${REAPER_TEST_TLS_CA:-}" ]; then
  tls_query="?sslmode=verify-full&sslrootcert=$REAPER_TEST_TLS_CA"
fi

as_db_user=()
if [ "$(id -u)" = 0 ]; then
  as_db_user=(runuser -u postgres --)
fi

# Checked before anything is killed: a failover that stops half-way leaves no database.
in_recovery=$("${as_db_user[@]}" "$pgbin/psql" -qAtX -h "$dir" -p "$standby_port" -U reaper -d postgres \
  -c 'select pg_is_in_recovery()') || die "the standby of $name does not answer on port $standby_port"
[ "$in_recovery" = t ] || die "the standby of $name on port $standby_port is not in recovery: nothing to promote"
for ini in pgbouncer pgbouncer-session; do
  grep -qx "\* = host=127\.0\.0\.1 port=$pg_port" "$dir/$ini.ini" \
    || die "$dir/$ini.ini has no line '* = host=127.0.0.1 port=$pg_port' to point at the standby"
done

# The processes of an instance are the postgres processes whose working directory is its
# data directory (PostgreSQL changes into it): that finds children the dead postmaster left
# behind, and never a process that merely reuses a pid from a stale postmaster.pid.
data=$(cd "$dir/data" && pwd -P)
pattern=$(printf '%s' "$data" | sed 's/[][*?\\]/\\&/g')
instance_pids() {
  for pid in $(find /proc/[0-9]*/cwd -maxdepth 0 -lname "$pattern" 2>/dev/null | cut -d/ -f3); do
    comm=
    read -r comm <"/proc/$pid/comm" 2>/dev/null || true
    [ "$comm" = postgres ] && echo "$pid"
  done
  return 0
}

now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; now=$((t / 1000)); }
now_ms
t_kill=$now

pids=$(instance_pids)
postmaster=$(sed -n 1p "$dir/data/postmaster.pid" 2>/dev/null || true)
# Frozen first, the postmaster before its children, so none of them can react to the
# others' deaths (a postmaster restarts after a crash, a walsender sends).
for pid in $postmaster $pids; do
  case " $pids " in *" $pid "*) kill -STOP "$pid" 2>/dev/null || true ;; esac
done
walsenders=()
for pid in $pids; do
  title=
  IFS= read -r -d '' title <"/proc/$pid/cmdline" 2>/dev/null || true
  case "$title" in "postgres: walsender"*) walsenders+=("$pid") ;; esac
done
for pid in "${walsenders[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
for _ in $(seq 1 500); do
  pids=$(instance_pids)
  [ -z "$pids" ] && break
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  sleep 0.01
done
[ -z "$(instance_pids)" ] || die "processes of the primary are still alive after SIGKILL: $(instance_pids | paste -sd ' ')"
rm -f "$dir/replication.paused"
now_ms
t_killed=$now

for _ in $(seq 1 1000); do
  (: <>"/dev/tcp/127.0.0.1/$pg_port") 2>/dev/null || break
  sleep 0.01
done
(: <>"/dev/tcp/127.0.0.1/$pg_port") 2>/dev/null && die "port $pg_port still accepts connections after the primary was killed"
now_ms
t_port=$now

"${as_db_user[@]}" "$pgbin/pg_ctl" -D "$dir/standby" -w -t 60 promote >/dev/null \
  || { tail -n 30 "$dir/standby.log" >&2; die "the standby was not promoted"; }
now_ms
t_promoted=$now

for ini in pgbouncer pgbouncer-session; do
  # Rewritten in place: the file keeps its owner, the user PgBouncer runs as.
  new=$(sed "s/^\* = host=127\.0\.0\.1 port=$pg_port\$/* = host=127.0.0.1 port=$standby_port/" "$dir/$ini.ini")
  printf '%s\n' "$new" >"$dir/$ini.ini"
  admin_port=$(sed -n 's/^listen_port = //p' "$dir/$ini.ini")
  PGPASSWORD=reaper "$pgbin/psql" -qAtX "postgres://reaper@127.0.0.1:$admin_port/pgbouncer$tls_query" \
    -c 'RELOAD' >/dev/null || die "RELOAD on the admin console of $ini (port $admin_port) failed"
done
now_ms
t_reloaded=$now

# A client that tried a PgBouncer while no server answered makes it hold every client
# back for server_login_retry (1 s in the transaction-mode one, the default 15 s in the
# stock one), hence the 30 s and a time for each.
answered=()
for url in "$REAPER_TEST_PGBOUNCER_URL" "$REAPER_TEST_PGBOUNCER_SESSION_URL"; do
  answer=
  for _ in $(seq 1 600); do
    answer=$(PGPASSWORD=reaper "$pgbin/psql" -qAtX "$url" \
      -c 'select inet_server_port(), pg_is_in_recovery()' 2>/dev/null) || true
    [ "$answer" = "$standby_port|f" ] && break
    sleep 0.05
  done
  [ "$answer" = "$standby_port|f" ] \
    || die "PgBouncer $(port_of "$url") does not answer from the new primary after 30 s (last answer: '${answer:-none}')"
  now_ms
  answered+=("$((now - t_kill))")
done

new_url=$REAPER_TEST_STANDBY_URL
while IFS= read -r line; do
  case "$line" in
    DATABASE_URL=*) echo "DATABASE_URL='$new_url'" ;;
    REAPER_TEST_DATABASE_URL=*) echo "REAPER_TEST_DATABASE_URL='$new_url'" ;;
    REAPER_TEST_PGDATA=*) echo "REAPER_TEST_PGDATA=$dir/standby" ;;
    *) printf '%s\n' "$line" ;;
  esac
done <"$dir/env" >"$dir/env.new"
mv "$dir/env.new" "$dir/env"
echo "primary on port $pg_port killed at $(date -u +%FT%TZ), standby on port $standby_port promoted" >"$dir/failed-over"

echo "tests/db/failover.sh: $name: primary killed in $((t_killed - t_kill)) ms, its port free" \
  "$((t_port - t_killed)) ms later, standby promoted in $((t_promoted - t_port)) ms," \
  "PgBouncers reloaded in $((t_reloaded - t_promoted)) ms; from the kill to an answer from the" \
  "new primary ${answered[0]} ms through the transaction-mode PgBouncer, ${answered[1]} ms through" \
  "the session-mode one" >&2
echo "$new_url"
