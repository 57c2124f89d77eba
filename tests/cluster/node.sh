#!/usr/bin/env bash
# A real node (kubelet + containerd + runc) beside the kwok node of a local control plane
# started by tests/cluster/up.sh. Root only; one real node per machine at a time.
#
#   tests/cluster/node.sh up NAME        joins the node to cluster NAME; waits for Ready;
#                                        prints the node.env path as the LAST stdout line
#   tests/cluster/node.sh forward PORT   makes 127.0.0.1:PORT on the host (e.g. a test
#                                        PostgreSQL) reachable from the node's namespace
#                                        and its pods at HOST_IP:PORT
#   tests/cluster/node.sh import ARCHIVE loads an OCI or docker image archive (e.g. from
#                                        `podman save`) into the node's containerd; pods
#                                        use it with imagePullPolicy: Never
#   tests/cluster/node.sh down [NAME]    removes the node and everything it changed on the
#                                        host (only if it belongs to cluster NAME, when
#                                        given); idempotent, also after a crash
#
# containerd and kubelet run inside a network namespace created here (NETNS below), joined
# to the host by a veth pair: the node IP, hostNetwork pods, the pod bridge and kubelet's
# iptables chains live there, and the namespace has no default route, so nothing in it
# can reach any address but the host end of the veth. Forwarders (socat) carry
#   node namespace 10.0.0.1:443 (the kubernetes Service) -> HOST_IP:<apiserver port>
#   host HOST_IP:<apiserver port>                        -> 127.0.0.1:<apiserver port>
# (the apiserver listens on loopback only).
#
# State: ${REAPER_CLUSTER_DIR:-/tmp/reaper-clusters}/.real-node/ (logs, containerd and
# kubelet directories, the values of every sysctl kubelet changes as they were before up,
# the fixed host paths that did not exist before up). Binaries and images come from
# tests/cluster/build-node.sh. docs/local-cluster.md ("A real node") lists every host
# change and how down undoes it.
# Environment: REAPER_CLUSTER_DIR, REAPER_CACHE, REAPER_UP_TIMEOUT (seconds per wait, 60),
# REAPER_NODE_WAIT (seconds up waits for another real node to be removed; 0).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"
root="${REAPER_CLUSTER_DIR:-/tmp/reaper-clusters}"
nstate="$root/.real-node"
components="$nstate"
timeout="${REAPER_UP_TIMEOUT:-60}"

# Fixed names and addresses: a second node on the same machine is refused, and a
# crashed run is cleaned up by name.
netns=reaper-node
host_if=rn-host
node_if=rn-node
host_ip=10.213.0.1
node_ip=10.213.0.2
veth_cidr=10.213.0.0/30
pod_cidr=10.214.0.0/24
pod_bridge=rn-cni0
service_ip=10.0.0.1 # up.sh's --service-cluster-ip-range=10.0.0.0/24, first address
node_name=reaper-real-node
# What kubelet's setupKernelTunables sets on the host (global, not per namespace).
sysctls=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
# Fixed host paths containerd, its shims, CNI and kubelet create whatever their config
# says; down removes those that did not exist before up.
fixed_paths=(/run/containerd /var/lib/kubelet /var/log/containers /var/log/pods /var/lib/cni
  /opt/containerd /var/lib/containerd /run/netns)

log() { printf 'node.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
  echo "usage: $0 up NAME | forward PORT | import ARCHIVE | down [NAME]" >&2
  exit 2
}

# stop_pid PID TEXT [GROUP]: SIGTERM (the process group too when GROUP is set), wait up to
# 10 s, then SIGKILL.
stop_pid() {
  local pid="$1" text="$2" group="${3:-}" target
  ours_cmd "$pid" "$text" || return 0
  target="$pid"
  [[ -n "$group" ]] && target="-$pid"
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq 100); do
    ours_cmd "$pid" "$text" || return 0
    sleep 0.1
  done
  log "pid $pid did not stop after SIGTERM; sending SIGKILL"
  kill -KILL -- "$target" 2>/dev/null || true
  for _ in $(seq 50); do
    ours_cmd "$pid" "$text" || return 0
    sleep 0.1
  done
}

# in_ns COMMAND...: COMMAND in the node's network namespace, in the host's mount namespace
# (`ip netns exec` would give it a private mount namespace, and kubelet's volume mounts
# would then be invisible to containerd and runc).
ns_exec=(nsenter --net="/run/netns/$netns" --)
in_ns() { "${ns_exec[@]}" "$@"; }

