#!/usr/bin/env bash
# Stops the local control plane started by `tests/cluster/up.sh NAME`: sends SIGTERM to
# exactly the pids that up.sh recorded (only if such a pid still runs a process of this
# cluster), waits for them to exit (SIGKILL after 10 s), then removes the state directory
# ${REAPER_CLUSTER_DIR:-/tmp/reaper-clusters}/NAME/.
set -euo pipefail

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
name="${1:-}"
valid_name "$name" || { echo "usage: $0 NAME" >&2; exit 2; }
root="${REAPER_CLUSTER_DIR:-/tmp/reaper-clusters}"
state="$root/$name"

if [[ ! -d "$state" ]]; then
  echo "down.sh[$name]: no state at $state; nothing to do" >&2
  exit 0
fi

# ours PID: true if PID is alive and was started for this cluster (its command line
# names the state directory), so a recycled pid is never killed.
ours() { ours_cmd "$1" "$state/"; }

# stop COMPONENT...: SIGTERM those components' recorded pids, wait for them to exit
# (SIGKILL after 10 s).
stopped=0
stop() {
  local component pidfile pid pids=()
  for component in "$@"; do
    pidfile="$state/pids/$component.pid"
    [[ -f "$pidfile" ]] || continue
    pid="$(<"$pidfile")"
    if ours "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do
      ours "$pid" || break
      sleep 0.1
    done
    if ours "$pid"; then
      echo "down.sh[$name]: pid $pid did not stop after SIGTERM; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 50); do
        ours "$pid" || break
        sleep 0.1
      done
    fi
    stopped=$((stopped + 1))
  done
}

# A real node joined to this cluster (tests/cluster/node.sh) goes first, while the
# apiserver still answers; node.sh leaves a node of another cluster alone.
if [[ -d "$root/.real-node" && "$(id -u)" == 0 ]]; then
  "$(dirname "${BASH_SOURCE[0]}")/node.sh" down "$name" ||
    echo "down.sh[$name]: tests/cluster/node.sh down $name failed" >&2
fi

# Clients first, etcd last: kube-apiserver's graceful shutdown still talks to etcd.
stop kwok kube-scheduler kube-controller-manager kube-apiserver
stop etcd

rm -rf "$state"
echo "down.sh[$name]: stopped $stopped process(es), removed $state" >&2
