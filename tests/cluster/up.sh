#!/usr/bin/env bash
# Starts a real local Kubernetes control plane named NAME, without containers:
#   etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok (fake Nodes)
# on free loopback ports, with freshly generated certificates and RBAC on.
#
#   tests/cluster/up.sh NAME      # prints the admin kubeconfig path as the LAST stdout line
#   tests/cluster/down.sh NAME    # stops exactly these processes and removes the state
#
# State (certificates, kubeconfigs, logs, pids, etcd data) lives in
#   ${REAPER_CLUSTER_DIR:-/tmp/reaper-clusters}/NAME/
# Binaries come from tests/cluster/build.sh (built once into a cache, reused afterwards).
# If a component does not come up, this exits non-zero, prints the tail of that
# component's log on stderr and stops what it started (the logs are kept).
# Environment: REAPER_CLUSTER_DIR, REAPER_CACHE, REAPER_UP_TIMEOUT (seconds per wait, 60),
# REAPER_KWOK_STAGES (how kwok finishes Pod deletions):
#   grace (default)  a deleted Pod stays Terminating until its deletionTimestamp, i.e. for
#                    its grace period (terminationGracePeriodSeconds, default 30), or as
#                    long as its pod-delete.stage.kwok.x-k8s.io/delay annotation says
#                    (tests/cluster/kwok/pod-delete-grace.yaml);
#   fast             kwok's own fast stage: deleted Pods vanish at once.
# REAPER_CLUSTER_AUDIT=1 (opt-in, for benches): the apiserver writes an audit log
#   (logs/audit.log, JSON lines, Metadata level) of the requests of group reaper:audited
#   only, and up.sh makes a client certificate of that group (CN=reaper-operator, bound to
#   cluster-admin) with its kubeconfig operator.kubeconfig, so that one process's requests
#   can be counted at the apiserver. Unset or 0: no audit log, no extra identity.
# REAPER_CLUSTER_KCM_QPS=N (opt-in, for benches with thousands of Deployments): the
#   controller-manager's client rate (--kube-api-qps N, burst 2N) instead of its default
#   of 20 requests/s, which starts about 4.5 Deployment pods per second.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"
name="${1:-}"
if ! valid_name "$name"; then
  echo "usage: $0 NAME   (NAME: letters, digits, '.', '_', '-')" >&2
  exit 2
fi
root="${REAPER_CLUSTER_DIR:-/tmp/reaper-clusters}"
state="$root/$name"
components="$state"
timeout="${REAPER_UP_TIMEOUT:-60}"
start_time=$SECONDS

log() { printf 'up.sh[%s]: %s\n' "$name" "$*" >&2; }

kwok_profile="${REAPER_KWOK_STAGES:-grace}"
case "$kwok_profile" in
  grace | fast) ;;
  *) log "REAPER_KWOK_STAGES must be 'grace' or 'fast', not '$kwok_profile'"; exit 2 ;;
esac
audit="${REAPER_CLUSTER_AUDIT:-0}"
case "$audit" in
  0 | 1) ;;
  *) log "REAPER_CLUSTER_AUDIT must be '0' or '1', not '$audit'"; exit 2 ;;
esac
kcm_rate=()
if [[ -n "${REAPER_CLUSTER_KCM_QPS:-}" ]]; then
  if [[ ! "$REAPER_CLUSTER_KCM_QPS" =~ ^[1-9][0-9]{0,4}$ ]]; then
    log "REAPER_CLUSTER_KCM_QPS must be a whole number of requests per second, not '$REAPER_CLUSTER_KCM_QPS'"
    exit 2
  fi
  kcm_rate=(--kube-api-qps="$REAPER_CLUSTER_KCM_QPS" --kube-api-burst="$((2 * REAPER_CLUSTER_KCM_QPS))")
fi

for tool in openssl curl flock; do
  command -v "$tool" >/dev/null || { log "missing required tool: $tool"; exit 1; }
done
python="$(command -v python3 || true)"
[[ -n "$python" ]] || { log "missing required tool: python3 (used to pick free ports)"; exit 1; }

