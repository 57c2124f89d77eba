#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The failover scenarios of the kind kit (tests/e2e/kind/scenarios.sh), run here on two
# local control planes (tests/cluster/up.sh; pods faked by kwok) with the SAME checking
# code (tests/e2e/lib/singleton.sh) and the same manifest (tests/e2e/manifests/), and
# with the operator as local processes, two per cluster, as the chart's two replicas:
#
#   kind kit                                  here
#   delete the leading operator pod           kill -9 the leading process, start a new one
#   scale the operator to 0 in the leading    SIGTERM both processes of that cluster; when
#     cluster, then back                        the other cluster runs the pod, start two new
#   cut the leading cluster from the database cut that cluster's database proxy (dbproxy.py:
#     (docker network disconnect)               connections hang, as packets are dropped)
#   restart the database container            pg_ctl restart -m fast
#
# Pass: in every sample (every 0.5 s) at most one ready singleton pod across both clusters,
# and exactly one (the same pod to the end) at most ttl + retry + E2E_SLACK seconds after
# the fault. Prints a summary; exits 1 on any violation. Everything it starts (clusters,
# database, operators, proxies) is stopped on exit, Ctrl-C included.
#
#   tests/e2e/local/check.sh
#
# Environment: E2E_SLACK (pod start slack in seconds, 10), E2E_TIME_LIMIT (seconds for
# everything after the one-off builds, 420), E2E_KEEP_LOGS=1 (keep the logs on success).
# Builds: the control plane via tests/cluster/build.sh (cached), the operator with
# `cargo build --locked` when $CARGO_TARGET_DIR/debug/reaper-operator is missing (or
# always with E2E_BUILD=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
repo=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/reaper-operator/target}
# shellcheck source=../lib/singleton.sh
. tests/e2e/lib/singleton.sh

manifest=$repo/tests/e2e/manifests/singleton.yaml
namespace=reaper-e2e
ttl=$(singleton_lease_setting "$manifest" ttlSeconds)
retry=$(singleton_lease_setting "$manifest" retryPeriodSeconds)
slack=${E2E_SLACK:-10}
bound=$((ttl + retry + slack))
settle=$((ttl + retry + 2))
limit=${E2E_TIME_LIMIT:-420}
run="e2e$$"
work=$(mktemp -d "${TMPDIR:-/tmp}/reaper-e2e-local.XXXXXX")
operator=$CARGO_TARGET_DIR/debug/reaper-operator

log() { singleton_log "check.sh: $*"; }

# --- cleanup: everything started below is recorded and stopped here ------------------
# await_exit PID: wait up to 30 s for it to exit (call with 2>/dev/null: bash reports a
# child killed by a signal on stderr when it reaps it).
await_exit() {
  for _ in $(seq 300); do kill -0 "$1" || break; sleep 0.1; done
  kill -0 "$1" && return 1
  wait "$1" || true
}

declare -A op_pid=() op_port=() proxy_pid=() kubeconfig=() db_url=() next_id=()
clusters_up=()
up_pid=()
db_up=0
watchdog=""
status=1
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  singleton_sampler_stop
  local pid
  # A control plane still starting: its up.sh stops what it started when terminated.
  for pid in "${up_pid[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${up_pid[@]}"; do await_exit "$pid" 2>/dev/null || true; done
  for pid in "${op_pid[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${proxy_pid[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${op_pid[@]}" "${proxy_pid[@]}"; do await_exit "$pid" 2>/dev/null || true; done
  for key in "${clusters_up[@]}"; do tests/cluster/down.sh "$key" >/dev/null 2>&1 || true; done
  [[ $db_up -eq 1 ]] && { tests/db/down.sh "$run" >/dev/null 2>&1 || true; }
  if [[ -n "$watchdog" ]]; then kill "$watchdog" 2>/dev/null || true; wait "$watchdog" 2>/dev/null || true; fi
  if [[ $status -eq 0 && -z "${E2E_KEEP_LOGS:-}" ]]; then
    rm -rf "$work"
  else
    echo "check.sh: logs and samples kept in $work" >&2
  fi
  [[ $rc -ne 0 ]] || rc=$status
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "stopped (SIGTERM, or the ${limit}s time limit)"; exit 124' TERM

# --- one-off builds (not counted in the time limit) ---------------------------------------
bin=$(tests/cluster/build.sh | tail -n 1)
if [[ ! -x "$operator" || -n "${E2E_BUILD:-}" ]]; then
  log "building reaper-operator (cargo build --locked)"
  cargo build --locked
