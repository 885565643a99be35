#!/usr/bin/env bash
# Static checks of the deployment files; no cluster and no Docker engine needed.
#
#   helm lint --strict           the chart, with its defaults and every charts/fedsilo/ci/*-values.yaml
#   helm template + kubernetes-validate --strict, against each of $K8S_VERSIONS (it has no schema
#                                for custom resources, cert-manager's Certificate and the JobSet,
#                                and only warns: tests/test_chart.py checks those against their
#                                CRDs, the JobSet against a pinned copy of its openAPIV3Schema)
#   kubectl kustomize k8s/ + kubernetes-validate, the same way
#   hadolint Dockerfile
#   yamllint on the plain YAML (values, value sets, kustomize base)
#
# The tools come from scripts/install-deploy-tools.sh. Exits non-zero if any check fails.
# The chart's unit tests and the local federation run in pytest (tests/test_chart*.py).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
K8S_VERSIONS=(${K8S_VERSIONS:-1.27.0 1.37.0})
CHART=charts/fedsilo

BIN="$(scripts/install-deploy-tools.sh | tail -n1)" || { echo "check-deploy: cannot install the tools" >&2; exit 1; }
export PATH="$BIN:$PATH"
PYBIN="$(dirname "$(command -v "${PYTHON:-python3}")")"
[[ -n "${VIRTUAL_ENV:-}" ]] && PYBIN="$VIRTUAL_ENV/bin"
export PATH="$PATH:$PYBIN"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

check() {
    local name="$1"
    shift
    if output="$("$@" 2>&1)"; then
        passed=$((passed + 1))
        echo "ok    $name"
    else
        failed=$((failed + 1))
        echo "FAIL  $name"
        echo "$output" | sed 's/^/      /' | tail -n 30
    fi
}

validate() {  # validate FILE: kubernetes-validate --strict against every version
    local version
    for version in "${K8S_VERSIONS[@]}"; do
        kubernetes-validate --quiet --strict -k "$version" "$1" || return 1
    done
}

render_and_validate() {  # render_and_validate NAME [helm args...]
    local out="$work/$1.yaml"
    shift
    helm template fedsilo "$CHART" --namespace fedsilo "$@" >"$out" && validate "$out"
}

value_sets=("$CHART"/ci/*-values.yaml)

check "helm lint --strict (defaults)" helm lint --strict "$CHART"
for values in "${value_sets[@]}"; do
    check "helm lint --strict -f $values" helm lint --strict "$CHART" --values "$values"
done

check "helm template (defaults) | kubernetes-validate ${K8S_VERSIONS[*]}" render_and_validate defaults
for values in "${value_sets[@]}"; do
    name="$(basename "$values" .yaml)"
    check "helm template -f $values | kubernetes-validate ${K8S_VERSIONS[*]}" \
        render_and_validate "$name" --values "$values"
done

kustomize_and_validate() {
    kubectl kustomize k8s/ >"$work/kustomize.yaml" && validate "$work/kustomize.yaml"
}
check "kubectl kustomize k8s/ | kubernetes-validate ${K8S_VERSIONS[*]}" kustomize_and_validate

check "hadolint Dockerfile" hadolint Dockerfile

check "yamllint" yamllint --strict \
    -d "{extends: default, rules: {line-length: {max: 100}, document-start: disable}}" \
    k8s/ "$CHART/values.yaml" "$CHART/Chart.yaml" "$CHART/ci/" docs/examples/

echo "check-deploy: $passed passed, $failed failed"
[[ "$failed" -eq 0 ]]
