#!/usr/bin/env bash
# Makes a new streaming standby of the primary of a pair (REAPER_DB_STANDBY=sync|async
# tests/db/up.sh NAME) in the place of the one that is gone: after tests/db/failover.sh
# that is the old primary, so the pair can fail over again, as often as a test likes
# (failover, standby, failover, ...). up.sh makes the first standby with it too.
#
#   tests/db/standby.sh NAME  -> prints the new standby's direct URL as the last line
#
# The other node of the pair (not the one $dir/primary names) is the place: it must be
# dead (a live standby or a second primary there is refused). Its data directory is
# removed, with what its killed postmaster left outside it (the socket and its lock file
# in $dir; a pid in that lock file that another process has by now would make the new
# server refuse to start), and the primary's replication slot for it, which nobody uses
# any more. Then pg_basebackup copies the primary into it (-R: it follows the primary
# through the slot `standby`, -C: made anew), it starts on the node's old port, and once it
# streams, a sync pair's primary is made to wait for it at every commit (node.conf:
# synchronous_standby_names = 'standby', then a reload); not before, or every commit
# meanwhile would wait for ever. It returns once pg_stat_replication on the primary shows
# the standby `streaming` and `sync` or `async` as the pair was started.
#
# The env file's REAPER_TEST_STANDBY_URL and REAPER_TEST_STANDBY_PGDATA then name the new
# standby, $dir/standby links to it and failover.sh's `failed-over` marker is gone.
set -euo pipefail

name=${1:?usage: tests/db/standby.sh NAME}
dir=${REAPER_DB_DIR:-/tmp/reaper-db}/$name
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/lib.sh"

require_pair

# shellcheck source=/dev/null
. "$dir/env"
mode=${REAPER_TEST_STANDBY_MODE:-}
case "$mode" in
  sync | async) ;;
  *) die "$dir/env has REAPER_TEST_STANDBY_MODE='$mode', not sync or async" ;;
esac

now_start=$(now_ms)
primary=$(readlink "$dir/primary")
node=$(other_node "$primary")
primary_port=$(node_port "$primary")
port=$(node_port "$node")

in_recovery=$(db_psql "$primary_port" 'select pg_is_in_recovery()' 2>/dev/null) \
  || die "the primary of $name ($primary, port $primary_port) does not answer: there is nothing to copy"
[ "$in_recovery" = f ] || die "the primary of $name ($primary, port $primary_port) is in recovery"

# What is in the place must be dead: its processes, and anything else on its port.
if [ -d "$dir/$node" ] && [ -n "$(instance_pids "$dir/$node")" ]; then
  if [ "$(db_psql "$port" 'select pg_is_in_recovery()' 2>/dev/null)" = t ]; then
    die "$name still has a live standby ($node on port $port): standby.sh replaces one that is gone, after tests/db/failover.sh $name or its death"
  fi
  die "$node of $name on port $port is running and not a standby; stop it before it is replaced"
fi
listening "$port" && die "something else listens on port $port, the port of $node"

leftovers=()
# The slot unless a walsender holds it (one replication.sh paused still does).
slot=$(db_psql "$primary_port" "select coalesce(active_pid::text, 'dropped'),
    case when not active then pg_drop_replication_slot(slot_name) end
  from pg_replication_slots where slot_name = 'standby'") \
  || die "cannot drop the replication slot 'standby' on the primary"
case "$slot" in
  '') ;;
  'dropped|') leftovers+=("the slot 'standby' on $primary") ;;
  *) die "walsender ${slot%|} on the primary still holds the slot 'standby' (paused by tests/db/replication.sh?)" ;;
esac
if [ -e "$dir/$node" ]; then
  leftovers+=("$dir/$node")
  # Out of the way at once, gone in the background: deleting the files of a server
  # killed a moment ago waits for the kernel to finish writing them (0.4 s here).
  mv -T "$dir/$node" "$dir/$node.removed.$$"
  rm -rf "$dir/$node.removed.$$" >/dev/null 2>&1 &
fi
for f in "$dir/.s.PGSQL.$port" "$dir/.s.PGSQL.$port.lock" "$dir/replication.paused"; do
  if [ -e "$f" ]; then
    leftovers+=("$f")
    rm -f "$f"
  fi
done
[ -L "$dir/standby" ] && rm -f "$dir/standby"
t_cleared=$(now_ms)

