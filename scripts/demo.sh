#!/usr/bin/env bash
# The operator's main job, locally: a real control plane (built from Go modules, cached),
# a private PostgreSQL, two operator replicas, the sample Reaper; then the leader is
# killed with SIGKILL and the other replica takes over. Everything stops on exit/Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/reaper-operator/target}
scripts/deps.sh
name="demo-$$"
logs=$(mktemp -d)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  tests/cluster/down.sh "$name" >/dev/null 2>&1 || true
  tests/db/down.sh "$name" >/dev/null 2>&1 || true
  echo "demo stopped (operator logs were in $logs)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }

step "building reaper-operator"
cargo build --locked --quiet
bin=$CARGO_TARGET_DIR/debug/reaper-operator

step "starting PostgreSQL + PgBouncer"
env_file=$(tests/db/up.sh "$name" | tail -n 1)
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a

step "starting the local control plane (the first run builds it: 10-16 min)"
KUBECONFIG=$(tests/cluster/up.sh "$name" | tail -n 1)
export KUBECONFIG
kubectl() { "$(tests/cluster/build.sh | tail -n 1)/kubectl" "$@"; }

step "installing the CRD and the sample (examples/reaper.yaml)"
kubectl apply -f crds/reaper.yaml
kubectl wait --for condition=established --timeout=30s crd/reapers.pglease.dev >/dev/null
kubectl apply -f examples/reaper.yaml

step "starting two operator replicas of cluster 'east'"
for id in op-1 op-2; do
  port=$([ "$id" = op-1 ] && echo 18081 || echo 18082)
  "$bin" run --cluster-name east --identity "$id" --http-addr "127.0.0.1:$port" \
    >"$logs/$id.log" 2>&1 &
  pids+=($!)
done

wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 120); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "timed out waiting for $what" >&2
  return 1
}
leading() { [ "$(kubectl get reaper queue-reaper -o jsonpath='{.status.phase} {.status.ready}')" = "Leading 1/1" ]; }
wait_for "the reaper to lead" leading

step "kubectl get reapers,deploy"
kubectl get reapers
kubectl get deploy queue-reaper

holder=$(kubectl get reaper queue-reaper -o jsonpath='{.status.holder}')
epoch=$(kubectl get reaper queue-reaper -o jsonpath='{.status.epoch}')
victim=$([ "$holder" = east/op-1 ] && echo 0 || echo 1)
step "kill -9 of the leader ($holder, epoch $epoch); the lease expires after 15 s"
kill -9 "${pids[$victim]}"
started=$(date +%s)
taken_over() {
  [ "$(kubectl get reaper queue-reaper -o jsonpath='{.status.holder}')" != "$holder" ] && leading
}
wait_for "the takeover" taken_over
echo "taken over after $(( $(date +%s) - started )) s"

step "kubectl get reapers,deploy"
kubectl get reapers
kubectl get deploy queue-reaper
"$bin" lease status