# start COMPONENT COMMAND...: in the background, in its own session (so its process group
# can be signalled as a whole), logging to logs/COMPONENT.log, pid in pids/COMPONENT.pid.
start() {
  local component="$1"
  shift
  setsid "$@" </dev/null >"$nstate/logs/$component.log" 2>&1 9>&- &
  echo "$!" >"$nstate/pids/$component.pid"
}

listening() { # listening IP PORT [in_ns]: a TCP listener on IP:PORT
  local cmd=(ss -Hltn "src $1:$2")
  [[ "${3:-}" == in_ns ]] && cmd=(in_ns "${cmd[@]}")
  [[ -n "$("${cmd[@]}" 2>/dev/null)" ]]
}

# ---------------------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------------------

# Mount points at or under DIR, deepest (latest) first, from /proc/self/mountinfo
# (field 5, with its octal escapes decoded).
mounts_under() {
  awk -v dir="$1" '
    function unescape(s,   out, i, c) {
      out = ""
      for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (c == "\\" && substr(s, i + 1, 3) ~ /^[0-7][0-7][0-7]$/) {
          out = out sprintf("%c", (substr(s, i + 1, 1) * 64) + (substr(s, i + 2, 1) * 8) + substr(s, i + 3, 1))
          i += 3
        } else out = out c
      }
      return out
    }
    { p = unescape($5); if (p == dir || index(p, dir "/") == 1) m[n++] = p }
    END { for (i = n - 1; i >= 0; i--) print m[i] }
  ' /proc/self/mountinfo
}

unmount_under() {
  local dir="$1" m left
  for _ in 1 2 3 4 5; do
    left=0
    while IFS= read -r m; do
      left=1
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under "$dir")
    [[ $left -eq 1 ]] || return 0
  done
  [[ -z "$(mounts_under "$dir")" ]] || log "could not unmount: $(mounts_under "$dir" | tr '\n' ' ')"
}

# The kubepods cgroups kubelet created (cgroupfs driver), in every hierarchy.
kubepods_cgroups() {
  local d
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d "$d" ]] && printf '%s\n' "$d"
  done
  return 0
}

# Kills every process left in the kubepods cgroups (the containers), then removes the
# cgroups, deepest first.
remove_kubepods() {
  local cg pid procs
  for _ in 1 2 3 4 5; do
    procs=0
    while IFS= read -r cg; do
      while IFS= read -r pid; do
        procs=1
        kill -KILL "$pid" 2>/dev/null || true
      done < <(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
    done < <(kubepods_cgroups)
    [[ $procs -eq 1 ]] || break
    sleep 0.3
  done
  while IFS= read -r cg; do
    find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ -d "$cg" ]] && log "could not remove cgroup $cg"
  done < <(kubepods_cgroups)
  return 0
}

