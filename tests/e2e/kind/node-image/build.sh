#!/usr/bin/env bash
# Builds a kind node image without Docker and without a registry, for kind's podman
# provider (KIND_EXPERIMENTAL_PROVIDER=podman), and kind itself. Everything is built
# here from the Go module proxy and Debian's apt mirror:
#   kind            sigs.k8s.io/kind@v0.33.0
#   kubeadm, kube-proxy   from the k8s.io/kubernetes modules pinned in tests/cluster/k8s
#                   (kubeadm.go.sum adds the checksums only they need)
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd
#                   tests/cluster/build.sh;  kubelet, pause: tests/cluster/build-node.sh
#   coredns         github.com/coredns/coredns at the version kubeadm pins
#   images          one per name `kubeadm config images list` prints, with podman:
#                   a static binary on scratch; kube-proxy with Debian's iptables too
#   node image      Containerfile: Debian bookworm (tests/image/build.sh's debootstrap
#                   base) + systemd, containerd, runc, CNI plugins + kind's base files
#                   (entrypoint, units) + the binaries + the images (/kind/images, one
#                   gzipped archive each), imported into containerd at boot by
#                   kind-import-images.service
# The node has no kindnetd (kind's CNI image) and no local-path-provisioner: create the
# cluster with kind-config.yaml beside this script (disableDefaultCNI; the image carries
# a bridge CNI config for one node per cluster; kubelet on cgroupfs, cgroup v1 allowed).
#
#   tests/e2e/kind/node-image/build.sh   prints "KIND=<kind binary>" and the image name
#
# Caches in ${REAPER_KIND_CACHE:-~/.cache/reaper-operator/kind}. Needs root (rootful
# podman), podman, go, and localhost/reaper-base/debian:bookworm (tests/image/build.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../../.." && pwd)
cache=${REAPER_KIND_CACHE:-$HOME/.cache/reaper-operator/kind}
kind_version=v0.33.0
base=localhost/reaper-base/debian:bookworm

log() { printf 'node-image/build.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
[[ "$(id -u)" == 0 ]] || die "needs root (rootful podman)"
for tool in podman go python3; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
# Same podman settings as tests/image/build.sh (runc; no rlimit raise).
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HOME/.cache/reaper-operator/images/containers.conf}
[[ -f "$CONTAINERS_CONF" ]] || die "$CONTAINERS_CONF missing: run tests/image/build.sh once"
podman image exists "$base" || die "$base missing: run tests/image/build.sh once (it makes it)"

k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$root/tests/cluster/k8s/go.mod")
[[ -n "$k8s_version" ]] || die "cannot read the pinned k8s.io/kubernetes version"
image=${KIND_NODE_IMAGE:-localhost/kind-node:$k8s_version}
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
start=$SECONDS
step() { log "$1 ($((SECONDS - start)) s)"; }

# --- kind ---------------------------------------------------------------------------
kind_dir=${REAPER_TOOLS:-$HOME/.cache/reaper-operator/tools}/kind-$kind_version
kind_bin=$kind_dir/kind
if [[ ! -x "$kind_bin" ]]; then
  step "kind $kind_version"
  (cd / && GOBIN=$kind_dir CGO_ENABLED=0 go install "sigs.k8s.io/kind@$kind_version")
