# shellcheck shell=bash disable=SC2034 # what it sets is for the scripts that source it
# What the scripts in tests/db share; sourced, not run. The script sets `dir` (the state
# directory of the database) and `name` before it sources this.
#
# A pair (REAPER_DB_STANDBY=sync|async tests/db/up.sh) keeps in $dir:
#   node-a/, node-b/    the data directories of its two servers; each ends its
#                       postgresql.conf with `include = 'node.conf'`, which holds what
#                       differs between them (port, synchronous_standby_names)
#   nodes               "node-a PORT" and "node-b PORT": each keeps its port for good
#   primary -> node-?   the current primary (REAPER_TEST_PGDATA)
#   standby -> node-?   the current standby; absent between a failover and standby.sh
#   node-a.log, ...     what each server logged when a script here started it
#   forwarder.pid       the socat forwarder, in a process group of its own
#   failed-over         written by failover.sh, removed by standby.sh

# die MESSAGE: the message on stderr, named after the script; exit 1.
die() { echo "tests/db/${0##*/}: $*" >&2; exit 1; }

dir=${dir:?tests/db/lib.sh: set dir before sourcing it}
name=${name:?tests/db/lib.sh: set name before sourcing it}
pgbin=${PG_BIN:-$(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}

# PostgreSQL and PgBouncer refuse to run as root.
as_db_user=()
if [ "$(id -u)" = 0 ]; then
  as_db_user=(runuser -u postgres --)
fi

# free_ports N: N different free loopback ports (bound all at once, so none repeats).
free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# db_psql PORT SQL: the answer to SQL from the server on PORT, over the Unix socket in
# $dir as reaper (trusted there, whoever asks: no password, no TLS).
db_psql() {
  "$pgbin/psql" -qAtX -h "$dir" -p "$1" -U reaper -d postgres -c "$2"
}

# node_port NODE: the port of node-a or node-b.
node_port() {
  local port
  port=$(awk -v n="$1" '$1 == n { print $2 }' "$dir/nodes" 2>/dev/null)
  [ -n "$port" ] || die "$dir/nodes has no port for $1"
  echo "$port"
}

# other_node NODE: the other one of the pair.
other_node() {
  case "$1" in
    node-a) echo node-b ;;
    node-b) echo node-a ;;
    *) die "'$1' is not a node of a pair (node-a or node-b)" ;;
  esac
}

# write_node_conf NODE PORT SYNCHRONOUS_STANDBY_NAMES: what node.conf says. Not ALTER
# SYSTEM: postgresql.auto.conf is copied into every standby made from this server and
# outlives its promotion, so a promoted standby would wait at every commit for a standby
# it does not have.
write_node_conf() {
  printf "port = %s\nsynchronous_standby_names = '%s'\n" "$2" "$3" >"$dir/$1/node.conf"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/$1/node.conf"; fi
}

# instance_pids DATA: the postgres processes whose working directory is DATA (resolved):
# PostgreSQL changes into its data directory, so that finds what a killed postmaster left
# behind, and never a process that merely reuses a pid from a stale postmaster.pid.
instance_pids() {
  local data pattern pid comm
  data=$(cd "$1" && pwd -P) || return 0
  pattern=$(printf '%s' "$data" | sed 's/[][*?\\]/\\&/g')
  for pid in $(find /proc/[0-9]*/cwd -maxdepth 0 -lname "$pattern" 2>/dev/null | cut -d/ -f3); do
    comm=
    read -r comm 2>/dev/null <"/proc/$pid/comm" || true
    if [ "$comm" = postgres ]; then echo "$pid"; fi
  done
  return 0
}

# require_pair: dies unless $dir holds a pair (the state of
# REAPER_DB_STANDBY=sync|async tests/db/up.sh $name).
require_pair() {
  [ -d "$dir" ] || die "$dir does not exist: start a pair with REAPER_DB_STANDBY=sync|async tests/db/up.sh $name"
  [ -L "$dir/primary" ] || die "$name is not a pair (no $dir/primary): start it with REAPER_DB_STANDBY=sync|async tests/db/up.sh $name"
}

# kill_instance DATA TRIES PAUSE: SIGKILL every process of the instance at DATA (see
# instance_pids), again and again until none is left, looking at most TRIES times,
# PAUSE seconds apart. Returns at once if none runs; never fails.
kill_instance() {
  local pids pid
  for _ in $(seq 1 "$2"); do
    pids=$(instance_pids "$1")
    [ -z "$pids" ] && break
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    sleep "$3"
  done
  return 0
}

# now_ms: the wall clock in milliseconds.
now_ms() {
  local t=${EPOCHREALTIME//[!0-9]/}
  echo $((t / 1000))
}

# set_env KEY VALUE: replaces the line of KEY in $dir/env (a new file renamed over the
# old, so a reader sees one or the other). VALUE is quoted: a TLS URL has '&' in it.
set_env() {
  local line found=
  while IFS= read -r line; do
    if [ "${line%%=*}" = "$1" ]; then
      printf "%s='%s'\n" "$1" "$2"
      found=1
    else
      printf '%s\n' "$line"
    fi
  done <"$dir/env" >"$dir/env.new"
  [ -n "$found" ] || printf "%s='%s'\n" "$1" "$2" >>"$dir/env.new"
  mv "$dir/env.new" "$dir/env"
}

# listening PORT: whether something listens on 127.0.0.1:PORT (IPv4, state LISTEN).
listening() {
  local hex
  hex=$(printf '0100007F:%04X' "$1")
  awk -v a="$hex" '$2 == a && $4 == "0A" { found = 1 } END { exit !found }' /proc/net/tcp
}

# forwarder_pids PGID: the live socat processes of that process group (a zombie is dead
# already; a pid some other program has by now is not one of them). A comm with a space
# in it shifts the fields of its line, but then it is not "(socat)" either.
forwarder_pids() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v pgid="$1" '$2 == "(socat)" && $3 != "Z" && $5 == pgid { print $1 }'
  return 0
}

# start_forwarder LISTEN_PORT TARGET_PORT: the primary address of a pair, a socat that
# forwards every connection to 127.0.0.1:LISTEN_PORT to 127.0.0.1:TARGET_PORT. It gets a
# session (so a process group) of its own: a connection is a forked child, and
# stop_forwarder ends them with it. nodelay: a forwarded query must not wait for Nagle.
start_forwarder() {
  setsid socat "TCP-LISTEN:$1,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:127.0.0.1:$2,nodelay" \
    </dev/null >>"$dir/forwarder.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/forwarder.pid"
  for _ in $(seq 1 500); do
    listening "$1" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  tail -n 5 "$dir/forwarder.log" >&2
  die "the forwarder (socat, pid $pid) does not listen on 127.0.0.1:$1"
}

# stop_forwarder: ends the forwarder and every connection it carries (SIGTERM, SIGKILL
# after 2 s); once they are gone its port is free.
stop_forwarder() {
  local pgid pids signal=TERM
  pgid=$(cat "$dir/forwarder.pid" 2>/dev/null) || return 0
  for i in $(seq 1 300); do
    pids=$(forwarder_pids "$pgid")
    [ -n "$pids" ] || break
    [ "$i" -gt 200 ] && signal=KILL
    # shellcheck disable=SC2086 # one pid a word
    kill -"$signal" $pids 2>/dev/null || true
    sleep 0.01
  done
  [ -z "$pids" ] || die "the forwarder's processes $(echo "$pids" | paste -sd ' ') are still alive after SIGKILL"
  rm -f "$dir/forwarder.pid"
}
