# shellcheck shell=bash
# The version stamps of the Kubernetes binaries that build.sh and build-node.sh build;
# sourced, not run. Both hash this file into their cache keys.

# k8s_ldflags VERSION: the -ldflags of a Kubernetes binary of VERSION (v1.N.P): stripped,
# and stamped as a release build would be (without the stamps kubelet reports
# v0.0.0-master, and the apiserver shows that as the Node's kubeletVersion).
k8s_ldflags() {
  local version="$1" minor pkg flags="-s -w"
  minor="${version#v1.}"
  minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  printf '%s\n' "$flags"
}
