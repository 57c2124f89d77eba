#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Removes what tests/e2e/kind/up.sh created: both kind clusters, the PostgreSQL container,
# its network (Docker's or podman's) and the kubeconfigs in $E2E_STATE. The images are
# kept (docker image rm reaper-operator:e2e, or podman image rm localhost/reaper-operator:e2e,
# to remove the operator's).
set -euo pipefail
# shellcheck source=config.sh
. "$(dirname "${BASH_SOURCE[0]}")/config.sh"

e2e_need "$E2E_ENGINE" kind
for name in "${E2E_KIND_CLUSTERS[@]}"; do
  if kind get clusters 2>/dev/null | grep -qx "$name"; then
    e2e_log "deleting kind cluster $name"
    kind delete cluster --name "$name"
  fi
done
if e2e_engine container inspect "$E2E_DB_CONTAINER" >/dev/null 2>&1; then
  e2e_log "removing $E2E_DB_CONTAINER"
  e2e_engine rm -f -v "$E2E_DB_CONTAINER" >/dev/null
fi
if e2e_engine network inspect "$E2E_DB_NETWORK" >/dev/null 2>&1; then
  e2e_log "removing network $E2E_DB_NETWORK"
  e2e_engine network rm "$E2E_DB_NETWORK" >/dev/null
fi
rm -f "$E2E_STATE"/*.kubeconfig
if [[ -f "$E2E_STATE/host-sysctls.before" ]] && ! kind get clusters 2>/dev/null | grep -q .; then
  if [[ "$(id -u)" == 0 ]]; then
    while read -r key value; do
      if [[ "$(cat "/proc/sys/$key")" != "$value" ]]; then
        e2e_log "restoring $key to $value (a kind node's kubelet changed it)"
        printf '%s\n' "$value" >"/proc/sys/$key"
      fi
    done <"$E2E_STATE/host-sysctls.before"
    rm -f "$E2E_STATE/host-sysctls.before"
  else
    e2e_log "kind nodes' kubelets may have changed host sysctls; as root, compare with $E2E_STATE/host-sysctls.before"
  fi
fi
e2e_log "done (samples, if any, kept in $E2E_STATE)"