cmd_down() {
  local want="${1:-}"
  mkdir -p "$root"
  exec 9>"$root/.real-node.lock"
  flock 9
  if [[ -f "$nstate/node.env" && -n "$want" ]]; then
    local owner
    owner="$(sed -n 's/^CLUSTER=//p' "$nstate/node.env")"
    if [[ "$owner" != "$want" ]]; then
      log "the real node belongs to cluster '$owner', not '$want'; leaving it"
      return 0
    fi
  fi
  if [[ ! -d "$nstate" ]]; then
    # Nothing recorded; still remove the fixed-name namespace and veth, which only this
    # script creates (a crash between creating them and writing the state is impossible,
    # the state directory comes first, but be safe).
    if [[ -e "/run/netns/$netns" ]] || ip link show "$host_if" >/dev/null 2>&1; then
      log "no state at $nstate but $netns/$host_if exist; removing them"
      ip netns del "$netns" 2>/dev/null || true
      ip link del "$host_if" 2>/dev/null || true
    else
      log "no real node; nothing to do"
    fi
    return 0
  fi
  local start_time=$SECONDS

  # Remove the Node object while the apiserver may still be there (best effort: the
  # cluster may already be gone).
  if [[ -f "$nstate/node.env" ]]; then
    local bin kubeconfig
    bin="$(sed -n 's/^CLUSTER_BIN=//p' "$nstate/node.env")"
    kubeconfig="$(sed -n 's/^CLUSTER_KUBECONFIG=//p' "$nstate/node.env")"
    if [[ -x "$bin/kubectl" && -f "$kubeconfig" ]]; then
      timeout 10 "$bin/kubectl" --kubeconfig="$kubeconfig" --request-timeout=5s \
        delete node "$node_name" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    fi
  fi

  # kubelet first (it would restart containers), then the containers, their shims,
  # containerd, the forwarders.
  local pidfile
  [[ -f "$nstate/pids/kubelet.pid" ]] && stop_pid "$(<"$nstate/pids/kubelet.pid")" "$nstate/"
  remove_kubepods
  local pid
  for pid in $(pgrep -f -- "containerd-shim-runc-v2 .*$nstate/" || true); do
    stop_pid "$pid" "$nstate/"
  done
  [[ -f "$nstate/pids/containerd.pid" ]] && stop_pid "$(<"$nstate/pids/containerd.pid")" "$nstate/"
  for pidfile in "$nstate"/pids/forward-*.pid; do
    [[ -f "$pidfile" ]] || continue
    stop_pid "$(<"$pidfile")" "$(sed -n 1p "$pidfile.match" 2>/dev/null || echo socat)" group
  done
  # Anything else still running with the state directory on its command line.
  for pid in $(pgrep -f -- "$nstate/" || true); do
    [[ "$pid" == "$$" ]] && continue
    stop_pid "$pid" "$nstate/"
  done

  remove_kubepods
  unmount_under "$nstate"
  # kubelet's pod volumes live under its root dir (inside the state dir); the self
  # bind-mount of that dir is covered too.

  # The namespace takes the veth pair, the pod bridge, the pods' veths and every
  # iptables rule kubelet or CNI made in it. Pod namespaces are under the state dir
  # (netns_mounts_under_state_dir) and were unmounted above.
  if [[ -e "/run/netns/$netns" ]]; then
    ip netns del "$netns" 2>/dev/null || { umount "/run/netns/$netns" 2>/dev/null || true; rm -f "/run/netns/$netns"; }
  fi
  ip link del "$host_if" 2>/dev/null || true

  # Sysctls back to their values before up.
  if [[ -f "$nstate/sysctls.before" ]]; then
    local key value now
    while read -r key value; do
      [[ -n "$key" && -f "/proc/sys/$key" ]] || continue
      now="$(<"/proc/sys/$key")"
      if [[ "$now" != "$value" ]]; then
        echo "$value" >"/proc/sys/$key" || log "could not restore $key to $value"
      fi
    done <"$nstate/sysctls.before"
  fi

  # Fixed paths that did not exist before up.
  if [[ -f "$nstate/absent-paths" ]]; then
    local p
    while IFS= read -r p; do
      [[ -n "$p" && -e "$p" ]] || continue
      if [[ "$p" == /run/netns ]]; then
        # ip netns made it a mount point (possibly twice); only if no namespace is left.
        if [[ -z "$(ls -A /run/netns 2>/dev/null)" ]]; then
          while mountpoint -q /run/netns; do umount /run/netns || break; done
          rmdir /run/netns 2>/dev/null || true
        fi
        continue
      fi
      unmount_under "$p"
      rm -rf -- "$p"
    done <"$nstate/absent-paths"
  fi

  rm -rf -- "$nstate"
  log "down in $((SECONDS - start_time)) s"
}

# ---------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------

# EXIT trap of up: a failed up removes what it made (the lock is released first, since
# cmd_down takes it again).
up_failed() {
  local rc=$?
  [[ $rc -ne 0 ]] || return 0
  log "failed; removing the node"
  flock -u 9
  exec 9>&-
  cmd_down
  exit "$rc"
}

