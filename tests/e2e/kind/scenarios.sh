#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The failover scenarios, on the clusters of tests/e2e/kind/up.sh, in this order:
#   1. delete-leader       kubectl delete the operator pod that holds the lease
#   2. scale-leader-to-0   scale the operator Deployment of the leading cluster to 0
#                          (graceful handover); once the other cluster runs the reaper
#                          pod, scale it back
#   3. cut-leader-from-db  disconnect the leading cluster's nodes from the database's
#                          Docker network (podman: DROP rules in the nodes, see
#                          node_db_path); once the other cluster runs the reaper pod (or
#                          after the bound), reconnect them
#   4. restart-db          docker (or podman) restart of the PostgreSQL container
# For each, the reaper pods of BOTH clusters are sampled every 0.5 s (tests/e2e/lib/
# singleton.sh). Pass: never more than one running+ready reaper pod in a sample, and
# exactly one (the same pod until the end of the observation) at most
# ttl + retry + E2E_SLACK seconds after the fault. Prints a summary with the leaders and
# epochs, and the lease history from the database; exits 1 on any violation.
#
# Environment: E2E_SLACK (pod start slack, seconds, default 20), E2E_DELETE_FLAGS (extra
# flags of the pod deletion in scenario 1, e.g. "--grace-period=0 --force"), E2E_SCENARIOS
# (a subset, e.g. "delete-leader restart-db"), and tests/e2e/kind/config.sh.
set -euo pipefail
# shellcheck source=config.sh
. "$(dirname "${BASH_SOURCE[0]}")/config.sh"
cd "$E2E_REPO"

