#!/usr/bin/env bash
# Builds the operator image from the repository's Dockerfile with podman, without a
# registry, and checks it. The Dockerfile's base images are replaced by local stand-ins
# (build arguments): a Debian bookworm base made with debootstrap, a builder with the
# host's Rust toolchain copied in (builder.Containerfile), and a distroless-like runtime
# (runtime.Containerfile). The bases are built once and kept in podman's storage; the
# cargo registry and target directory are cache mounts, so a rebuild after a source
# change recompiles only the crate.
#
#   tests/image/build.sh     -> builds and checks; prints the image name as the last line
#   REAPER_IMAGE_ARCHIVE=F tests/image/build.sh   also saves the image to F (docker-archive,
#                                                 what `node.sh import` loads)
#
# Checks: runs as 65532:65532, `--help` and `crdgen` run with a read-only root
# filesystem and no capabilities (crdgen's output is crds/reaper.yaml), `run` serves
# /healthz from inside the image while its database is unreachable, no shell in the
# image, the binary copied out by `install-guard` runs as `guard` in another image, and
# the size is at most 40 MB.
#
# Needs root (rootful podman), podman, buildah, runc and debootstrap
# (scripts/deps.sh --image installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${REAPER_IMAGE_CACHE:-$HOME/.cache/reaper-operator/images}
image=${REAPER_IMAGE:-localhost/reaper-operator:test}
base=localhost/reaper-base/debian:bookworm
# A base's tag carries a hash of its Containerfile, so editing one rebuilds it.
base_tag() { sha256sum "$here/$1" | cut -c1-12; }
runtime=localhost/reaper-base/cc-debian12:nonroot-$(base_tag runtime.Containerfile)
max_mb=40

