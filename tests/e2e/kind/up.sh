#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Sets up the kind failover kit (needs Docker, kind, kubectl, helm; or podman with
# KIND_EXPERIMENTAL_PROVIDER=podman, see docs/failover-testing.md):
#   - two kind clusters, reaper-a and reaper-b;
#   - the operator image (docker build -t reaper-operator:e2e .; with podman:
#     tests/image/build.sh as localhost/reaper-operator:e2e), loaded into both, and the
#     sample workload's image (busybox), loaded too so that pods start without a pull;
#   - PostgreSQL 15 in a container on its own Docker network, with every node of both
#     clusters attached to that network;
#   - in each cluster: the Secret with the database URL, the chart charts/reaper-operator
#     (clusterName a / b, two replicas), and the singleton of tests/e2e/manifests/ (a
#     Recreate Deployment at 0 replicas + a Reaper; the same lease name in both).
# Then waits until exactly one reaper pod runs across both clusters.
#
#   tests/e2e/kind/up.sh          # idempotent: reuses what already exists
#   tests/e2e/kind/scenarios.sh   # the failover scenarios
#   tests/e2e/kind/down.sh        # removes everything
#
# Environment: see tests/e2e/kind/config.sh (names, image, subnet); E2E_SKIP_BUILD=1 uses
# an existing reaper-operator:e2e image.
set -euo pipefail
# shellcheck source=config.sh
. "$(dirname "${BASH_SOURCE[0]}")/config.sh"
cd "$E2E_REPO"

e2e_need "$E2E_ENGINE" kind kubectl helm
e2e_engine info >/dev/null 2>&1 || { e2e_log "the container engine does not answer ($E2E_ENGINE info)"; exit 1; }

# --- clusters ---------------------------------------------------------------------------------
mkdir -p "$E2E_STATE"
if [[ ! -f "$E2E_STATE/host-sysctls.before" ]] && ! kind get clusters 2>/dev/null | grep -q .; then
  for key in "${E2E_HOST_SYSCTLS[@]}"; do
    printf '%s %s\n' "$key" "$(cat "/proc/sys/$key")"
  done >"$E2E_STATE/host-sysctls.before"
fi
for i in 0 1; do
  name=${E2E_KIND_CLUSTERS[$i]}
  if kind get clusters 2>/dev/null | grep -qx "$name"; then
    e2e_log "kind cluster $name exists"
  else
    e2e_log "creating kind cluster $name"
    args=(create cluster --name "$name" --wait 180s --kubeconfig "$E2E_STATE/create-$name.kubeconfig")
    [[ -z "$E2E_KIND_NODE_IMAGE" ]] || args+=(--image "$E2E_KIND_NODE_IMAGE")
    [[ -z "$E2E_KIND_CONFIG" ]] || args+=(--config "$E2E_KIND_CONFIG")
    mkdir -p "$E2E_STATE"
    kind "${args[@]}"
    rm -f "$E2E_STATE/create-$name.kubeconfig"
  fi
done

# --- images -----------------------------------------------------------------------------------
image="$E2E_IMAGE_REPOSITORY:$E2E_IMAGE_TAG"
if [[ -z "${E2E_SKIP_BUILD:-}" ]]; then
  e2e_log "building $image (the Dockerfile runs cargo build --locked --release)"
  if [[ "$E2E_ENGINE" == podman ]]; then
    # The Dockerfile's base images come from a registry; tests/image/build.sh builds it
    # from local stand-ins.
    REAPER_IMAGE="$image" tests/image/build.sh >/dev/null
  else
    docker build -t "$image" \
      --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" .
  fi
fi
e2e_engine image inspect "$E2E_WORKLOAD_IMAGE" >/dev/null 2>&1 || e2e_engine pull "$E2E_WORKLOAD_IMAGE"
if [[ "$E2E_ENGINE" == podman ]]; then
  # kind's `load docker-image` runs docker; an archive works with every provider.
  archive="$E2E_STATE/images.tar"
  mkdir -p "$E2E_STATE"
  podman save -q -m --format docker-archive -o "$archive" "$image" "$E2E_WORKLOAD_IMAGE"
fi
for i in 0 1; do
  e2e_log "loading $image and $E2E_WORKLOAD_IMAGE into ${E2E_KIND_CLUSTERS[$i]}"
  if [[ "$E2E_ENGINE" == podman ]]; then
    kind load image-archive "$archive" --name "${E2E_KIND_CLUSTERS[$i]}"
  else
    kind load docker-image "$image" "$E2E_WORKLOAD_IMAGE" --name "${E2E_KIND_CLUSTERS[$i]}"
  fi
done
[[ "$E2E_ENGINE" != podman ]] || rm -f "$archive"

# --- database ---------------------------------------------------------------------------------
if ! e2e_engine network inspect "$E2E_DB_NETWORK" >/dev/null 2>&1; then
  e2e_log "creating Docker network $E2E_DB_NETWORK ($E2E_DB_SUBNET)"
  e2e_engine network create --subnet "$E2E_DB_SUBNET" "$E2E_DB_NETWORK" >/dev/null
