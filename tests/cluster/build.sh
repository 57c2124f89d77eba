#!/usr/bin/env bash
# Builds (or reuses) the binaries of the local Kubernetes control plane used by the tests:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm
# from the Go modules pinned in tests/cluster/{k8s,kwok,helm}/go.mod, plus
# share/kwok-stages.yaml (kwok's default node/pod stages, taken from the pinned kwok module).
#
# Binaries go to a cache outside the repository:
#   ${REAPER_CACHE:-$HOME/.cache/reaper-operator}/k8s-<version>-<hash>/bin/
# where <hash> covers every build input (go.mod, go.sum, Go sources, this script and
# k8s-ldflags.sh, the Go version). When that directory is complete the build is skipped. The bin directory is
# printed as the last line of stdout; progress goes to stderr.
#
# Environment: REAPER_CACHE (cache root), GOFLAGS (e.g. -p=1 to use less CPU).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${REAPER_CACHE:-$HOME/.cache/reaper-operator}"

log() { printf 'build.sh: %s\n' "$*" >&2; }
# shellcheck source=k8s-ldflags.sh source-path=SCRIPTDIR
. "$here/k8s-ldflags.sh"

command -v go >/dev/null || { log "go is not on PATH"; exit 1; }

k8s_version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$here/k8s/go.mod")"
if [[ -z "$k8s_version" ]]; then
  k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/k8s/go.mod")"
fi
kwok_version="$(awk '$1 == "sigs.k8s.io/kwok" && $2 ~ /^v/ { print $2; exit }' "$here/kwok/go.mod")"
helm_version="$(awk '$1 == "helm.sh/helm/v3" && $2 ~ /^v/ { print $2; exit }' "$here/helm/go.mod")"
if [[ -z "$k8s_version" || -z "$kwok_version" || -z "$helm_version" ]]; then
  log "cannot read pinned versions (k8s='$k8s_version' kwok='$kwok_version' helm='$helm_version')"
  exit 1
fi

inputs_hash="$(
  {
    go version
    cd "$here"
    for f in build.sh k8s-ldflags.sh k8s/go.mod k8s/go.sum k8s/etcd/main.go kwok/go.mod kwok/go.sum helm/go.mod helm/go.sum; do
      printf '%s\n' "$f"
      cat "$f"
    done
  } | sha256sum | cut -c1-12
)"
dir="$cache_root/k8s-$k8s_version-$inputs_hash"
bin="$dir/bin"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

complete() {
  [[ -f "$dir/complete" && -f "$dir/share/kwok-stages.yaml" ]] || return 1
  local b
  for b in "${binaries[@]}"; do
    [[ -x "$bin/$b" ]] || return 1
  done
}

if complete; then
  printf '%s\n' "$bin"
  exit 0
fi

mkdir -p "$dir"
# Several up.sh may start at once; only one of them builds.
exec 9>"$dir/lock"
flock 9
if complete; then
  printf '%s\n' "$bin"
  exit 0
fi

log "building Kubernetes $k8s_version, kwok $kwok_version, helm $helm_version into $bin"
log "a cold build takes about 10-16 min on 2 cores (plus module downloads); later runs reuse it"
start=$SECONDS
tmp="$dir/bin.partial"
rm -rf "$tmp" "$bin"
mkdir -p "$tmp"

k8s_ldflags="$(k8s_ldflags "$k8s_version")"

export CGO_ENABLED=0

(
  cd "$here/k8s"
  log "etcd"
  go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" ./etcd
  log "kube-apiserver, kube-controller-manager, kube-scheduler, kubectl"
  go build -trimpath -ldflags="$k8s_ldflags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
)
(
  cd "$here/kwok"
  log "kwok"
  go build -trimpath -ldflags="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok_version#v}" \
    -o "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok
  # The kwok binary has no built-in stages (kwokctl normally writes them): take the
  # default ones shipped in the pinned module: node init + heartbeat with lease, pod fast.
  kwok_dir="$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  mkdir -p "$dir/share"
  first=1
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ $first -eq 1 ]] || echo "---"
    first=0
    cat "$kwok_dir/kustomize/stage/$f"
  done >"$dir/share/kwok-stages.yaml"
)
(
  cd "$here/helm"
  log "helm"
  helm_minor="$(awk '$1 == "k8s.io/client-go" && $2 ~ /^v0\./ { split($2, v, "."); print v[2]; exit }' go.mod)"
  helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  if [[ -n "$helm_minor" ]]; then
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
      helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_minor"
    done
  fi
  go build -trimpath -ldflags="$helm_ldflags" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm
)

mv "$tmp" "$bin"
{
  printf 'kubernetes %s\nkwok %s\nhelm %s\n' "$k8s_version" "$kwok_version" "$helm_version"
  go version
  printf 'build seconds %s\n' "$((SECONDS - start))"
} >"$dir/complete"
log "done in $((SECONDS - start)) s"
printf '%s\n' "$bin"
