#!/usr/bin/env bash
# Lints the Helm chart (helm lint --strict) and its rendered objects with kube-score and checkov, with the chart's defaults
# and with every optional part on (charts/reaper-operator/ci/full-values.yaml). Each
# finding either is fixed in the chart or is waived below by name, with the reason in
# the chart README's "Linters" table; anything else fails the script.
#
# The linters are installed on first use and cached (a new version is a new directory):
#   kube-score  go install from the Go module proxy  -> $REAPER_TOOLS/kube-score-<version>/
#   checkov     pip, in a virtualenv                 -> $REAPER_TOOLS/checkov-venv-<version>/
# REAPER_TOOLS defaults to ${REAPER_CACHE:-$HOME/.cache/reaper-operator}/tools. helm comes
# from tests/cluster/build.sh (the tests' own build, cached).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_SCORE_VERSION=v1.20.0
CHECKOV_VERSION=3.3.30
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion >=1.27).
KUBERNETES_VERSION=v1.27

chart=charts/reaper-operator
cache="${REAPER_CACHE:-$HOME/.cache/reaper-operator}"
tools="${REAPER_TOOLS:-$cache/tools}"

log() { printf 'lint-chart: %s\n' "$*" >&2; }

# --- Waivers: the test or check names, each with its reason in
# charts/reaper-operator/README.md ("Linters"). *_defaults apply to the defaults'
# rendering only, where the full one shows the setting that satisfies them.
kube_score_ignored=(
  # No ephemeral-storage request/limit: the root filesystem is read-only and the only
  # storage the pod uses is its log, which the kubelet rotates; a limit would evict the
  # operator over log volume.
  container-ephemeral-storage-request-and-limit
)
# Also passed to kube-score: --ignore-container-cpu-limit (no CPU limit, by design).
kube_score_ignored_defaults=(
  # imagePullPolicy IfNotPresent by default (image.pullPolicy).
  container-image-pull-policy
  # The NetworkPolicy is off by default (networkPolicy.enabled).
  pod-networkpolicy
)
checkov_skipped=(
  # CKV_K8S_11 "CPU limits should be set": no CPU limit, by design.
  CKV_K8S_11
  # CKV_K8S_35 "Prefer using secrets as files over secrets as environment variables":
  # the operator reads DATABASE_URL from its environment.
  CKV_K8S_35
  # CKV_K8S_38 "Service Account Tokens are only mounted where necessary": the operator
  # talks to the API server with this token.
  CKV_K8S_38
)
checkov_skipped_defaults=(
  # CKV_K8S_15 "Image Pull Policy should be Always" (image.pullPolicy).
  CKV_K8S_15
  # CKV_K8S_43 "Image should use digest" (image.digest).
  CKV_K8S_43
  # CKV2_K8S_6 "pods which lack an associated NetworkPolicy" (networkPolicy.enabled).
  CKV2_K8S_6
)

# --- Tools.
helm_bin() {
  local bin
  bin="$(tests/cluster/build.sh | tail -n 1)"
  printf '%s/helm\n' "$bin"
}

kube_score_bin() {
  local dir="$tools/kube-score-$KUBE_SCORE_VERSION"
  if [[ ! -x "$dir/kube-score" ]]; then
    command -v go >/dev/null || { log "go is not on PATH (needed to build kube-score)"; exit 1; }
    log "building kube-score $KUBE_SCORE_VERSION into $dir"
    mkdir -p "$dir"
    GOBIN="$dir" GOFLAGS=-mod=mod go install "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION" >&2
  fi
  printf '%s/kube-score\n' "$dir"
}

checkov_bin() {
  local venv="$tools/checkov-venv-$CHECKOV_VERSION"
  if [[ ! -f "$venv/complete" ]]; then
    log "installing checkov $CHECKOV_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" >&2
    touch "$venv/complete"
  fi
  printf '%s/bin/checkov\n' "$venv"
}

join_by() {
  local IFS="$1"
  shift
  printf '%s' "$*"
}

helm="$(helm_bin)"
kube_score="$(kube_score_bin)"
checkov="$(checkov_bin)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- helm lint --strict, then render.
for values in "--set database.existingSecret=reaper-db --set clusterName=east" "-f $chart/ci/full-values.yaml"; do
  # shellcheck disable=SC2086 # $values is two flags and their arguments
  out="$("$helm" lint --strict "$chart" $values 2>&1)" || { printf '%s\n' "$out" >&2; exit 1; }
  if grep -q '\[WARNING\]\|\[ERROR\]' <<<"$out"; then
    printf '%s\n' "$out" >&2
    log "helm lint --strict $values: warnings"
    exit 1
  fi
done
"$helm" template reaper-operator "$chart" -n reaper-system \
  --set database.existingSecret=reaper-db --set clusterName=east >"$work/defaults.yaml"
"$helm" template reaper-operator "$chart" -n reaper-system \
  -f "$chart/ci/full-values.yaml" >"$work/full.yaml"

failed=0
for render in defaults full; do
  ignored=("${kube_score_ignored[@]}")
  skipped=("${checkov_skipped[@]}")
  if [[ "$render" == defaults ]]; then
    ignored+=("${kube_score_ignored_defaults[@]}")
    skipped+=("${checkov_skipped_defaults[@]}")
  fi
  log "kube-score $KUBE_SCORE_VERSION: $render"
  if ! "$kube_score" score --output-format ci --exit-one-on-warning \
    --kubernetes-version "$KUBERNETES_VERSION" --ignore-container-cpu-limit \
    --ignore-test "$(join_by , "${ignored[@]}")" \
    "$work/$render.yaml" >"$work/kube-score-$render.txt"; then
    grep -v '^\[OK\]\|^\[SKIPPED\]' "$work/kube-score-$render.txt" >&2 || true
    log "kube-score found problems in the $render rendering"
    failed=1
  fi

  log "checkov $CHECKOV_VERSION: $render"
  # --skip-download and BC_SKIP_MAPPING: checkov runs offline, from its own package only
  # (it would otherwise fetch guidelines from its vendor's service).
  if ! BC_SKIP_MAPPING=TRUE "$checkov" --quiet --compact --framework kubernetes --skip-download \
    --skip-check "$(join_by , "${skipped[@]}")" \
    -f "$work/$render.yaml" >"$work/checkov-$render.txt" 2>&1; then
    cat "$work/checkov-$render.txt" >&2
    log "checkov found problems in the $render rendering"
    failed=1
  fi
done

if [[ "$failed" != 0 ]]; then
  exit 1
fi
log "kube-score and checkov: no findings beyond the waivers in $chart/README.md"
