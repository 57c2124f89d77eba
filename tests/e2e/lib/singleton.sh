# shellcheck shell=bash
# The checking logic of the failover tests, shared by the kind kit (tests/e2e/kind/) and
# the local-control-plane check (tests/e2e/local/check.sh): count the singleton's ready
# pods in every cluster, decide "at most one", wait for "exactly one", sample
# continuously while a fault is injected, and judge each scenario.
#
# Source this file, set the variables, register the clusters, then call the functions:
#
#   SINGLETON_KUBECTL    kubectl command (default: kubectl)
#   SINGLETON_NAMESPACE  namespace of the singleton Deployment and its Reaper (required)
#   SINGLETON_REAPER     name of the Reaper in that namespace (required)
#   SINGLETON_POD_LABEL  KEY=VALUE label of the singleton's pods (required)
#   SINGLETON_INTERVAL   seconds between samples (default 0.5)
#   SINGLETON_REQUEST_TIMEOUT  kubectl --request-timeout per call (default 3s)
#   SINGLETON_CACHE_DIR  optional kubectl --cache-dir
#   SINGLETON_WORKDIR    where sample files go (default: a new temporary directory)
#
#   singleton_add_cluster NAME KUBECONFIG [CONTEXT]
#       NAME is the operator's cluster name (the part before "/" in the lease holder);
#       an empty KUBECONFIG means kubectl's default.
#
# A pod counts when its phase is Running and its Ready condition is True, terminating or
# not (a terminating container may still be acting). A cluster whose API server does not
# answer is "unknown" ("?") in that sample: unknown never proves a violation, and it
# breaks a run of "exactly one".
#
# Needs bash 3.2+ (no associative arrays), awk, and sleep with fractions (GNU or BSD).

SINGLETON_KUBECTL=${SINGLETON_KUBECTL:-kubectl}
SINGLETON_INTERVAL=${SINGLETON_INTERVAL:-0.5}
SINGLETON_REQUEST_TIMEOUT=${SINGLETON_REQUEST_TIMEOUT:-3s}
SINGLETON_CACHE_DIR=${SINGLETON_CACHE_DIR:-}
SINGLETON_WORKDIR=${SINGLETON_WORKDIR:-}

_singleton_names=()
_singleton_kubeconfigs=()
_singleton_contexts=()
SINGLETON_SAMPLER_PID=""
SINGLETON_SAMPLER_FILE=""
SINGLETON_FAULT_MS=""
SINGLETON_RESULTS=()
SINGLETON_FAILED=0

singleton_add_cluster() {
  _singleton_names+=("$1")
  _singleton_kubeconfigs+=("${2:-}")
  _singleton_contexts+=("${3:-}")
}

singleton_clusters() { printf '%s\n' "${_singleton_names[@]}"; }

