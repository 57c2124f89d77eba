#!/usr/bin/env bash
# Builds (or reuses) what a real node beside the local control plane needs (node.sh):
#   bin/kubelet       k8s.io/kubernetes/cmd/kubelet from the modules pinned in k8s/go.mod,
#                     with the same version ldflags as build.sh
#   bin/pause         node/pause: the sandbox's pause process, also the test container
#   images/pause.tar  OCI archive of registry.k8s.io/pause:<version kubeadm pins>, built
#                     here from bin/pause (no registry is contacted)
#   images/test.tar   OCI archive of localhost/reaper-node-test:1 (bin/pause as /pause)
# into a node-<hash> directory inside build.sh's cache directory (so it shares its
# Kubernetes version), where <hash> covers this script, k8s-ldflags.sh, node/ and the Go
# version.
# build.sh's own cache key does not change, so adding a node never rebuilds the control
# plane. Prints the node-<hash> directory as the last stdout line; progress on stderr.
#
# Environment: as build.sh (REAPER_CACHE, GOFLAGS).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf 'build-node.sh: %s\n' "$*" >&2; }
# shellcheck source=k8s-ldflags.sh source-path=SCRIPTDIR
. "$here/k8s-ldflags.sh"

command -v go >/dev/null || { log "go is not on PATH"; exit 1; }
command -v python3 >/dev/null || { log "python3 is not on PATH (writes the image archives)"; exit 1; }

control_bin="$("$here/build.sh" | tail -n 1)" || { log "tests/cluster/build.sh failed"; exit 1; }
k8s_dir="$(dirname "$control_bin")"
k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/k8s/go.mod")"
[[ -n "$k8s_version" ]] || { log "cannot read the pinned k8s.io/kubernetes version"; exit 1; }

# The sandbox image name kubeadm of this Kubernetes version pins (constants.PauseVersion):
# kubelet and containerd are configured with it, and it is what other tooling expects.
pause_image="registry.k8s.io/pause:3.10.2"
test_image="localhost/reaper-node-test:1"

inputs_hash="$(
  {
    go version
    cd "$here"
    for f in build-node.sh k8s-ldflags.sh node/go.mod node/kubelet.go.sum node/pause/main.go node/oci-image.py; do
      printf '%s\n' "$f"
      cat "$f"
    done
  } | sha256sum | cut -c1-12
)"
dir="$k8s_dir/node-$inputs_hash"

complete() {
  [[ -f "$dir/complete" && -x "$dir/bin/kubelet" && -x "$dir/bin/pause" &&
    -f "$dir/images/pause.tar" && -f "$dir/images/test.tar" ]]
}
if complete; then
  printf '%s\n' "$dir"
  exit 0
fi
mkdir -p "$dir"
exec 9>"$dir/lock"
flock 9
if complete; then
  printf '%s\n' "$dir"
  exit 0
fi

log "building kubelet $k8s_version and the node images into $dir"
log "a cold kubelet build takes about 5 min on 2 cores when build.sh's packages are cached"
start=$SECONDS
tmp="$dir/partial"
rm -rf "$tmp" "${dir:?}/bin" "${dir:?}/images"
mkdir -p "$tmp/bin" "$tmp/images"

# The same version stamps as build.sh.
k8s_ldflags="$(k8s_ldflags "$k8s_version")"
export CGO_ENABLED=0

# k8s/go.mod already selects every module kubelet needs (it is in k8s.io/kubernetes's
# module graph), but k8s/go.sum lacks the checksums of the few packages only kubelet
# imports: node/kubelet.go.sum adds them, through a copy of go.mod used with -modfile (its
# go.sum is the file beside it), so k8s/go.mod and go.sum (build.sh's cache key) stay as
# they are. -mod=readonly: nothing is resolved anew; a missing checksum fails the build.
mkdir -p "$tmp/mod"
cp "$here/k8s/go.mod" "$tmp/mod/go.mod"
cat "$here/k8s/go.sum" "$here/node/kubelet.go.sum" >"$tmp/mod/go.sum"
(
  cd "$here/k8s"
  log "kubelet"
  go build -mod=readonly -modfile="$tmp/mod/go.mod" -trimpath -ldflags="$k8s_ldflags" \
    -o "$tmp/bin/kubelet" k8s.io/kubernetes/cmd/kubelet
)
(
  cd "$here/node"
  log "pause"
  go build -trimpath -ldflags='-s -w' -o "$tmp/bin/pause" ./pause
)
python3 "$here/node/oci-image.py" "$tmp/images/pause.tar" "$pause_image" "$tmp/bin/pause" /pause
python3 "$here/node/oci-image.py" "$tmp/images/test.tar" "$test_image" "$tmp/bin/pause" /pause

mv "$tmp/bin" "$dir/bin"
mv "$tmp/images" "$dir/images"
rm -rf "$tmp"
{
  printf 'kubernetes %s\nPAUSE_IMAGE=%s\nTEST_IMAGE=%s\n' "$k8s_version" "$pause_image" "$test_image"
  go version
  printf 'build seconds %s\n' "$((SECONDS - start))"
} >"$dir/complete"
log "done in $((SECONDS - start)) s"
printf '%s\n' "$dir"
