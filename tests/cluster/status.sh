#!/usr/bin/env bash
# Shows the processes of the local control plane NAME (started by up.sh): pid, whether it
# runs, resident memory (VmRSS) and CPU time used so far, plus the totals.
# Exits non-zero if a recorded process is not running.
set -euo pipefail

# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
name="${1:-}"
valid_name "$name" || { echo "usage: $0 NAME" >&2; exit 2; }
state="${REAPER_CLUSTER_DIR:-/tmp/reaper-clusters}/$name"
[[ -d "$state/pids" ]] || { echo "status.sh: no cluster '$name' at $state" >&2; exit 1; }

ticks="$(getconf CLK_TCK)"
total_kb=0
total_ticks=0
down=0
printf '%-24s %8s %8s %10s %9s\n' COMPONENT PID STATE RSS_MiB CPU_s
for component in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
  pidfile="$state/pids/$component.pid"
  [[ -f "$pidfile" ]] || continue
  pid="$(<"$pidfile")"
  if ours_cmd "$pid" "$state/"; then
    kb="$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")"
    # Fields 14 and 15 of /proc/PID/stat: user and system time in clock ticks (the command
    # name in field 2 has no spaces for these binaries).
    t="$(awk '{ print $14 + $15 }' "/proc/$pid/stat")"
    total_kb=$((total_kb + kb))
    total_ticks=$((total_ticks + t))
    printf '%-24s %8s %8s %10d %9.1f\n' "$component" "$pid" running "$((kb / 1024))" \
      "$(awk -v t="$t" -v hz="$ticks" 'BEGIN { print t / hz }')"
  else
    down=$((down + 1))
    printf '%-24s %8s %8s %10s %9s\n' "$component" "$pid" gone - -
  fi
done
printf '%-24s %8s %8s %10d %9.1f\n' total "" "" "$((total_kb / 1024))" \
  "$(awk -v t="$total_ticks" -v hz="$ticks" 'BEGIN { print t / hz }')"
[[ $down -eq 0 ]]