fi
kind_src=$(cd / && go mod download -json "sigs.k8s.io/kind@$kind_version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
[[ -d "$kind_src/images/base/files" ]] || die "kind's base files not found in $kind_src"

# --- Kubernetes binaries --------------------------------------------------------------
step "control plane and kubelet (tests/cluster/build.sh, build-node.sh)"
control_bin=$("$root/tests/cluster/build.sh" | tail -n 1)
node_dir=$("$root/tests/cluster/build-node.sh" | tail -n 1)
k8s_bin=$cache/k8s-$k8s_version-$(cat "$here/build.sh" "$here/kubeadm.go.sum" "$root/tests/cluster/k8s/go.mod" "$root/tests/cluster/k8s/go.sum" "$root/tests/cluster/node/kubelet.go.sum" <(go version) | sha256sum | cut -c1-12)
if [[ ! -x "$k8s_bin/kubeadm" || ! -x "$k8s_bin/kube-proxy" ]]; then
  step "kubeadm and kube-proxy $k8s_version (about 5 min on 2 cores)"
  minor=${k8s_version#v1.}
  minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  # As build-node.sh: a copy of k8s/go.mod with the extra checksums; nothing is resolved anew.
  mod=$cache/mod-partial
  rm -rf "$mod" "$k8s_bin"
  mkdir -p "$mod" "$k8s_bin.partial"
  cp "$root/tests/cluster/k8s/go.mod" "$mod/go.mod"
  cat "$root/tests/cluster/k8s/go.sum" "$root/tests/cluster/node/kubelet.go.sum" "$here/kubeadm.go.sum" >"$mod/go.sum"
  (cd "$root/tests/cluster/k8s" && CGO_ENABLED=0 go build -mod=readonly -modfile="$mod/go.mod" -trimpath \
    -ldflags="$ldflags" -o "$k8s_bin.partial/" k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy)
  mv "$k8s_bin.partial" "$k8s_bin"
  rm -rf "$mod"
fi
kubeadm=$k8s_bin/kubeadm

# The images kubeadm of this version expects (its static pods, kube-proxy, CoreDNS, pause).
mapfile -t wanted < <("$kubeadm" config images list --kubernetes-version "$k8s_version")
coredns_version=
for name in "${wanted[@]}"; do
  [[ "$name" == */coredns:* ]] && coredns_version=${name##*:}
done
[[ -n "$coredns_version" ]] || die "kubeadm lists no CoreDNS image: ${wanted[*]}"
coredns_bin=$cache/coredns-$coredns_version/coredns
if [[ ! -x "$coredns_bin" ]]; then
  step "coredns $coredns_version (module downloads + about 5 min on 2 cores)"
  (cd / && GOBIN=$cache/coredns-$coredns_version CGO_ENABLED=0 go install -trimpath -ldflags='-s -w' \
    "github.com/coredns/coredns@$coredns_version")
fi

# --- component images -------------------------------------------------------------------
work=$cache/context
rm -rf "$work"
mkdir -p "$work/images" "$work/bin" "$work/files"
for name in "${wanted[@]}"; do
  component=${name%:*}
  component=${component##*/}
  case $component in
    etcd | kube-apiserver | kube-controller-manager | kube-scheduler) src=$control_bin/$component ;;
    pause) src=$node_dir/bin/pause ;;
    coredns) src=$coredns_bin ;;
    kube-proxy) src=$k8s_bin/kube-proxy ;;
    *) die "no local build for image $name" ;;
  esac
  ctx=$work/img-$component
  mkdir -p "$ctx"
  cp "$src" "$ctx/$component"
  if [[ $component == kube-proxy ]]; then
    cp "$here/kube-proxy.Containerfile" "$ctx/Containerfile"
  else
    printf 'FROM scratch\nENV PATH=/usr/local/bin\nCOPY %s /usr/local/bin/%s\nENTRYPOINT ["/usr/local/bin/%s"]\n' \
      "$component" "$component" "$component" >"$ctx/Containerfile"
  fi
  step "image $name"
  podman build -q --layers --build-arg BASE="$base" -t "$name" "$ctx" >/dev/null
  # One gzipped archive per image for the node's /kind/images (it stays in the node
  # image's layer after the import); podman's copy would only take disk space.
  podman save -q --format docker-archive -o "$work/images/$component.tar" "$name"
  gzip -1 "$work/images/$component.tar"
  podman rmi "$name" >/dev/null
  rm -rf "$ctx"
done

# --- node image ---------------------------------------------------------------------------
cp -r "$kind_src/images/base/files" "$work/kind-base"
chmod -R u+w "$work/kind-base"
cp -r "$here/files/." "$work/files/"
# Hard links where possible: the context need not hold another copy of them.
for f in "$kubeadm" "$node_dir/bin/kubelet" "$control_bin/kubectl"; do
  ln "$f" "$work/bin/" 2>/dev/null || cp "$f" "$work/bin/"
done
cp "$here/Containerfile" "$work/Containerfile"
step "node image $image"
podman build -q --layers --build-arg BASE="$base" --build-arg KUBE_VERSION="$k8s_version" -t "$image" "$work" >/dev/null
rm -rf "$work"
step "done"
printf 'KIND=%s\n%s\n' "$kind_bin" "$image"