fi
if ! e2e_engine container inspect "$E2E_DB_CONTAINER" >/dev/null 2>&1; then
  e2e_log "starting $E2E_DB_IMAGE as $E2E_DB_CONTAINER on $E2E_DB_IP"
  # A fixed MAC (Docker's scheme, from the IP): podman gives a restarted container a new
  # one, and the nodes' ARP entries would keep the old one for up to ~30 s, so the
  # restart-db scenario would measure the ARP cache instead of the operator.
  # shellcheck disable=SC2086 # the IP's four numbers
  db_mac=$(printf '02:42:%02x:%02x:%02x:%02x' ${E2E_DB_IP//./ })
  e2e_engine run -d --name "$E2E_DB_CONTAINER" --network "$E2E_DB_NETWORK" --ip "$E2E_DB_IP" \
    --mac-address "$db_mac" -e POSTGRES_USER=reaper -e POSTGRES_PASSWORD="$E2E_DB_PASSWORD" -e POSTGRES_DB=reaper \
    "$E2E_DB_IMAGE" >/dev/null
elif [[ "$(e2e_engine container inspect -f '{{.State.Running}}' "$E2E_DB_CONTAINER")" != true ]]; then
  e2e_engine start "$E2E_DB_CONTAINER" >/dev/null
fi
e2e_wait_db
for i in 0 1; do
  for node in $(e2e_nodes "$i"); do
    if ! e2e_engine container inspect -f '{{json .NetworkSettings.Networks}}' "$node" | grep -q "\"$E2E_DB_NETWORK\""; then
      e2e_log "attaching node $node to $E2E_DB_NETWORK"
      e2e_engine network connect "$E2E_DB_NETWORK" "$node"
    fi
  done
done

# --- operator and singleton in each cluster ---------------------------------------------------
for i in 0 1; do
  kubeconfig=$(e2e_kubeconfig "$i")
  context="kind-${E2E_KIND_CLUSTERS[$i]}"
  k=(kubectl --kubeconfig "$kubeconfig" --context "$context")
  e2e_log "installing the operator in ${E2E_KIND_CLUSTERS[$i]} (clusterName ${E2E_CLUSTER_NAMES[$i]})"
  for ns in "$E2E_OPERATOR_NAMESPACE" "$E2E_NAMESPACE"; do
    "${k[@]}" create namespace "$ns" --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
  done
  "${k[@]}" -n "$E2E_OPERATOR_NAMESPACE" create secret generic "$E2E_DB_SECRET" \
    --from-literal=url="$E2E_DB_URL" --dry-run=client -o yaml | "${k[@]}" apply -f - >/dev/null
  helm upgrade --install "$E2E_RELEASE" charts/reaper-operator \
    --kubeconfig "$kubeconfig" --kube-context "$context" \
    --namespace "$E2E_OPERATOR_NAMESPACE" \
    --set replicaCount=2 \
    --set clusterName="${E2E_CLUSTER_NAMES[$i]}" \
    --set image.repository="$E2E_IMAGE_REPOSITORY" \
    --set image.tag="$E2E_IMAGE_TAG" \
    --set image.pullPolicy=Never \
    --set database.existingSecret="$E2E_DB_SECRET" \
    --set database.urlKey=url \
    --set database.migrate=true \
    --set logFormat=json \
    --set shutdownTimeoutSeconds="$E2E_SHUTDOWN_TIMEOUT" \
    --wait --timeout 5m || {
    e2e_log "the operator did not become ready in ${E2E_KIND_CLUSTERS[$i]}; its pods and last log lines:"
    "${k[@]}" -n "$E2E_OPERATOR_NAMESPACE" get pods -o wide >&2 || true
    "${k[@]}" -n "$E2E_OPERATOR_NAMESPACE" logs -l "app.kubernetes.io/instance=$E2E_RELEASE" --tail=20 --prefix >&2 || true
    exit 1
  }
  "${k[@]}" wait --for condition=established --timeout=60s crd/reapers.pglease.dev >/dev/null
  "${k[@]}" -n "$E2E_NAMESPACE" apply -f "$E2E_MANIFEST"
done

e2e_singleton_setup
e2e_log "waiting for exactly one reaper pod across both clusters"
if ! singleton_wait_exactly_one 180; then
  for i in 0 1; do
    kubectl --kubeconfig "$(e2e_kubeconfig "$i")" -n "$E2E_NAMESPACE" get reapers,deploy,pods -o wide >&2 || true
  done
  exit 1
fi
for i in 0 1; do
  echo "--- ${E2E_KIND_CLUSTERS[$i]}"
  kubectl --kubeconfig "$(e2e_kubeconfig "$i")" -n "$E2E_NAMESPACE" get reapers,deploy
done
e2e_log "ready; run tests/e2e/kind/scenarios.sh"