fi
log "operator binary $operator ($(date -u -r "$operator" +%FT%TZ))"

( trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  sleep "$limit" & sleeper=$!
  wait "$sleeper"
  kill -TERM $$ ) &
watchdog=$!

SINGLETON_KUBECTL=$bin/kubectl
SINGLETON_NAMESPACE=$namespace
SINGLETON_REAPER=e2e-reaper
SINGLETON_POD_LABEL=app.kubernetes.io/name=e2e-reaper
SINGLETON_CACHE_DIR=$work/kube-cache
SINGLETON_WORKDIR=$work

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- database and clusters ------------------------------------------------------------------
log "starting PostgreSQL and two control planes (a, b); ttl ${ttl}s, retry ${retry}s, bound ${bound}s"
db_up=1
env_file=$(tests/db/up.sh "$run" 2>"$work/db-up.log" | tail -n 1) ||
  { cat "$work/db-up.log" >&2; log "the database did not start"; exit 1; }
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a
upstream=${DATABASE_URL##*@}
upstream=${upstream%%/*}

for c in a b; do
  clusters_up+=("$run-$c")
  tests/cluster/up.sh "$run-$c" >"$work/up-$c.out" 2>"$work/up-$c.log" &
  up_pid+=($!)
done
for pid in "${up_pid[@]}"; do
  wait "$pid" || { cat "$work"/up-*.log >&2; log "a control plane did not start"; exit 1; }
done
up_pid=() # reaped: never signal these pids again

for c in a b; do
  kubeconfig[$c]=$(tail -n 1 "$work/up-$c.out")
  singleton_add_cluster "$c" "${kubeconfig[$c]}"
  python3 tests/e2e/local/dbproxy.py "$work/proxy-$c.port" "${upstream%:*}" "${upstream##*:}" \
    >"$work/proxy-$c.log" 2>&1 &
  proxy_pid[$c]=$!
  for _ in $(seq 50); do [[ -s "$work/proxy-$c.port" ]] && break; sleep 0.1; done
  [[ -s "$work/proxy-$c.port" ]] || { log "database proxy $c did not start"; exit 1; }
  db_url[$c]="${DATABASE_URL%@*}@127.0.0.1:$(<"$work/proxy-$c.port")/${DATABASE_URL##*/}"

  singleton_kubectl "$c" apply -f crds/reaper.yaml >/dev/null
  singleton_kubectl "$c" wait --for condition=established --timeout=30s crd/reapers.pglease.dev >/dev/null
  singleton_kubectl "$c" create namespace "$namespace" >/dev/null
  singleton_kubectl "$c" -n "$namespace" apply -f "$manifest" >/dev/null
done

# --- operator processes -----------------------------------------------------------------------
# start_operator CLUSTER: a new replica (a new identity, as a new pod would have).
start_operator() {
  local c=$1 n id port
  n=$((${next_id[$c]:-0} + 1))
  next_id[$c]=$n
  id="op-$n"
  port=$(free_port)
  KUBECONFIG=${kubeconfig[$c]} DATABASE_URL=${db_url[$c]} RUST_LOG=info \
    "$operator" run --cluster-name "$c" --identity "$id" --http-addr "127.0.0.1:$port" \
    --watch-namespace "$namespace" --shutdown-timeout-seconds 20 \
    </dev/null >>"$work/operator-$c-$id.log" 2>&1 &
  op_pid[$c/$id]=$!
  op_port[$c/$id]=$port
  log "started operator $c/$id (pid ${op_pid[$c/$id]}, http 127.0.0.1:$port)"
}

# operators_of CLUSTER: the running replicas of that cluster ("c/op-N" keys).
operators_of() {
  local key
  for key in "${!op_pid[@]}"; do [[ "$key" == "$1/"* ]] && echo "$key"; done
  return 0
}

wait_ready() { # KEY...
  local key
  for key in "$@"; do
    for _ in $(seq 120); do
      curl -fsS --max-time 1 "http://127.0.0.1:${op_port[$key]}/readyz" >/dev/null 2>&1 && break
      kill -0 "${op_pid[$key]}" 2>/dev/null || { log "operator $key exited"; tail -n 20 "$work/operator-${key/\//-}.log" >&2; return 1; }
      sleep 0.5
    done
  done
}

# stop_operator KEY [SIGNAL]: send SIGNAL (none: it was already signalled) and wait for
# the process to exit: 30 s at most, then SIGKILL and fail.
stop_operator() {
  local key=$1 signal=${2:-} pid=${op_pid[$1]} rc=0
  [[ -z "$signal" ]] || kill "-$signal" "$pid"
  if ! await_exit "$pid" 2>/dev/null; then
    log "operator $key still running 30 s after the signal; killing it"
    kill -9 "$pid" 2>/dev/null || true
    await_exit "$pid" 2>/dev/null || true
    rc=1
  fi
  unset "op_pid[$key]" "op_port[$key]"
  return "$rc"
}

for c in a b; do start_operator "$c"; start_operator "$c"; done
# shellcheck disable=SC2046 # keys have no spaces
wait_ready $(operators_of a) $(operators_of b)
log "four operators ready; waiting for the singleton"
singleton_wait_exactly_one 60

# --- scenarios --------------------------------------------------------------------------------
leader_cluster() { local holder; read -r holder _ < <(singleton_leader) || return 1; echo "${holder%%/*}"; }
other() { [[ "$1" == a ]] && echo b || echo a; }

kill_leader() {
  local holder key
  read -r holder _ < <(singleton_leader) || { log "no leader"; return 1; }
  key=$holder
  [[ -n "${op_pid[$key]:-}" ]] || { log "leader $holder is not one of our processes"; return 1; }
  log "kill -9 the leading operator $holder (pid ${op_pid[$key]})"
  singleton_fault_now
  stop_operator "$key" KILL
  sleep 2 # as a Deployment recreates a deleted pod
  start_operator "${holder%%/*}"
}

stop_leading_cluster() {
  local c key rc=0
  c=$(leader_cluster) || { log "no leader"; return 1; }
  log "SIGTERM both operators of cluster $c (graceful handover)"
  singleton_fault_now
  for key in $(operators_of "$c"); do kill -TERM "${op_pid[$key]}"; done
  for key in $(operators_of "$c"); do stop_operator "$key" || rc=1; done
  log "operators of $c exited; waiting for the pod in cluster $(other "$c")"
  singleton_wait_exactly_one "$bound" "$(other "$c")" || rc=1
  log "scaling cluster $c's operator back to two replicas"
  start_operator "$c"
  start_operator "$c"
  return "$rc"
}

cut_leading_cluster() {
  local c rc=0
  c=$(leader_cluster) || { log "no leader"; return 1; }
  log "cutting cluster $c from the database"
  singleton_fault_now
  kill -USR1 "${proxy_pid[$c]}"
  singleton_wait_exactly_one "$bound" "$(other "$c")" || rc=1
  log "reconnecting cluster $c"
  kill -USR2 "${proxy_pid[$c]}"
  return "$rc"
}

restart_database() {
  local pg=("$REAPER_TEST_PG_CTL" -D "$REAPER_TEST_PGDATA" -m fast -w restart)
  if [[ "$(id -u)" == 0 && -n "${REAPER_TEST_PG_RUN_AS:-}" ]]; then
    pg=(runuser -u "$REAPER_TEST_PG_RUN_AS" -- "${pg[@]}")
  fi
  log "restarting PostgreSQL"
  singleton_fault_now
  "${pg[@]}" >>"$work/pg-restart.log" 2>&1 || { log "pg_ctl restart failed"; return 1; }
  log "PostgreSQL is back"
}

# A failed scenario is recorded and the next one still runs.
singleton_scenario delete-leader "$bound" "$settle" kill_leader || true
# shellcheck disable=SC2046
wait_ready $(operators_of a) $(operators_of b) || true
singleton_scenario scale-leader-to-0 "$bound" "$settle" stop_leading_cluster || true
# shellcheck disable=SC2046
wait_ready $(operators_of a) $(operators_of b) || true
singleton_scenario cut-leader-from-db "$bound" "$settle" cut_leading_cluster || true
# shellcheck disable=SC2046
wait_ready $(operators_of a) $(operators_of b) || true
singleton_scenario restart-db "$bound" "$settle" restart_database || true

echo
echo "===== lease history (lease_event) ====="
"$(dirname "$REAPER_TEST_PG_CTL")/psql" -X "$DATABASE_URL" -c \
  "select epoch, kind, holder, previous_holder, to_char(at, 'HH24:MI:SS.MS') as at from lease_event where name = '$namespace.e2e-reaper' order by id" || true
if singleton_summary; then status=0; else status=1; fi
