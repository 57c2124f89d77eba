# shellcheck shell=bash disable=SC2154 # components and timeout are set by the script that sources it
# What the scripts of the local control plane (up.sh, down.sh, status.sh, node.sh) share;
# sourced, not run. The functions on components need the script to set `components`
# (the directory holding a component's pids/COMPONENT.pid and logs/COMPONENT.log), to
# define `log`, and to set `timeout` (seconds per wait).

# valid_name NAME: NAME can name a cluster (and so a directory under REAPER_CLUSTER_DIR).
valid_name() { [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ ]]; }

# ours_cmd PID TEXT: PID is alive and its command line contains TEXT (a cluster's state
# directory, say), so a recycled pid is never taken for one of ours.
ours_cmd() {
  [[ "$1" =~ ^[0-9]+$ && -r "/proc/$1/cmdline" ]] && grep -qF -- "$2" < <(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)
}

# show_log COMPONENT: the last 40 lines of the component's log, on stderr.
show_log() {
  [[ -f "$components/logs/$1.log" ]] || return 0
  echo "----- last 40 lines of $components/logs/$1.log -----" >&2
  tail -n 40 "$components/logs/$1.log" >&2
  echo "-----" >&2
}

# fail COMPONENT MESSAGE: report, show the tail of that component's log, exit 1.
fail() {
  local component="$1"
  shift
  log "ERROR: $*"
  show_log "$component"
  exit 1
}

# wait_for COMPONENT DESCRIPTION COMMAND...: poll COMMAND until it succeeds; fail if the
# component's process exits or the timeout passes.
wait_for() {
  local component="$1" what="$2"
  shift 2
  local pid deadline=$((SECONDS + timeout))
  pid="$(<"$components/pids/$component.pid")"
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || fail "$component" "$component (pid $pid) exited while waiting for $what"
    ((SECONDS < deadline)) || fail "$component" "timed out after ${timeout}s waiting for $what"
    sleep 0.2
  done
}