cmd_up() {
  local name="$1"
  local start_time=$SECONDS
  local cstate="$root/$name"
  [[ -f "$cstate/cluster.env" ]] || die "no cluster '$name' at $cstate (start it with tests/cluster/up.sh $name)"
  local tool
  for tool in ip nsenter ss iptables socat containerd containerd-shim-runc-v2 ctr runc openssl flock python3 setsid; do
    command -v "$tool" >/dev/null || die "missing required tool: $tool (apt: containerd runc socat iptables iproute2)"
  done
  for tool in bridge host-local loopback; do
    [[ -x "/usr/lib/cni/$tool" ]] || die "missing CNI plugin /usr/lib/cni/$tool (apt: containernetworking-plugins)"
  done

  # One real node per machine: with REAPER_NODE_WAIT, wait that long for another one to
  # be removed (e.g. a test of another checkout on the same machine).
  mkdir -p "$root"
  exec 9>"$root/.real-node.lock"
  [[ "${REAPER_NODE_WAIT:-0}" =~ ^[0-9]+$ ]] || die "REAPER_NODE_WAIT must be a number of seconds, not '$REAPER_NODE_WAIT'"
  local wait_deadline=$((SECONDS + ${REAPER_NODE_WAIT:-0})) waited=0
  while :; do
    if flock -n 9; then
      [[ -d "$nstate" ]] || break
      flock -u 9
    fi
    if ((SECONDS >= wait_deadline)); then
      local owner=""
      [[ -f "$nstate/node.env" ]] && owner="$(sed -n 's/^CLUSTER=//p' "$nstate/node.env")"
      die "a real node already exists (cluster '${owner:-unknown}', state $nstate); only one at a time: run tests/cluster/node.sh down first"
    fi
    [[ $waited -eq 1 ]] || log "another real node exists; waiting up to ${REAPER_NODE_WAIT}s for it to be removed"
    waited=1
    sleep 1
  done
  [[ ! -e "/run/netns/$netns" ]] || die "network namespace $netns exists; run tests/cluster/node.sh down"
  ! ip link show "$host_if" >/dev/null 2>&1 || die "link $host_if exists; run tests/cluster/node.sh down"
  local cidr
  for cidr in "$veth_cidr" "$pod_cidr"; do
    [[ -z "$(ip -4 route show root "$cidr")" ]] ||
      die "the host already routes $cidr; this node needs it"
    [[ -z "$(ip -4 -o addr show to "$cidr")" ]] || die "an address in $cidr is already on a host interface"
  done

  local BIN="" KUBECONFIG="" APISERVER_PORT=""
  # shellcheck source=/dev/null
  . "$cstate/cluster.env"
  [[ -n "$APISERVER_PORT" && -x "$BIN/kubectl" ]] || die "$cstate/cluster.env lacks APISERVER_PORT or BIN"
  [[ -f "$cstate/pki/ca.key" ]] || die "$cstate/pki/ca.key is missing (the node's certificate is signed by the cluster CA)"
  local kubectl=("$BIN/kubectl" --kubeconfig="$KUBECONFIG")
  "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1 || die "the apiserver of cluster '$name' does not answer"
  local api_pid
  api_pid="$(cat "$cstate/pids/kube-apiserver.pid" 2>/dev/null || true)"
  ours_cmd "$api_pid" "--kubelet-preferred-address-types=InternalIP" ||
    die "cluster '$name' runs no apiserver with --kubelet-preferred-address-types=InternalIP (restart it with this tests/cluster/up.sh)"

  local nodedir
  nodedir="$("$here/build-node.sh" | tail -n 1)" || die "tests/cluster/build-node.sh failed (see above)"
  local PAUSE_IMAGE="" TEST_IMAGE=""
  eval "$(grep -E '^(PAUSE_IMAGE|TEST_IMAGE)=' "$nodedir/complete")"

  # From here on every failure tears down what was made.
  mkdir -p "$nstate"/{pids,logs,pki,cni/net.d,cni/ipam,containerd,kubelet}
  chmod 700 "$nstate"
  trap up_failed EXIT

  # What kubelet changes globally, as it is now.
  local key
  for key in "${sysctls[@]}"; do
    printf '%s %s\n' "$key" "$(<"/proc/sys/$key")"
  done >"$nstate/sysctls.before"
  local p
  for p in "${fixed_paths[@]}"; do
    [[ -e "$p" ]] || printf '%s\n' "$p"
  done >"$nstate/absent-paths"

  cat >"$nstate/node.env" <<EOF
CLUSTER=$name
CLUSTER_BIN=$BIN
CLUSTER_KUBECONFIG=$KUBECONFIG
NODE_NAME=$node_name
NODE_IP=$node_ip
HOST_IP=$host_ip
SERVICE_IP=$service_ip
POD_CIDR=$pod_cidr
NETNS=$netns
APISERVER_PORT=$APISERVER_PORT
CONTAINERD_ADDRESS=$nstate/containerd/containerd.sock
NODE_BIN=$nodedir/bin
PAUSE_IMAGE=$PAUSE_IMAGE
TEST_IMAGE=$TEST_IMAGE
EOF

  # --- network namespace --------------------------------------------------------------
  ip netns add "$netns"
  ip link add "$host_if" type veth peer name "$node_if" netns "$netns"
  ip addr add "$host_ip/30" dev "$host_if"
  ip link set "$host_if" up
  ip -n "$netns" link set lo up
  ip -n "$netns" addr add "$node_ip/30" dev "$node_if"
  ip -n "$netns" link set "$node_if" up
  # The kubernetes Service address, served by the forwarder below (no kube-proxy).
  ip -n "$netns" addr add "$service_ip/32" dev lo
  # No default route on purpose: nothing in the namespace can reach past the host end.

  # --- forwarders -------------------------------------------------------------------------
  start forward-apiserver-host socat "TCP-LISTEN:$APISERVER_PORT,bind=$host_ip,fork,reuseaddr" "TCP:127.0.0.1:$APISERVER_PORT"
  echo "bind=$host_ip" >"$nstate/pids/forward-apiserver-host.pid.match"
  start forward-apiserver-service "${ns_exec[@]}" socat "TCP-LISTEN:443,bind=$service_ip,fork,reuseaddr" "TCP:$host_ip:$APISERVER_PORT"
  echo "bind=$service_ip" >"$nstate/pids/forward-apiserver-service.pid.match"
  wait_for forward-apiserver-host "the apiserver forwarder on $host_ip" listening "$host_ip" "$APISERVER_PORT"
  wait_for forward-apiserver-service "the Service forwarder on $service_ip:443" listening "$service_ip" 443 in_ns

  # --- kubelet's identity: system:node:<name>, signed by the cluster CA --------------------
  local pki="$nstate/pki" cpki="$cstate/pki"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth" >"$pki/kubelet.ext"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout "$pki/kubelet.key" \
    -out "$pki/kubelet.csr" -subj "/O=system:nodes/CN=system:node:$node_name" 2>>"$nstate/logs/openssl.log"
  openssl x509 -req -in "$pki/kubelet.csr" -CA "$cpki/ca.crt" -CAkey "$cpki/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 30 -extfile "$pki/kubelet.ext" \
    -out "$pki/kubelet.crt" 2>>"$nstate/logs/openssl.log"
  cp "$cpki/ca.crt" "$pki/ca.crt"
  chmod 600 "$pki/kubelet.key"
  # The apiserver's certificate names 127.0.0.1 and "kubernetes", not HOST_IP: verify it
  # as "kubernetes" (tls-server-name).
  cat >"$nstate/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $name
  cluster:
    server: https://$host_ip:$APISERVER_PORT
    tls-server-name: kubernetes
    certificate-authority: $pki/ca.crt
users:
- name: system:node:$node_name
  user:
    client-certificate: $pki/kubelet.crt
    client-key: $pki/kubelet.key
contexts:
- name: $name
  context: {cluster: $name, user: "system:node:$node_name"}
current-context: $name
EOF
  chmod 600 "$nstate/kubelet.kubeconfig"

  # --- containerd -------------------------------------------------------------------------
  cat >"$nstate/cni/net.d/10-reaper-node.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "reaper-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$pod_bridge",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$pod_cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$nstate/cni/ipam"
      }
    }
  ]
}
EOF
  local cd="$nstate/containerd"
  cat >"$cd/config.toml" <<EOF