# singleton_now_ms: wall-clock milliseconds since the epoch.
singleton_now_ms() {
  if [[ -n "${EPOCHREALTIME:-}" ]]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo $((10#$t / 1000))
  elif date +%N | grep -q '^[0-9]'; then
    date +%s%3N
  else
    perl -MTime::HiRes=time -e 'printf "%d\n", time() * 1000'
  fi
}

# singleton_lease_setting MANIFEST KEY: a lease setting (ttlSeconds, ...) of the Reaper
# in MANIFEST, so that bounds follow the manifest.
singleton_lease_setting() { awk -v k="$2:" '$1 == k { print $2; exit }' "$1"; }

# singleton_log MESSAGE...: a timestamped progress line on stderr.
singleton_log() {
  local ms
  ms=$(singleton_now_ms)
  printf '[%s.%03d] %s\n' "$(date -u +%H:%M:%S)" $((ms % 1000)) "$*" >&2
}

# singleton_kubectl NAME ARGS...: kubectl against that cluster.
singleton_kubectl() {
  local name=$1 i
  shift
  for i in "${!_singleton_names[@]}"; do
    if [[ "${_singleton_names[$i]}" == "$name" ]]; then
      local args=(--request-timeout="$SINGLETON_REQUEST_TIMEOUT")
      [[ -n "${_singleton_kubeconfigs[$i]}" ]] && args+=(--kubeconfig="${_singleton_kubeconfigs[$i]}")
      [[ -n "${_singleton_contexts[$i]}" ]] && args+=(--context="${_singleton_contexts[$i]}")
      [[ -n "$SINGLETON_CACHE_DIR" ]] && args+=(--cache-dir="$SINGLETON_CACHE_DIR")
      "$SINGLETON_KUBECTL" "${args[@]}" "$@"
      return
    fi
  done
  echo "singleton_kubectl: unknown cluster '$name'" >&2
  return 2
}

# singleton_observe NAME: one API call; prints
#   pod NAME PHASE READY TERMINATING(0|1)     for each pod with SINGLETON_POD_LABEL
#   reaper PHASE HOLDER EPOCH                 for SINGLETON_REAPER ("-" when unset)
# shellcheck disable=SC2016 # $m and $r are Go template variables, not shell ones
singleton_observe() {
  local key=${SINGLETON_POD_LABEL%%=*} value=${SINGLETON_POD_LABEL#*=}
  local template
  template='{{range .items}}'
  template+='{{if eq .kind "Pod"}}{{$m := ""}}{{with .metadata.labels}}{{$m = printf "%v" (index . "'"$key"'")}}{{end}}'
  template+='{{if eq $m "'"$value"'"}}{{$r := "False"}}{{with .status}}{{range .conditions}}{{if eq .type "Ready"}}{{$r = .status}}{{end}}{{end}}{{end}}'
  template+='pod {{.metadata.name}} {{with .status}}{{or .phase "Pending"}}{{else}}Pending{{end}} {{$r}} {{if .metadata.deletionTimestamp}}1{{else}}0{{end}}{{"\n"}}{{end}}'
  template+='{{else if eq .metadata.name "'"$SINGLETON_REAPER"'"}}reaper'
  template+='{{with .status}} {{or .phase "-"}} {{or .holder "-"}} {{or .epoch "-"}}{{else}} - - -{{end}}{{"\n"}}{{end}}'
  template+='{{end}}'
  singleton_kubectl "$1" get pods,reapers.pglease.dev -n "$SINGLETON_NAMESPACE" -o go-template="$template"
}

# singleton_sample: one sample of every cluster, one line:
#   MS TOTAL NAME=COUNT:POD,POD ... NAME@PHASE:HOLDER:EPOCH ...
# COUNT is the number of ready pods ("?" when that cluster did not answer), POD a ready
# pod's name ("~" appended when terminating, "-" for none); TOTAL the sum over the
# clusters that answered ("?" when none did). Never fails.
singleton_sample() {
  local ms name out counts="" reapers="" total=0 known=0
  ms=$(singleton_now_ms)
  for name in "${_singleton_names[@]}"; do
    if out=$(singleton_observe "$name" 2>/dev/null); then
      local line
      line=$(printf '%s\n' "$out" | awk -v n="$name" '
        $1 == "pod" && $3 == "Running" && $4 == "True" {
          c++; pods = pods (pods == "" ? "" : ",") $2 ($5 == "1" ? "~" : "")
        }
        $1 == "reaper" { r = $2 ":" $3 ":" $4 }
        END {
          if (pods == "") pods = "-"
          if (r == "") r = "-:-:-"
          printf "%d %s=%d:%s %s@%s\n", c, n, c, pods, n, r
        }')
      local c=${line%% *}
      line=${line#* }
      counts+=" ${line%% *}"
      reapers+=" ${line#* }"
      total=$((total + c))
      known=$((known + 1))
    else
      counts+=" $name=?:-"
      reapers+=" $name@?:?:?"
    fi
  done
  [[ $known -gt 0 ]] || total="?"
  echo "$ms $total$counts$reapers"
}

# singleton_counts: "TOTAL ALL_KNOWN(0|1) NAME=COUNT..." of a fresh sample (taken from the
# running sampler when there is one, so that waiting adds no API load).
singleton_counts() {
  _singleton_fresh_sample | awk '{
    all = 1; s = ""
    for (i = 3; i <= NF; i++) if ($i ~ /=/) {
      split($i, kv, ":"); s = s " " kv[1]; if (kv[1] ~ /=[?]$/) all = 0
    }
    print $2, all s
  }'
}

_singleton_fresh_sample() {
  if [[ -n "$SINGLETON_SAMPLER_PID" ]] && kill -0 "$SINGLETON_SAMPLER_PID" 2>/dev/null; then
    local since last
    since=$(singleton_now_ms)
    for _ in $(seq 100); do
      last=$(tail -n 1 "$SINGLETON_SAMPLER_FILE" 2>/dev/null || true)
      if [[ -n "$last" && "${last%% *}" -ge "$since" ]]; then
        printf '%s\n' "$last"
        return 0
      fi
      sleep 0.1
    done
  fi
  singleton_sample
}

# singleton_at_most_one: true when the clusters that answered have at most one ready
# singleton pod in total (a fresh sample).
singleton_at_most_one() {
  local total
  read -r total _ < <(singleton_counts)
  [[ "$total" == "?" || "$total" -le 1 ]]
}

# singleton_exactly_one [NAME]: true when every cluster answered and exactly one ready
# singleton pod runs in total (in cluster NAME, if given).
singleton_exactly_one() {
  local want=${1:-} total all rest
  read -r total all rest < <(singleton_counts)
  [[ "$all" == 1 && "$total" == 1 ]] || return 1
  [[ -z "$want" ]] || [[ " $rest " == *" $want=1 "* ]]
}

# singleton_wait_exactly_one TIMEOUT_SECONDS [NAME]: wait for singleton_exactly_one.
singleton_wait_exactly_one() {
  local timeout=$1 want=${2:-} deadline
  deadline=$(($(singleton_now_ms) + timeout * 1000))
  until singleton_exactly_one "$want"; do
    if (($(singleton_now_ms) >= deadline)); then
      singleton_log "timed out after ${timeout}s waiting for exactly one ready pod${want:+ in cluster $want}; last sample: $(singleton_sample)"
      return 1
    fi
    sleep "$SINGLETON_INTERVAL"
  done
}

# singleton_leader: prints "HOLDER EPOCH" as reported by a Reaper in phase Leading (the
# holder is "<cluster>/<identity>"); fails when no cluster reports Leading.
singleton_leader() {
  _singleton_fresh_sample | awk '{
    for (i = 3; i <= NF; i++) if ($i ~ /@Leading:/) {
      split(substr($i, index($i, "@") + 1), r, ":"); print r[2], r[3]; found = 1; exit
    }
  } END { exit found ? 0 : 1 }'
}

# singleton_sampler_start FILE: sample every SINGLETON_INTERVAL seconds into FILE, in the
# background, until singleton_sampler_stop.
singleton_sampler_start() {
  SINGLETON_SAMPLER_FILE=$1
  : >"$SINGLETON_SAMPLER_FILE"
  local interval_ms
  interval_ms=$(awk -v s="$SINGLETON_INTERVAL" 'BEGIN { printf "%d", s * 1000 }')
  (
    trap - EXIT INT TERM
    while :; do
      start=$(singleton_now_ms)
      singleton_sample >>"$SINGLETON_SAMPLER_FILE"
      left=$((interval_ms - ($(singleton_now_ms) - start)))
      if ((left > 0)); then sleep "$(printf '%d.%03d' $((left / 1000)) $((left % 1000)))"; fi
    done
  ) &
  SINGLETON_SAMPLER_PID=$!
}

singleton_sampler_stop() {
  if [[ -n "$SINGLETON_SAMPLER_PID" ]]; then
    kill "$SINGLETON_SAMPLER_PID" 2>/dev/null || true
    wait "$SINGLETON_SAMPLER_PID" 2>/dev/null || true
    SINGLETON_SAMPLER_PID=""
  fi
}

# singleton_fault_now: called by a scenario action right before it injects the fault;
# the scenario's bound is measured from this moment.
singleton_fault_now() {
  SINGLETON_FAULT_MS=$(singleton_now_ms)
  singleton_log "fault injected"
}

# singleton_judge FILE FAULT_MS BOUND_SECONDS NAME: reads the samples, prints the verdict
# line (PASS/FAIL) and the details of any overlap; fails on a violation:
#   - a sample with more than one ready pod in total (the clusters that answered), or
#   - no run of "exactly one ready pod, the same pod" (every cluster answering) that
#     starts at most BOUND_SECONDS after the fault and lasts to the last sample.
singleton_judge() {
  awk -v fault="$2" -v bound="$3" -v name="$4" '
    function rel(ms) { return sprintf("%+.1f", (ms - fault) / 1000) }
    # state of the Leading cluster in this sample, "HOLDER#EPOCH", or "none"
    function leading(   i, r) {
      for (i = 3; i <= NF; i++) if ($i ~ /@Leading:/) {
        split(substr($i, index($i, "@") + 1), r, ":"); return r[2] "#" r[3]
      }
      return "none"
    }
    function pods(   i, s, kv, c) {
      s = ""
      for (i = 3; i <= NF; i++) if ($i ~ /=/) {
        split($i, kv, ":"); split(kv[1], c, "=")
        if (kv[2] != "-") s = s (s == "" ? "" : ",") c[1] ":" kv[2]
      }
      return s == "" ? "-" : s
    }
    {
      n++; t = $1; known_sum = 0; all = 1
      for (i = 3; i <= NF; i++) if ($i ~ /=/) {
        split($i, kv, ":"); split(kv[1], c, "=")
        if (c[2] == "?") all = 0; else known_sum += c[2]
      }
      if (!all) unknown++
      if (known_sum > max) max = known_sum
      if (known_sum > 1) {
        overlaps++
        if (!in_overlap) { windows++; wstart[windows] = t; wdetail[windows] = $0 }
        wend[windows] = t; wcount[windows]++; in_overlap = 1
      } else in_overlap = 0
      # the current run of "exactly one ready pod, the same one"
      if (all && known_sum == 1) {
        key = pods(); gsub(/~/, "", key)
        if (run_start == "" || key != run_pods) { run_start = t; run_pods = key }
      } else run_start = ""
      if (t >= fault && all && known_sum == 0) {
        if (gap_start == "") gap_start = t
      } else if (gap_start != "") {
        if (t - gap_start > gap) gap = t - gap_start
        gap_start = ""
      }
      if (t < fault) { before = leading(); before_pods = pods() }
      after = leading(); after_pods = pods(); last = t
    }
    END {
      if (n == 0) { printf "FAIL %s: no samples\n", name; exit 1 }
      if (gap_start != "" && last - gap_start > gap) gap = last - gap_start
      ok = 1; why = ""
      if (max > 1) { ok = 0; why = why sprintf("; %d sample(s) with more than one pod", overlaps) }
      if (run_start == "") { ok = 0; why = why "; not exactly one pod at the end" }
      else {
        rec = run_start < fault ? 0 : (run_start - fault) / 1000
        if (rec > bound) { ok = 0; why = why sprintf("; one pod only %.1f s after the fault", rec) }
      }
      if (before == "") { before = "?"; before_pods = "?" }
      printf "%s %s: at most %d pod(s) in %d samples (%d with a cluster unknown); ", \
        ok ? "PASS" : "FAIL", name, max, n, unknown + 0
      if (run_start != "") printf "exactly one %.1f s after the fault (bound %d s)", rec, bound
      else printf "never settled on exactly one (bound %d s)", bound
      note = ""
      if (before_pods == after_pods) note = " (same pod)"
      else if (before == after && before != "none") note = " (pod replaced under the same holder and epoch)"
      printf ", longest gap without a pod %.1f s; %s [%s] -> %s [%s]%s\n", \
        gap / 1000, before, before_pods, after, after_pods, note
      if (why != "") printf "  violation: %s\n", substr(why, 3)
      for (w = 1; w <= windows; w++)
        printf "  overlap %d: %s s .. %s s after the fault (%d sample(s)); first sample: %s\n", \
          w, rel(wstart[w]), rel(wend[w]), wcount[w], wdetail[w]
      exit ok ? 0 : 1
    }' "$1"
}

# singleton_scenario NAME BOUND_SECONDS SETTLE_SECONDS ACTION [ARGS...]
#   1. waits (SINGLETON_READY_TIMEOUT, default 120 s) for exactly one ready pod;
#   2. samples continuously into $SINGLETON_WORKDIR/NAME.samples;
#   3. runs ACTION, which calls singleton_fault_now right before the fault (otherwise the
#      fault time is when ACTION starts), may wait, and undoes the fault before returning;
#   4. keeps sampling until BOUND_SECONDS after the fault and SETTLE_SECONDS after ACTION
#      returned, whichever is later;
#   5. judges the samples (singleton_judge). The verdict goes to SINGLETON_RESULTS; any
#      failure sets SINGLETON_FAILED=1. Returns non-zero on failure.
singleton_scenario() {
  local name=$1 bound=$2 settle=$3
  shift 3
  [[ -n "$SINGLETON_WORKDIR" ]] || SINGLETON_WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/singleton.XXXXXX")
  local file="$SINGLETON_WORKDIR/$name.samples" verdict rc=0 action_rc=0 start end until_ms now
  singleton_log "=== scenario $name: $*"
  if ! singleton_wait_exactly_one "${SINGLETON_READY_TIMEOUT:-120}"; then
    verdict="FAIL $name: precondition: not exactly one ready pod before the fault"
    SINGLETON_RESULTS+=("$verdict")
    SINGLETON_FAILED=1
    singleton_log "$verdict"
    return 1
  fi
  singleton_log "before: leader $(singleton_leader || echo none)"
  singleton_sampler_start "$file"
  sleep 2
  SINGLETON_FAULT_MS=""
  start=$(singleton_now_ms)
  "$@" || action_rc=$?
  end=$(singleton_now_ms)
  [[ -n "$SINGLETON_FAULT_MS" ]] || SINGLETON_FAULT_MS=$start
  until_ms=$((SINGLETON_FAULT_MS + bound * 1000))
  ((end + settle * 1000 > until_ms)) && until_ms=$((end + settle * 1000))
  singleton_log "action done (rc $action_rc); observing until $(((until_ms - SINGLETON_FAULT_MS) / 1000)) s after the fault"
  while now=$(singleton_now_ms) && ((now < until_ms)); do sleep 0.5; done
  singleton_sampler_stop
  verdict=$(singleton_judge "$file" "$SINGLETON_FAULT_MS" "$bound" "$name") || rc=$?
  if [[ $action_rc -ne 0 ]]; then
    rc=1
    verdict="FAIL ${verdict#* }
  the scenario action failed (exit $action_rc)"
  fi
  printf '%s\n' "$verdict" >&2
  singleton_log "after: leader $(singleton_leader || echo none); samples in $file"
  SINGLETON_RESULTS+=("$verdict")
  [[ $rc -eq 0 ]] || SINGLETON_FAILED=1
  return "$rc"
}

# singleton_summary: prints every verdict; fails if any scenario failed.
singleton_summary() {
  echo "===== summary (a pod counts when Running and Ready; sampled every ${SINGLETON_INTERVAL}s) ====="
  local v
  for v in ${SINGLETON_RESULTS[@]+"${SINGLETON_RESULTS[@]}"}; do printf '%s\n' "$v"; done
  if [[ $SINGLETON_FAILED -ne 0 ]]; then
    echo "RESULT: FAIL"
    return 1
  fi
  echo "RESULT: PASS (${#SINGLETON_RESULTS[@]} scenarios)"
}
