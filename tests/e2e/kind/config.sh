# shellcheck shell=bash source-path=SCRIPTDIR disable=SC2034 # the variables are used by the scripts that source this file
# Settings shared by tests/e2e/kind/{up,scenarios,down}.sh. Every value can be overridden
# from the environment. Sourced, not run.

E2E_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)

# The two clusters: kind cluster names and the operator's clusterName in each (the part
# before "/" in the lease holder). kind names its kubectl contexts "kind-<name>".
E2E_KIND_CLUSTERS=("${E2E_KIND_CLUSTER_A:-reaper-a}" "${E2E_KIND_CLUSTER_B:-reaper-b}")
E2E_CLUSTER_NAMES=(a b)
E2E_KIND_NODE_IMAGE=${E2E_KIND_NODE_IMAGE:-} # e.g. kindest/node:v1.33.1; empty: kind's default
E2E_KIND_CONFIG=${E2E_KIND_CONFIG:-} # kind's --config for both clusters; empty: none

# The container engine of kind's nodes and of the database: docker, or podman when kind's
# podman provider is selected (KIND_EXPERIMENTAL_PROVIDER=podman). The podman path loads
# images with `podman save` + `kind load image-archive` (kind's `load docker-image` runs
# docker) and names them as podman does (localhost/...). See docs/failover-testing.md.
if [[ "${KIND_EXPERIMENTAL_PROVIDER:-}" == podman ]]; then
  E2E_ENGINE=podman
  e2e_default_repository=localhost/reaper-operator
  e2e_default_db_image=localhost/reaper-e2e/postgres:15
  # Fully qualified, so that `podman save` writes the name containerd gives busybox:1.36.
  e2e_default_workload_image=docker.io/library/busybox:1.36
else
  E2E_ENGINE=docker
  e2e_default_repository=reaper-operator
  e2e_default_db_image=postgres:15
  e2e_default_workload_image=busybox:1.36
fi

E2E_IMAGE_REPOSITORY=${E2E_IMAGE_REPOSITORY:-$e2e_default_repository}
E2E_IMAGE_TAG=${E2E_IMAGE_TAG:-e2e}
E2E_WORKLOAD_IMAGE=${E2E_WORKLOAD_IMAGE:-$e2e_default_workload_image} # must match tests/e2e/manifests/singleton.yaml

# PostgreSQL runs in a container on its own Docker network with a fixed address; every
# node of both clusters is attached to that network too. Cutting a cluster from the
# database = disconnecting its nodes from this network only: its API server stays
# reachable (kubectl keeps sampling), only the path to the database is gone.
E2E_DB_CONTAINER=${E2E_DB_CONTAINER:-reaper-e2e-db}
E2E_DB_IMAGE=${E2E_DB_IMAGE:-$e2e_default_db_image}
E2E_DB_NETWORK=${E2E_DB_NETWORK:-reaper-e2e-db}
E2E_DB_SUBNET=${E2E_DB_SUBNET:-172.31.250.0/24}
E2E_DB_IP=${E2E_DB_IP:-172.31.250.10}
E2E_DB_PASSWORD=${E2E_DB_PASSWORD:-reaper-e2e}
E2E_DB_URL="postgres://reaper:${E2E_DB_PASSWORD}@${E2E_DB_IP}:5432/reaper"

E2E_RELEASE=${E2E_RELEASE:-reaper-operator}
E2E_OPERATOR_NAMESPACE=${E2E_OPERATOR_NAMESPACE:-reaper-system}
E2E_NAMESPACE=${E2E_NAMESPACE:-reaper-e2e}
E2E_DB_SECRET=reaper-db
E2E_SHUTDOWN_TIMEOUT=${E2E_SHUTDOWN_TIMEOUT:-20}
E2E_MANIFEST=$E2E_REPO/tests/e2e/manifests/singleton.yaml

# Kubeconfigs are written here (the user's ~/.kube/config is not touched).
E2E_STATE=${E2E_STATE:-${TMPDIR:-/tmp}/reaper-e2e-kind}

# e2e_engine ARGS...: docker or podman (E2E_ENGINE), same arguments.
e2e_engine() { "$E2E_ENGINE" "$@"; }

e2e_log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

e2e_need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { e2e_log "missing required tool: $tool"; exit 1; }
  done
}

# e2e_kubeconfig I: writes and prints the kubeconfig of cluster I (0 or 1).
e2e_kubeconfig() {
  local file="$E2E_STATE/${E2E_CLUSTER_NAMES[$1]}.kubeconfig"
  mkdir -p "$E2E_STATE"
  kind get kubeconfig --name "${E2E_KIND_CLUSTERS[$1]}" >"$file"
  chmod 600 "$file"
  printf '%s\n' "$file"
}

# e2e_nodes I: the node containers of cluster I.
e2e_nodes() { kind get nodes --name "${E2E_KIND_CLUSTERS[$1]}"; }

# e2e_index CLUSTER_NAME: 0 for a, 1 for b.
e2e_index() {
  local i
  for i in "${!E2E_CLUSTER_NAMES[@]}"; do
    [[ "${E2E_CLUSTER_NAMES[$i]}" == "$1" ]] && { echo "$i"; return 0; }
  done
  return 1
}

# e2e_singleton_setup: configures tests/e2e/lib/singleton.sh for both clusters.
e2e_singleton_setup() {
  # shellcheck source=../lib/singleton.sh
  . "$E2E_REPO/tests/e2e/lib/singleton.sh"
  SINGLETON_NAMESPACE=$E2E_NAMESPACE
  SINGLETON_REAPER=e2e-reaper
  SINGLETON_POD_LABEL=app.kubernetes.io/name=e2e-reaper
  local i
  for i in 0 1; do
    singleton_add_cluster "${E2E_CLUSTER_NAMES[$i]}" "$(e2e_kubeconfig "$i")" "kind-${E2E_KIND_CLUSTERS[$i]}"
  done
}

# e2e_db_ready: PostgreSQL accepts TCP connections (the image's init phase listens on the
# Unix socket only, so a TCP check waits for the real server).
e2e_db_ready() {
  e2e_engine exec "$E2E_DB_CONTAINER" pg_isready -q -h 127.0.0.1 -U reaper -d reaper >/dev/null 2>&1
}

e2e_wait_db() {
  for _ in $(seq 120); do
    e2e_db_ready && return 0
    sleep 0.5
  done
  e2e_log "PostgreSQL ($E2E_DB_CONTAINER) is not ready after 60 s"
  return 1
}

# Host-wide sysctls a kind node's kubelet sets (its container is privileged and writes the
# host's /proc/sys): vm.overcommit_memory 1, kernel.panic 10, kernel.panic_on_oops 1, and
# the others when they differ. up.sh records them before the first cluster; down.sh puts
# them back (as root).
E2E_HOST_SYSCTLS=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