# Over TCP with a password, as a standby on another host would connect. The slot keeps
# the WAL the standby still needs, and lets only one walsender stream to it: a second
# one (the standby reconnecting after wal_receiver_timeout while replication.sh has the
# first one stopped) is refused, so a pause holds as long as the test wants. --no-sync:
# the copy need not survive a crash of the machine, and syncing it doubles the time.
conninfo="host=127.0.0.1 port=$primary_port user=reaper password=reaper application_name=standby"
if [ -n "${REAPER_TEST_TLS_CA:-}" ]; then
  conninfo="$conninfo sslmode=verify-full sslrootcert=$REAPER_TEST_TLS_CA"
fi
# A promoted standby still has its own primary_conninfo and primary_slot_name in
# postgresql.auto.conf; the copy would have them before the lines -R adds after them.
"$pgbin/psql" -qAtX -h "$dir" -p "$primary_port" -U reaper -d postgres \
  -c 'ALTER SYSTEM RESET primary_conninfo' -c 'ALTER SYSTEM RESET primary_slot_name' \
  || die "cannot reset primary_conninfo and primary_slot_name on the primary"
"${as_db_user[@]}" "$pgbin/pg_basebackup" -D "$dir/$node" -d "$conninfo" -R -C -S standby \
  -X stream -c fast --no-sync >"$dir/basebackup.log" 2>&1 \
  || { cat "$dir/basebackup.log" >&2; die "pg_basebackup of $primary into $node failed"; }
t_copied=$(now_ms)
# The copy has the primary's node.conf. Once promoted it is a primary without a standby,
# and must not wait for one at commit.
write_node_conf "$node" "$port" ''
echo "--- tests/db/standby.sh: $node, a standby of $primary, $(date -u +%FT%TZ)" >>"$dir/$node.log"
[ "$(id -u)" = 0 ] && chown postgres: "$dir/$node.log"
"${as_db_user[@]}" "$pgbin/pg_ctl" -D "$dir/$node" -l "$dir/$node.log" -w -t 60 start >/dev/null \
  || { tail -n 30 "$dir/$node.log" >&2; die "the standby ($node) did not start"; }
t_started=$(now_ms)

# wait_replication PATTERN: until the primary's pg_stat_replication row for the standby
# matches PATTERN, "state sync_state" (a sync standby that is still catching up is
# `potential` or `async` for a moment; a test that starts right away must find it
# replicating as asked).
wait_replication() {
  local state=
  for _ in $(seq 1 3000); do
    state=$(db_psql "$primary_port" \
      "select state || ' ' || sync_state from pg_stat_replication where application_name = 'standby'") \
      || die "cannot query pg_stat_replication on the primary"
    # shellcheck disable=SC2254 # PATTERN is a pattern
    case "$state" in $1) return 0 ;; esac
    sleep 0.01
  done
  tail -n 30 "$dir/$node.log" >&2
  die "the standby is not '$1' after 30 s (pg_stat_replication: '${state:-no row}')"
}
if [ "$mode" = async ]; then
  wait_replication "streaming async"
else
  # The primary may wait for a standby already (this one replaces a standby that died):
  # then it is `sync` at once.
  wait_replication "streaming *"
  write_node_conf "$primary" "$primary_port" standby
  "${as_db_user[@]}" "$pgbin/pg_ctl" -D "$dir/$primary" reload >/dev/null
  wait_replication "streaming sync"
fi
t_streaming=$(now_ms)

ln -sfn "$node" "$dir/standby.new"
mv -T "$dir/standby.new" "$dir/standby"
url="postgres://reaper:reaper@127.0.0.1:$port/postgres"
if [ -n "${REAPER_TEST_TLS_CA:-}" ]; then
  url="$url?sslmode=verify-full&sslrootcert=$REAPER_TEST_TLS_CA"
fi
set_env REAPER_TEST_STANDBY_URL "$url"
set_env REAPER_TEST_STANDBY_PGDATA "$dir/standby"
rm -f "$dir/failed-over"

echo "tests/db/standby.sh: $name: $node on port $port is the $mode standby of $primary after" \
  "$((t_streaming - now_start)) ms (pg_basebackup $((t_copied - t_cleared)) ms, start" \
  "$((t_started - t_copied)) ms, streaming $((t_streaming - t_started)) ms)${leftovers[*]:+; removed ${leftovers[*]}}" >&2
echo "$url"
