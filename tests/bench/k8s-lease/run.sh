#!/usr/bin/env bash
# Side-by-side reference: failover of Kubernetes' own leader election (client-go
# tools/leaderelection, coordination.k8s.io Lease, ReleaseOnCancel) for a singleton
# workload, on a private local control plane (tests/cluster/up.sh; kwok fakes the Pods).
#
#   tests/bench/k8s-lease/run.sh                                       # full run: 30 trials per mode
#   TRIALS=3 tests/bench/k8s-lease/run.sh                              # smoke
#   TRIALS=3 TTL=3s DEADLINE=2s RETRY=1s tests/bench/k8s-lease/run.sh  # fast profile
#
# Two candidates, each owning a Deployment (leader: its own at 1, standby: its own at 0).
# Per trial the leader is stopped with SIGKILL (mode kill9) or SIGTERM (mode graceful:
# scale own Deployment to 0, wait for its Pods to be gone, release the Lease) and the
# driver measures, from the signal: lease_taken (standby's OnStartedLeading),
# deployment_scaled (its scale patch acknowledged), pod_ready (its Deployment's
# readyReplicas >= 1); graceful also old_drained, released, release_to_lease,
# release_to_scaled. The killed candidate is restarted as the new standby. Details, and
# the bounds client-go's timing implies (kill9 lease_taken 13-23.8 s with 15s/10s/2s; a
# graceful release is noticed only at the standby's next poll, 0-4.4 s), in main.go.
#
# Steps: builds k8s-lease-bench into ${REAPER_CACHE:-$HOME/.cache/reaper-operator}/bin,
# starts control plane $CLUSTER (default k8slease-bench), runs each mode in $MODES
# (default "kill9 graceful") with $TRIALS trials (default 30) and timings $TTL/$DEADLINE/
# $RETRY (default 15s/10s/2s, client-go's defaults), stops the control plane on exit and
# prints each mode's JSON result (one line each; median/p99 nearest-rank, min, max, ms).
# Per-trial lines and a human summary go to stderr; candidate logs to $LOG_DIR (default:
# a new directory under /tmp, kept).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
cache="${REAPER_CACHE:-$HOME/.cache/reaper-operator}"
bin="$cache/bin/k8s-lease-bench"
trials="${TRIALS:-30}"
ttl="${TTL:-15s}"
deadline="${DEADLINE:-10s}"
retry="${RETRY:-2s}"
modes="${MODES:-kill9 graceful}"
cluster="${CLUSTER:-k8slease-bench}"
log_dir="${LOG_DIR:-$(mktemp -d /tmp/k8s-lease-bench.XXXXXX)}"

log() { printf 'run.sh: %s\n' "$*" >&2; }

for mode in $modes; do
  [[ "$mode" == kill9 || "$mode" == graceful ]] || { log "MODES: unknown mode '$mode'"; exit 2; }
done

log "building $bin"
mkdir -p "$cache/bin" "$log_dir"
(cd "$here" && go build -trimpath -o "$bin" .)

cluster_up=0
cleanup() {
  if [[ $cluster_up -eq 1 ]]; then
    "$repo/tests/cluster/down.sh" "$cluster" || log "down.sh $cluster failed"
  fi
}
trap cleanup EXIT

# up.sh stops what it started if it fails, and refuses to touch a running cluster of
# the same name, so the trap only stops the cluster once up.sh has succeeded.
kubeconfig="$("$repo/tests/cluster/up.sh" "$cluster" | tail -n 1)"
cluster_up=1
[[ -f "$kubeconfig" ]] || { log "up.sh did not print a kubeconfig path (got '$kubeconfig')"; exit 1; }

results=()
for mode in $modes; do
  log "mode $mode: $trials trials, ttl $ttl, deadline $deadline, retry $retry"
  out="$log_dir/$mode.out"
  "$bin" bench -kubeconfig "$kubeconfig" -mode "$mode" -trials "$trials" \
    -ttl "$ttl" -deadline "$deadline" -retry "$retry" -log-dir "$log_dir/$mode" >"$out"
  results+=("$(tail -n 1 "$out")")
done

log "candidate logs and raw output in $log_dir"
printf '%s\n' "${results[@]}"
