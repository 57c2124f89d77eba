#!/usr/bin/env bash
# Holds back or measures the WAL that reaches the standby of a database started with
# REAPER_DB_STANDBY=sync|async tests/db/up.sh NAME, so a test can make the standby fall
# behind on purpose before tests/db/failover.sh: with an async standby the commits made
# meanwhile succeed and are lost by the failover; with a sync one they wait. That wait
# ignores statement_timeout (PostgreSQL stops the timer before it commits); only a cancel
# request or the end of the backend ends it, and a cancel leaves the commit done on the
# primary, visible there, with only a WARNING to the client, yet lost by a failover.
#
#   tests/db/replication.sh NAME pause   -> stops (SIGSTOP) the primary's walsender for the standby
#   tests/db/replication.sh NAME resume  -> lets it go on (SIGCONT)
#   tests/db/replication.sh NAME lag     -> prints how many bytes of WAL the standby has not replayed
#
# The walsender rather than the standby is stopped, so the standby stays ready to answer
# and to be promoted at once. The stopped walsender keeps holding the standby's slot, so
# the standby cannot get round the pause through a second one when it reconnects after
# wal_receiver_timeout. The stopped pids are kept in $dir/replication.paused for resume;
# failover.sh kills them before anything else, down.sh lets them go before it stops.
set -euo pipefail

usage="usage: tests/db/replication.sh NAME pause|resume|lag"
name=${1:?$usage}
action=${2:?$usage}
dir=${REAPER_DB_DIR:-/tmp/reaper-db}/$name
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "$0")/lib.sh"
paused=$dir/replication.paused

case "$action" in
  pause | resume | lag) ;;
  *) die "unknown action '$action'; $usage" ;;
esac
require_pair
[ -e "$dir/failed-over" ] \
  && die "$name has failed over (tests/db/failover.sh) and has no standby yet: make one with tests/db/standby.sh $name"
[ -L "$dir/standby" ] || die "$name has no standby: make one with tests/db/standby.sh $name"
pg_port=$(node_port "$(readlink "$dir/primary")")

# primary SQL: one value from the primary.
primary() {
  db_psql "$pg_port" "$1" || die "cannot query the primary of $name on port $pg_port"
}

case "$action" in
  pause)
    pids=$(primary "select pid from pg_stat_replication where application_name = 'standby' and state = 'streaming'")
    [ -n "$pids" ] || die "the primary has no walsender streaming to the standby (pg_stat_replication)"
    for pid in $pids; do
      kill -STOP "$pid"
      grep -qx "$pid" "$paused" 2>/dev/null || echo "$pid" >>"$paused"
    done
    echo "tests/db/replication.sh: paused walsender $(echo "$pids" | paste -sd ' ') of $name" >&2
    ;;
  resume)
    [ -s "$paused" ] || die "nothing of $name is paused"
    while read -r pid; do
      kill -CONT "$pid" 2>/dev/null || echo "tests/db/replication.sh: walsender $pid is gone" >&2
    done <"$paused"
    rm -f "$paused"
    ;;
  lag)
    # replay_lsn is what the standby last reported: a stopped walsender reports nothing
    # new, so the lag grows with every commit on the primary, which is the point.
    lag=$(primary "select pg_current_wal_lsn() - replay_lsn from pg_stat_replication
                   where application_name = 'standby' and replay_lsn is not null
                   order by backend_start limit 1")
    [ -n "$lag" ] || die "the primary has no walsender for the standby that reported a replay position"
    echo "$lag"
    ;;
esac