bin="$("$here/build.sh" | tail -n 1)" || { log "tests/cluster/build.sh failed (see above)"; exit 1; }
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok kubectl; do
  [[ -x "$bin/$b" ]] || { log "build.sh did not produce $bin/$b"; exit 1; }
done
default_stages="$bin/../share/kwok-stages.yaml"
grace_stage="$here/kwok/pod-delete-grace.yaml"
[[ -f "$default_stages" ]] || { log "build.sh did not produce $default_stages"; exit 1; }

mkdir -p "$root"

# An old state directory: refuse if its processes still run, otherwise clear it.
if [[ -d "$state" ]]; then
  for pidfile in "$state"/pids/*.pid; do
    [[ -f "$pidfile" ]] || continue
    pid="$(<"$pidfile")"
    if ours_cmd "$pid" "$state/"; then
      log "cluster '$name' is already running (pid $pid); run tests/cluster/down.sh $name first"
      exit 1
    fi
  done
  rm -rf "$state"
fi
mkdir -p "$state"/{pids,logs,pki,etcd,kcm,scheduler,kwok-home}
chmod 700 "$state" "$state/etcd" "$state/pki"

# --- kwok stages ------------------------------------------------------------------------
# build.sh's share/kwok-stages.yaml holds kwok's default stages from the pinned module
# (node initialize + heartbeat with lease, pod ready / complete / delete, "fast" set).
# With the grace profile its pod-delete Stage (delete at once) is replaced by ours (wait
# for the deletionTimestamp): both would match a Terminating Pod, and kwok would pick one
# of them at random.
kwok_stages="$state/kwok-stages.yaml"
if [[ "$kwok_profile" == fast ]]; then
  cp "$default_stages" "$kwok_stages"
else
  # The documents of the multi-document file, except the Stage named pod-delete; exits 3
  # unless exactly one was left out.
  awk '
    function flush() {
      if (doc != "") {
        if (drop) dropped++
        else { printf "%s%s", (kept++ ? "---\n" : ""), doc }
      }
      doc = ""; drop = 0
    }
    /^---[[:space:]]*$/ { flush(); next }
    { doc = doc $0 "\n" }
    /^  name:[[:space:]]*["\047]?pod-delete["\047]?[[:space:]]*$/ { drop = 1 }
    END { flush(); if (dropped != 1) exit 3 }
  ' "$default_stages" >"$kwok_stages" ||
    { log "expected exactly one Stage named pod-delete in $default_stages"; exit 1; }
  { echo "---"; cat "$grace_stage"; } >>"$kwok_stages"
fi

started=()
ok=0
cleanup() {
  if [[ $ok -ne 1 ]]; then
    local pid
    for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${started[@]}"; do
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    done
    log "failed; stopped what was started; logs kept in $state/logs"
  fi
}
trap cleanup EXIT

# start COMPONENT ARGS...: run in the background, log to logs/COMPONENT.log, record the pid.
start() {
  local component="$1"
  shift
  "$@" </dev/null >"$state/logs/$component.log" 2>&1 8>&- &
  local pid=$!
  started+=("$pid")
  echo "$pid" >"$state/pids/$component.pid"
}

# --- certificates -------------------------------------------------------------------
pki="$state/pki"
openssl_quiet() { openssl "$@" 2>>"$state/logs/openssl.log"; }

# ca NAME SUBJECT: a self-signed CA (ca: everything; front-proxy-ca: aggregation layer).
ca() {
  openssl_quiet req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$pki/$1.key" -out "$pki/$1.crt" -days 3650 -subj "$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}
ca ca "/CN=reaper-local-ca-$name"
ca front-proxy-ca "/CN=reaper-local-front-proxy-ca-$name"

# leaf NAME SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES [CA]]: a key and a certificate
# signed by CA (default: ca).
leaf() {
  local file="$1" subject="$2" eku="$3" san="${4:-}" signer="${5:-ca}"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid"
    if [[ -n "$san" ]]; then echo "subjectAltName=$san"; fi
  } >"$pki/$file.ext"
  openssl_quiet req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$pki/$file.key" -out "$pki/$file.csr" -subj "$subject"
  openssl_quiet x509 -req -in "$pki/$file.csr" -CA "$pki/$signer.crt" -CAkey "$pki/$signer.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 365 -extfile "$pki/$file.ext" -out "$pki/$file.crt"
  rm -f "$pki/$file.csr" "$pki/$file.ext"
}

service_cidr="10.0.0.0/24"
leaf apiserver "/CN=kube-apiserver" serverAuth \
  "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
leaf admin "/O=system:masters/CN=kubernetes-admin" clientAuth
leaf controller-manager "/CN=system:kube-controller-manager" clientAuth
leaf scheduler "/CN=system:kube-scheduler" clientAuth
leaf front-proxy-client "/CN=front-proxy-client" clientAuth "" front-proxy-ca
# The apiserver's identity towards kubelets (logs, exec, port-forward) of a real node
# (node.sh); a kwok node never sees it.
leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
if [[ "$audit" == 1 ]]; then
  leaf operator "/O=reaper:audited/CN=reaper-operator" clientAuth
fi
# Service-account token signing key pair.
openssl_quiet genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
openssl_quiet pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
chmod 600 "$pki"/*.key

# --- ports ----------------------------------------------------------------------------
# Port choice and startup are serialized across concurrent up.sh runs, so that two
# clusters starting at once cannot be handed the same free port.
exec 8>"$root/.up.lock"
flock 8

# Ports are taken below the kernel's ephemeral range (ip_local_port_range), so that an
# outgoing connection cannot grab one between this choice and the component's bind; each
# is checked free by binding it.
read -r etcd_port peer_port api_port kcm_port sched_port < <(
  "$python" - <<'EOF'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
ports = []
for candidate in random.sample(range(10000, max(low, 10100)), 400):
    if len(ports) == 5:
        break
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", candidate))
        ports.append(candidate)
    except OSError:
        pass
    finally:
        s.close()
while len(ports) < 5:  # fallback: let the OS choose
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    ports.append(s.getsockname()[1])
    s.close()
print(*ports)
EOF
)
server="https://127.0.0.1:$api_port"

# --- kubeconfigs ------------------------------------------------------------------------
b64() { base64 -w0 <"$1"; }
kubeconfig() {
  local file="$1" user="$2"
  cat >"$state/$file.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $name
  cluster:
    server: $server
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$pki/$file.crt")
    client-key-data: $(b64 "$pki/$file.key")
contexts:
- name: $name
  context:
    cluster: $name
    user: $user
    namespace: default
current-context: $name
EOF
  chmod 600 "$state/$file.kubeconfig"
}
kubeconfig admin "$name-admin"
kubeconfig controller-manager system:kube-controller-manager
kubeconfig scheduler system:kube-scheduler
admin_kubeconfig="$state/admin.kubeconfig"

# --- audit (opt-in) -------------------------------------------------------------------------
# Only the audited group is logged, so the log holds exactly one client's requests. The
# RequestReceived stage is left out: a request is then one ResponseComplete event, and a
# watch one ResponseStarted event when it opens (and one ResponseComplete when it ends).
# The size limit is raised so that lumberjack (default 100 MB) never rotates the file
# under a reader.
audit_args=()
if [[ "$audit" == 1 ]]; then
  kubeconfig operator reaper-operator
  cat >"$state/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  userGroups: ["reaper:audited"]
- level: None
EOF
  audit_args=(
    --audit-policy-file="$state/audit-policy.yaml"
    --audit-log-path="$state/logs/audit.log"
    --audit-log-format=json
    --audit-log-mode=blocking
    --audit-log-maxsize=1000000
  )
fi

cat >"$state/cluster.env" <<EOF
NAME=$name
BIN=$bin
SERVER=$server
KUBECONFIG=$admin_kubeconfig
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$peer_port
APISERVER_PORT=$api_port
CONTROLLER_MANAGER_PORT=$kcm_port
SCHEDULER_PORT=$sched_port
KWOK_STAGES=$kwok_profile
EOF
if [[ "$audit" == 1 ]]; then echo "AUDIT=1" >>"$state/cluster.env"; fi

# --- processes ----------------------------------------------------------------------------
start etcd "$bin/etcd" \
  --name="$name" \
  --data-dir="$state/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" \
  --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-cluster="$name=http://127.0.0.1:$peer_port" \
  --initial-cluster-state=new \
  --unsafe-no-fsync \
  --log-level=warn
wait_for etcd "etcd /health" curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health"

start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="$api_port" \
  --cert-dir="$pki" \
  --tls-cert-file="$pki/apiserver.crt" \
  --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$pki/front-proxy-client.crt" \
  --proxy-client-key-file="$pki/front-proxy-client.key" \
  --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types=InternalIP \
  --service-account-issuer="https://kubernetes.default.svc.cluster.local" \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range="$service_cidr" \
  --authorization-mode=Node,RBAC \
  --allow-privileged=true \
  --enable-priority-and-fairness=false \
  --profiling=false \
  --endpoint-reconciler-type=none \
  "${audit_args[@]}"
# curl_admin PATH: an authenticated GET as the admin user; succeeds on 2xx.
curl_admin() {
  curl -fsS --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$server$1"
}
readyz() { [[ "$(curl_admin /readyz)" == ok ]]; }
wait_for kube-apiserver "kube-apiserver /readyz" readyz

start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig="$state/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$state/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$state/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$kcm_port" \
  --cert-dir="$state/kcm" \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$pki/sa.key" \
  --root-ca-file="$pki/ca.crt" \
  --cluster-signing-cert-file="$pki/ca.crt" \
  --cluster-signing-key-file="$pki/ca.key" \
  "${kcm_rate[@]}" \
  --profiling=false
start kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig="$state/scheduler.kubeconfig" \
  --authentication-kubeconfig="$state/scheduler.kubeconfig" \
  --authorization-kubeconfig="$state/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$sched_port" \
  --leader-elect=false \
  --profiling=false
# kwok reads ~/.kwok/kwok.yaml if present; give it its own HOME so only our config counts.
start kwok env HOME="$state/kwok-home" "$bin/kwok" \
  --kubeconfig="$admin_kubeconfig" \
  --config="$kwok_stages" \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-lease-duration-seconds=40 \
  --cidr=10.244.0.0/16 \
  --node-ip=127.0.0.1

healthz() { [[ "$(curl -ksS --max-time 2 "https://127.0.0.1:$1/healthz")" == ok ]]; }
wait_for kube-controller-manager "kube-controller-manager /healthz" healthz "$kcm_port"
wait_for kube-scheduler "kube-scheduler /healthz" healthz "$sched_port"
flock -u 8

# --- a fake Node, managed by kwok ----------------------------------------------------------
kubectl=("$bin/kubectl" --kubeconfig="$admin_kubeconfig")
cat >"$state/node.yaml" <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/arch: amd64
    kubernetes.io/hostname: kwok-node-0
    kubernetes.io/os: linux
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: ""
    type: kwok
status:
  allocatable:
    cpu: "32"
    memory: 256Gi
    pods: "110"
  capacity:
    cpu: "32"
    memory: 256Gi
    pods: "110"
EOF
"${kubectl[@]}" create -f "$state/node.yaml" >>"$state/logs/kubectl.log" 2>&1 ||
  fail kubectl "could not create the fake Node"
node_ready() {
  [[ "$("${kubectl[@]}" get node kwok-node-0 -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
wait_for kwok "Node kwok-node-0 to become Ready (kwok)" node_ready
wait_for kube-controller-manager "ServiceAccount default/default" curl_admin /api/v1/namespaces/default/serviceaccounts/default
if [[ "$audit" == 1 ]]; then
  "${kubectl[@]}" create clusterrolebinding reaper-audited --clusterrole=cluster-admin \
    --group=reaper:audited >>"$state/logs/kubectl.log" 2>&1 ||
    fail kubectl "could not bind cluster-admin to the audited group"
fi

ok=1
pids=()
for f in "$state"/pids/*.pid; do pids+=("$(basename "$f" .pid)=$(<"$f")"); done
log "up in $((SECONDS - start_time)) s: $server (${pids[*]}; kwok stages: $kwok_profile)"
log "stop with: $here/down.sh $name"
printf '%s\n' "$admin_kubeconfig"