version = 2
root = "$cd/root"
state = "$cd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$cd/containerd.sock"
[ttrpc]
  address = "$cd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$cd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # A negative oom_score_adj needs CAP_SYS_RESOURCE, which root here may lack.
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_hugetlb_controller = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$nstate/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nstate/cni/net.d"
    max_conf_num = 1
EOF
  start containerd "${ns_exec[@]}" containerd --config "$cd/config.toml"
  ctr_() { ctr --address "$cd/containerd.sock" --namespace k8s.io "$@"; }
  wait_for containerd "containerd's socket" ctr_ version
  local image
  for image in pause test; do
    ctr_ images import "$nodedir/images/$image.tar" >>"$nstate/logs/ctr.log" 2>&1 ||
      { show_log ctr; die "ctr images import $nodedir/images/$image.tar failed"; }
  done
  # The list is read whole first: `ctr ... | grep -q` would fail under pipefail whenever
  # grep exits before ctr has written everything (SIGPIPE).
  local images
  images="$(ctr_ images ls -q)"
  for image in "$PAUSE_IMAGE" "$TEST_IMAGE"; do
    grep -qxF "$image" <<<"$images" || die "image $image missing after import (images: ${images//$'\n'/ })"
  done

  # --- kubelet ------------------------------------------------------------------------------
  # Pods get no nameserver: no name is ever looked up through a resolver outside the node.
  : >"$nstate/resolv.conf"
  local kd="$nstate/kubelet"
  cat >"$kd/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The host has cgroup v1 controllers (hybrid layout); kubelet refuses v1 by default.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$cd/containerd.sock
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
podLogsDir: $kd/pod-logs
volumePluginDir: $kd/volume-plugins
resolvConf: $nstate/resolv.conf
clusterDomain: cluster.local
# Imported images cannot be pulled again: never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 87600h
# Absolute floors: on a large shared disk 1 % is gigabytes, and a test pod evicted for
# disk pressure another process caused would fail the test for nothing.
evictionHard:
  memory.available: 1Mi
  nodefs.available: 200Mi
  nodefs.inodesFree: 1%
  imagefs.available: 200Mi
  imagefs.inodesFree: 1%
