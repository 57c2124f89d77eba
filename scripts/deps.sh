#!/usr/bin/env bash
# Checks that the system packages the demo and the tests need are installed: PostgreSQL
# (server binaries), PgBouncer, openssl (test certificates), socat (the primary address of
# a database pair, tests/db/up.sh; a real node's forwarders); with --lint, shellcheck; with
# --image, podman, runc and debootstrap (tests/image/build.sh); with --node, containerd,
# runc, the CNI plugins and iptables (tests/cluster/node.sh, a real kubelet node).
# As root it installs what is missing with apt-get; otherwise it stops at once with the
# exact command to run. Cargo, Go and python3 are expected on the machine already.
#
#   scripts/deps.sh [--lint] [--image] [--node]
set -euo pipefail

missing=()
command -v pgbouncer >/dev/null || missing+=(pgbouncer)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)
command -v socat >/dev/null || missing+=(socat)
for flag in "$@"; do
  case $flag in
    --lint) command -v shellcheck >/dev/null || missing+=(shellcheck) ;;
    --image)
      command -v podman >/dev/null || missing+=(podman)
      command -v runc >/dev/null || missing+=(runc)
      command -v debootstrap >/dev/null || missing+=(debootstrap)
      ;;
    --node)
      command -v containerd >/dev/null || missing+=(containerd)
      command -v runc >/dev/null || missing+=(runc)
      [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
      command -v iptables >/dev/null || missing+=(iptables)
      ;;
    *) echo "scripts/deps.sh: unknown flag $flag" >&2; exit 2 ;;
  esac
done
for tool in cargo go python3; do
  command -v "$tool" >/dev/null || { echo "scripts/deps.sh: $tool is not installed" >&2; exit 1; }
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "scripts/deps.sh: missing packages; install them with:" >&2
  echo "  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "--- installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
