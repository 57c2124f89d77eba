#!/usr/bin/env bash
# Fails a pair (REAPER_DB_STANDBY=sync|async tests/db/up.sh NAME) over to its standby,
# the way a primary that dies takes its clients with it: no shutdown, no last words.
#
#   tests/db/failover.sh NAME  -> prints the primary address (the forwarder's URL, the
#                                 same as before) as the last line
#
# 1. Every process of the primary is stopped, then killed (SIGKILL), its walsenders
#    first: a walsender that tests/db/replication.sh paused must not send the standby
#    what it held back, or an async failover would lose nothing. A primary that is down
#    already (stopped by `pg_ctl -D $dir/primary stop`) is fine too.
# 2. The standby is promoted (pg_ctl promote -w): it is a primary on a new timeline, and
#    $dir/primary links to it (a new link renamed over the old one).
# 3. The primary address gets a new forwarder on its port, aimed at the new primary;
#    the connections the old one carried are gone with the old primary anyway.
# 4. Both PgBouncers go to the primary address, so their next server connections reach
#    the new primary; the ones to the dead primary are closed already.
# 5. It returns once the primary address and the running PgBouncers answer from the new
#    primary, so what runs next finds the database usable, and tells stderr how long
#    each step took.
#
# Every URL and REAPER_TEST_PGDATA in the env file stay as they are and reach the new
# primary. The pair has no standby then: REAPER_TEST_STANDBY_URL and
# REAPER_TEST_STANDBY_PGDATA are empty and $dir/standby is gone until tests/db/standby.sh
# NAME makes a new one in the old primary's place; another failover before that is
# refused. tests/db/down.sh stops what is left.
set -euo pipefail

name=${1:?usage: tests/db/failover.sh NAME}
dir=${REAPER_DB_DIR:-/tmp/reaper-db}/$name
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/lib.sh"

require_pair
[ -e "$dir/failed-over" ] \
  && die "$name has failed over and has no standby yet: make one with tests/db/standby.sh $name ($(cat "$dir/failed-over"))"
[ -L "$dir/standby" ] || die "$name has no standby: make one with tests/db/standby.sh $name"

# shellcheck source=/dev/null
. "$dir/env"
port_of() { local rest=${1#*@127.0.0.1:}; echo "${rest%%/*}"; }
old=$(readlink "$dir/primary")
new=$(readlink "$dir/standby")
pg_port=$(node_port "$old")
standby_port=$(node_port "$new")
forwarder_port=$(port_of "$REAPER_TEST_DATABASE_URL")

# Checked before anything is killed: a failover that stops half-way leaves no database.
in_recovery=$(db_psql "$standby_port" 'select pg_is_in_recovery()') \
  || die "the standby of $name ($new) does not answer on port $standby_port"
[ "$in_recovery" = t ] || die "the standby of $name ($new) on port $standby_port is not in recovery: nothing to promote"
for ini in pgbouncer pgbouncer-session; do
  grep -qx "\* = host=127\.0\.0\.1 port=$forwarder_port" "$dir/$ini.ini" \
    || die "$dir/$ini.ini has no line '* = host=127.0.0.1 port=$forwarder_port' (the primary address)"
done
[ -s "$dir/forwarder.pid" ] || die "$name has no forwarder ($dir/forwarder.pid) for its primary address"

t_kill=$(now_ms)
pids=$(instance_pids "$dir/$old")
killed="$old killed"
[ -n "$pids" ] || killed="$old found down already"
postmaster=$(sed -n 1p "$dir/$old/postmaster.pid" 2>/dev/null || true)
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
kill_instance "$dir/$old" 500 0.01
pids=$(instance_pids "$dir/$old")
[ -z "$pids" ] || die "processes of the primary are still alive after SIGKILL: $(echo "$pids" | paste -sd ' ')"
rm -f "$dir/replication.paused"
t_killed=$(now_ms)

for _ in $(seq 1 1000); do
  listening "$pg_port" || break
  sleep 0.01
done
listening "$pg_port" && die "port $pg_port still accepts connections after the primary was killed"
t_port=$(now_ms)

"${as_db_user[@]}" "$pgbin/pg_ctl" -D "$dir/$new" -w -t 60 promote >/dev/null \
  || { tail -n 30 "$dir/$new.log" >&2; die "the standby ($new) was not promoted"; }
ln -sfn "$new" "$dir/primary.new"
mv -T "$dir/primary.new" "$dir/primary"
rm -f "$dir/standby"
t_promoted=$(now_ms)

stop_forwarder
start_forwarder "$forwarder_port" "$standby_port"
t_forwarder=$(now_ms)

urls=("$REAPER_TEST_DATABASE_URL")
labels=("the primary address")
down=()
for ini in pgbouncer pgbouncer-session; do
  url=$REAPER_TEST_PGBOUNCER_URL label="the transaction-mode PgBouncer"
  if [ "$ini" = pgbouncer-session ]; then
    url=$REAPER_TEST_PGBOUNCER_SESSION_URL label="the session-mode PgBouncer"
  fi
  pid=$(cat "$dir/$ini.pid" 2>/dev/null || true)
  if [ -z "$pid" ] || ! grep -qs pgbouncer "/proc/$pid/cmdline"; then
    down+=("$ini")
    continue
  fi
  urls+=("$url")
  labels+=("$label")
done

# A client that tried a PgBouncer while no server answered makes it hold every client
# back for server_login_retry (1 s in the transaction-mode one, the default 15 s in the
# stock one), hence the 30 s and a time for each.
answered=()
for i in "${!urls[@]}"; do
  url=${urls[$i]}
  answer=
  for _ in $(seq 1 600); do
    answer=$(PGPASSWORD=reaper "$pgbin/psql" -qAtX "$url" \
      -c 'select inet_server_port(), pg_is_in_recovery()' 2>/dev/null) || true
    [ "$answer" = "$standby_port|f" ] && break
    sleep 0.05
  done
  [ "$answer" = "$standby_port|f" ] \
    || die "port $(port_of "$url") does not answer from the new primary after 30 s (last answer: '${answer:-none}')"
  answered+=("$(($(now_ms) - t_kill)) ms through ${labels[$i]}")
done

set_env REAPER_TEST_STANDBY_URL ''
set_env REAPER_TEST_STANDBY_PGDATA ''
echo "$killed (port $pg_port) at $(date -u +%FT%TZ), $new (port $standby_port) promoted" >"$dir/failed-over"

answers=$(printf '%s, ' "${answered[@]}")
not_running=${down[*]:+; not running: ${down[*]}}
echo "tests/db/failover.sh: $name: $killed in $((t_killed - t_kill)) ms, its port free" \
  "$((t_port - t_killed)) ms later, $new promoted in $((t_promoted - t_port)) ms, forwarder" \
  "repointed in $((t_forwarder - t_promoted)) ms;" \
  "from the kill to an answer from the new primary ${answers%, }$not_running" >&2
echo "$REAPER_TEST_DATABASE_URL"