serializeImagePulls: false
maxPods: 20
EOF
  start kubelet "${ns_exec[@]}" "$nodedir/bin/kubelet" \
    --config="$kd/config.yaml" \
    --kubeconfig="$nstate/kubelet.kubeconfig" \
    --root-dir="$kd/root" \
    --cert-dir="$kd/pki" \
    --hostname-override="$node_name" \
    --node-ip="$node_ip" \
    --node-labels="type=real,reaper-operator.dev/real-node=true" \
    --v=1
  node_ready() {
    [[ "$("${kubectl[@]}" get node "$node_name" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" == True ]]
  }
  wait_for kubelet "Node $node_name to become Ready" node_ready

  trap - EXIT
  log "node $node_name ($node_ip) Ready in $((SECONDS - start_time)) s, joined to cluster '$name'"
  log "remove with: $here/node.sh down"
  printf '%s\n' "$nstate/node.env"
}

# forward PORT: host HOST_IP:PORT -> 127.0.0.1:PORT, for pods of the node (e.g. PostgreSQL).
cmd_forward() {
  local port="$1"
  if [[ ! "$port" =~ ^[0-9]{1,5}$ ]] || ((port < 1 || port > 65535)); then
    die "PORT must be a TCP port number, not '$port'"
  fi
  [[ -f "$nstate/node.env" ]] || die "no real node (tests/cluster/node.sh up NAME first)"
  exec 9>"$root/.real-node.lock"
  flock 9
  if listening "$host_ip" "$port"; then
    log "$host_ip:$port is already forwarded"
  else
    start "forward-$port" socat "TCP-LISTEN:$port,bind=$host_ip,fork,reuseaddr" "TCP:127.0.0.1:$port"
    echo "bind=$host_ip" >"$nstate/pids/forward-$port.pid.match"
    wait_for "forward-$port" "the forwarder on $host_ip:$port" listening "$host_ip" "$port"
  fi
  printf '%s:%s\n' "$host_ip" "$port"
}

# import ARCHIVE: into the node's containerd (namespace k8s.io, where kubelet looks).
cmd_import() {
  local archive="$1"
  [[ -f "$archive" ]] || die "no image archive at $archive"
  [[ -f "$nstate/node.env" ]] || die "no real node (tests/cluster/node.sh up NAME first)"
  ctr --address "$nstate/containerd/containerd.sock" --namespace k8s.io \
    images import --all-platforms "$archive" >&2 || die "ctr images import $archive failed"
}

[[ "$(id -u)" == 0 ]] || die "a real node needs root (network namespace, mounts, cgroups)"
case "${1:-}" in
  up)
    if [[ $# -ne 2 ]] || ! valid_name "$2"; then usage; fi
    cmd_up "$2"
    ;;
  forward) [[ $# -eq 2 ]] || usage; cmd_forward "$2" ;;
  import) [[ $# -eq 2 ]] || usage; cmd_import "$2" ;;
  down)
    [[ $# -le 2 ]] || usage
    [[ $# -eq 1 ]] || valid_name "$2" || usage
    cmd_down "${2:-}"
    ;;
  *) usage ;;
esac