log() { echo "tests/image/build.sh: $*" >&2; }
die() { log "$*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (rootful podman)"
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || die "$tool not found; run scripts/deps.sh --image"
done

# podman's defaults raise rlimits (refused without CAP_SYS_RESOURCE) and use crun (no
# cgroup v1 hybrid support); a config of our own leaves /etc/containers alone.
mkdir -p "$cache"
export CONTAINERS_CONF=$cache/containers.conf
cat >"$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF

started=$SECONDS
if ! podman image exists "$base"; then
  log "making $base with debootstrap (about 1-2 min, once)"
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap.log" >&2; die "debootstrap failed"; }
  tar -C "$rootfs" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi

sysroot=$(cd "$root" && rustc --print sysroot)
rust_version=$(cd "$root" && rustc --version | awk '{ print $2 }')
builder=localhost/reaper-base/rust:$rust_version-bookworm-$(base_tag builder.Containerfile)
if ! podman image exists "$builder"; then
  log "making $builder from the host's toolchain ($sysroot)"
  podman build --quiet --network host --build-arg "BASE=$base" -v "$sysroot:/toolchain:ro" \
    -v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro \
    -t "$builder" -f "$here/builder.Containerfile" "$here" >/dev/null
fi
if ! podman image exists "$runtime"; then
  log "making $runtime"
  podman build --quiet --network host --build-arg "BASE=$base" \
    -t "$runtime" -f "$here/runtime.Containerfile" "$here" >/dev/null
fi
log "bases ready after $((SECONDS - started)) s"

revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
version=$(awk -F'"' '/^version =/ { print $2; exit }' "$root/Cargo.toml")
log "building $image (cargo build --release inside the builder)"
podman build --network host \
  --build-arg "BUILDER_IMAGE=$builder" --build-arg "RUNTIME_IMAGE=$runtime" \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
  -t "$image" "$root" >"$cache/build.log" 2>&1 \
  || { tail -n 40 "$cache/build.log" >&2; die "podman build failed (log: $cache/build.log)"; }
log "built after $((SECONDS - started)) s"

# --- checks
fail() { die "check failed: $*"; }
hardened=(--read-only --cap-drop ALL --security-opt no-new-privileges)
strict=(--rm "${hardened[@]}" --network none)

user=$(podman image inspect --format '{{.Config.User}}' "$image")
[ "$user" = 65532:65532 ] || fail "image user is '$user', not 65532:65532"

help=$(podman run "${strict[@]}" "$image" --help) || fail "--help does not run in the image"
[[ "$help" == *"Usage: reaper-operator"* ]] || fail "--help in the image printed: $help"
podman run "${strict[@]}" "$image" crdgen | cmp -s - "$root/crds/reaper.yaml" \
  || fail "crdgen in the image differs from crds/reaper.yaml"

# No shell: neither runnable nor present in any layer.
if podman run --rm --entrypoint /bin/sh "$image" -c true >/dev/null 2>&1; then
  fail "/bin/sh runs in the image"
fi
container=$(podman create "$image")
shells=$(podman export "$container" | tar -t | grep -E '(^|/)(s?bin/)(ba|da)?sh$' || true)
podman rm "$container" >/dev/null
[ -z "$shells" ] || fail "the image has a shell: $shells"

# `run` as the image's user with a read-only root: /healthz answers while the
# database is unreachable (port 1 on loopback refuses), /readyz says why it is not ready.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
container=$(podman run -d "${hardened[@]}" --network host \
  -e DATABASE_URL=postgres://reaper@127.0.0.1:1/reaper \
  -e REAPER_CLUSTER_NAME=image-check -e REAPER_HTTP_ADDR="127.0.0.1:$port" \
  "$image" run)
cleanup_run() { podman rm -f -t 0 "$container" >/dev/null 2>&1 || true; }
trap cleanup_run EXIT
healthz=""
for _ in $(seq 1 50); do
  healthz=$(python3 - "$port" <<'PY' || true
import sys, urllib.request, urllib.error
port = sys.argv[1]
def get(path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
print(get("/healthz")[0], *get("/readyz"))
PY
)
  [ -n "$healthz" ] && break
  sleep 0.2
done
[[ "$healthz" == "200 503 "*"applying database migrations"* ]] \
  || fail "/healthz and /readyz in the image: '$healthz'; logs: $(podman logs "$container" 2>&1 | tail -n 5)"
process_user=$(podman top "$container" huser | awk 'NR == 2 { print $1 }')
[ "$process_user" = 65532 ] || fail "the process runs as '$process_user', not 65532"
podman stop -t 10 "$container" >/dev/null
cleanup_run
trap - EXIT

# The binary doubles as the workload's guard: `install-guard` copies it out (as an init
# container does into an emptyDir), and the copy runs in another image (here the
# Debian base) as `guard`, resolving host names without the image's libc.
guard_dir=$(mktemp -d)
chmod 0777 "$guard_dir"
podman run --rm "${hardened[@]}" --network none -v "$guard_dir:/reaper" "$image" install-guard /reaper/guard >/dev/null 2>&1 \
  || fail "install-guard cannot copy the binary"
# A listener on loopback stands in for the database: the guard must resolve
# "localhost" (static glibc, no NSS modules in the image) and connect to it.
db_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 - "$db_port" "$guard_dir/connected" <<'PY' &
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
s.settimeout(20)
conn, _ = s.accept()
open(sys.argv[2], "w").write("connected\n")
conn.close()
PY
listener=$!
set +e
guard_out=$(podman run --rm --network host -v "$guard_dir:/reaper:ro" \
  -e "DATABASE_URL=postgres://reaper@localhost:$db_port/reaper" -e RUST_LOG=info "$base" \
  timeout 4 /reaper/guard --lease image.check --cluster-name image-check -- true 2>&1)
guard_code=$?
set -e
kill "$listener" 2>/dev/null || true
wait "$listener" 2>/dev/null || true
connected=$(cat "$guard_dir/connected" 2>/dev/null || true)
rm -rf "$guard_dir"
[ "$guard_code" = 124 ] || fail "the guard in another image exited $guard_code (expected to wait): $guard_out"
[ "$connected" = connected ] \
  || fail "the guard in another image did not connect to localhost:$db_port: $guard_out"

size=$(podman image inspect --format '{{.Size}}' "$image")
size_mb=$(( (size + 1048575) / 1048576 ))
log "image $image: $size_mb MB ($size bytes), user 65532:65532, no shell; total $((SECONDS - started)) s"
[ "$size_mb" -le "$max_mb" ] || fail "the image is $size_mb MB, more than $max_mb MB"
if [ -n "${REAPER_IMAGE_ARCHIVE:-}" ]; then
  rm -f "$REAPER_IMAGE_ARCHIVE"
  podman save --quiet --format docker-archive -o "$REAPER_IMAGE_ARCHIVE" "$image"
  log "saved $image to $REAPER_IMAGE_ARCHIVE"
fi
# Earlier builds' untagged stages (about 1.2 GB each) would fill the disk run by run; a
# day's worth stays as build cache.
podman image prune --force --filter until=24h >/dev/null || true
echo "$image"