e2e_need "$E2E_ENGINE" kind kubectl
e2e_singleton_setup
SINGLETON_WORKDIR=${SINGLETON_WORKDIR:-$E2E_STATE/samples-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$SINGLETON_WORKDIR"

ttl=$(singleton_lease_setting "$E2E_MANIFEST" ttlSeconds)
retry=$(singleton_lease_setting "$E2E_MANIFEST" retryPeriodSeconds)
slack=${E2E_SLACK:-20}
bound=$((ttl + retry + slack))
settle=$((ttl + retry + 2))
scenarios=${E2E_SCENARIOS:-delete-leader scale-leader-to-0 cut-leader-from-db restart-db}
read -r -a delete_flags <<<"${E2E_DELETE_FLAGS:-}"

log() { singleton_log "scenarios.sh: $*"; }
opk() { local c=$1; shift; singleton_kubectl "$c" -n "$E2E_OPERATOR_NAMESPACE" "$@"; }
other() { [[ "$1" == "${E2E_CLUSTER_NAMES[0]}" ]] && echo "${E2E_CLUSTER_NAMES[1]}" || echo "${E2E_CLUSTER_NAMES[0]}"; }

# operator_deployment CLUSTER: "deployment.apps/NAME" of the chart's release.
operator_deployment() {
  local names
  names=$(opk "$1" get deployment -l "app.kubernetes.io/instance=$E2E_RELEASE" -o name)
  [[ $(wc -l <<<"$names") -eq 1 && -n "$names" ]] ||
    { log "expected one operator Deployment in cluster $1, found: ${names:-none}"; return 1; }
  echo "$names"
}

# operators_ready: both operator Deployments fully rolled out (every replica ready).
operators_ready() {
  local c
  for c in "${E2E_CLUSTER_NAMES[@]}"; do
    # --request-timeout=0: the watch behind rollout status must outlive the 3 s default.
    opk "$c" rollout status "$(operator_deployment "$c")" --timeout=180s --request-timeout=0 >/dev/null ||
      { log "the operator of cluster $c is not ready"; return 1; }
  done
}

leader() { # prints "CLUSTER IDENTITY EPOCH"
  local holder epoch
  read -r holder epoch < <(singleton_leader) || { log "no Reaper reports Leading"; return 1; }
  echo "${holder%%/*} ${holder#*/} $epoch"
}

delete_leader() {
  local c pod epoch
  read -r c pod epoch < <(leader) || return 1
  log "deleting the leading operator pod $pod in cluster $c (epoch $epoch)"
  singleton_fault_now
  opk "$c" delete pod "$pod" --wait=false ${delete_flags[@]+"${delete_flags[@]}"} || return 1
}

scale_leader_to_0() {
  local c deploy replicas rc=0
  read -r c _ < <(leader) || return 1
  deploy=$(operator_deployment "$c") || return 1
  replicas=$(opk "$c" get "$deploy" -o jsonpath='{.spec.replicas}') || return 1
  log "scaling $deploy in cluster $c to 0 (graceful handover)"
  singleton_fault_now
  opk "$c" scale "$deploy" --replicas=0 || return 1
  singleton_wait_exactly_one "$bound" "$(other "$c")" || rc=1
  log "scaling $deploy in cluster $c back to $replicas"
  opk "$c" scale "$deploy" --replicas="$replicas" || rc=1
  return "$rc"
}

# node_db_path NODE cut|restore: cuts or restores the path from a node (and its pods) to
# the database. Docker: disconnect from / connect to the database network. podman
# forwards between its networks (a disconnected node still reaches the database through
# its kind network's gateway, with or without `--opt isolate=true`), so there the cut is
# a DROP of every packet to the database, in the node's OUTPUT (the node) and FORWARD
# (its pods) chains: open connections hang as with the disconnect.
node_db_path() {
  local node=$1 action=$2 op
  if [[ "$E2E_ENGINE" == podman ]]; then
    [[ $action == cut ]] && op=-I || op=-D
    e2e_engine exec "$node" sh -c "iptables $op OUTPUT -d $E2E_DB_IP -j DROP && iptables $op FORWARD -d $E2E_DB_IP -j DROP"
  elif [[ $action == cut ]]; then
    docker network disconnect "$E2E_DB_NETWORK" "$node"
  else
    docker network connect "$E2E_DB_NETWORK" "$node"
  fi
}

cut_leader_from_db() {
  local c i node nodes rc=0
  read -r c _ < <(leader) || return 1
  i=$(e2e_index "$c")
  nodes=$(e2e_nodes "$i")
  log "cutting cluster $c's nodes ($(echo "$nodes" | tr '\n' ' ')) from the database"
  singleton_fault_now
  for node in $nodes; do node_db_path "$node" cut || rc=1; done
  singleton_wait_exactly_one "$bound" "$(other "$c")" || rc=1
  log "reconnecting cluster $c's nodes"
  for node in $nodes; do node_db_path "$node" restore || rc=1; done
  return "$rc"
}

restart_db() {
  log "restarting the database container $E2E_DB_CONTAINER"
  singleton_fault_now
  e2e_engine restart -t 10 "$E2E_DB_CONTAINER" >/dev/null || return 1
  e2e_wait_db || return 1
  log "PostgreSQL is back"
}

log "ttl ${ttl}s, retry ${retry}s: bound ${bound}s after each fault; samples in $SINGLETON_WORKDIR"
for scenario in $scenarios; do
  operators_ready || true
  case $scenario in
    delete-leader) singleton_scenario "$scenario" "$bound" "$settle" delete_leader || true ;;
    scale-leader-to-0) singleton_scenario "$scenario" "$bound" "$settle" scale_leader_to_0 || true ;;
    cut-leader-from-db) singleton_scenario "$scenario" "$bound" "$settle" cut_leader_from_db || true ;;
    restart-db) singleton_scenario "$scenario" "$bound" "$settle" restart_db || true ;;
    *) log "unknown scenario $scenario"; exit 2 ;;
  esac
done

echo
for c in "${E2E_CLUSTER_NAMES[@]}"; do
  echo "--- cluster $c"
  singleton_kubectl "$c" -n "$E2E_NAMESPACE" get reapers,deploy || true
done
echo "===== lease history (lease_event) ====="
e2e_engine exec "$E2E_DB_CONTAINER" psql -X -U reaper -d reaper -c \
  "select epoch, kind, holder, previous_holder, to_char(at, 'HH24:MI:SS.MS') as at from lease_event where name = '$E2E_NAMESPACE.e2e-reaper' order by id" || true
singleton_summary
