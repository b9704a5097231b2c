#!/usr/bin/env bash
# Static checks of everything that goes to a cluster: chart lint/template/validation with default
# and non-default values, the kustomize base (rendered from the chart, checked for drift), every
# sample RltRun against the CRD's schema, and shellcheck of every script. Needs .ci/tools.sh's PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
K8S_VERSION=1.33.0
CHART=charts/rlt-operator
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "--- helm lint / template / kubernetes-validate"
helm lint --strict "$CHART"
helm lint --strict "$CHART" -f .ci/values/nondefault.yaml
helm template rlt-operator "$CHART" --namespace rlt-system >"$tmp/default.yaml"
helm template rlt-operator "$CHART" --namespace rlt-system -f .ci/values/nondefault.yaml >"$tmp/nondefault.yaml"
grep -q 'kind: CustomResourceDefinition' "$tmp/default.yaml"
grep -q 'helm.sh/resource-policy: keep' "$tmp/default.yaml"
if grep -q 'kind: CustomResourceDefinition' "$tmp/nondefault.yaml"; then echo 'crds.install=false still renders the CRD' >&2; exit 1; fi
grep -q -- '--leader-elect' "$tmp/nondefault.yaml"
# prometheus-operator's kinds have no schema in the Kubernetes set; everything else must
# validate strictly.
kubernetes-validate --quiet --strict -k "$K8S_VERSION" "$tmp/default.yaml" "$tmp/nondefault.yaml" 2>&1 \
  | { grep -vE "Couldn't find schema for kind (ServiceMonitor|PodMonitor|PrometheusRule)" || true; } | tee "$tmp/validate.log"
for kind in PodMonitor PrometheusRule NetworkPolicy; do
  grep -q "^kind: $kind" "$tmp/nondefault.yaml" || { echo "the non-default values render no $kind" >&2; exit 1; }
done
grep -q 'rlt-operator.json' "$tmp/nondefault.yaml" || { echo "the non-default values render no dashboard" >&2; exit 1; }
if grep -qE '^(ERROR|WARN)' "$tmp/validate.log"; then exit 1; fi
# values.schema.json rejects a bad value with its name.
if helm template x "$CHART" --set replicaCount=0 >/dev/null 2>"$tmp/err"; then
  echo "values.schema.json accepted replicaCount=0" >&2; exit 1
fi
grep -q replicaCount "$tmp/err"

echo "--- kustomize base is the chart's default render"
scripts/render-kustomize "$tmp/kustomize"
diff -ru manifests/kustomize/base "$tmp/kustomize" || {
  echo "manifests/kustomize/base is stale: run scripts/render-kustomize" >&2; exit 1; }
kubectl kustomize manifests/kustomize/base >"$tmp/kustomized.yaml"
kubernetes-validate --quiet --strict -k "$K8S_VERSION" "$tmp/kustomized.yaml"

echo "--- sample RltRuns against the CRD's openAPIV3Schema"
python3 - crds/rltruns.rlt.dev.yaml "$tmp/rltrun.schema.json" <<'PY'
import json, sys, yaml
crd = yaml.safe_load(open(sys.argv[1]))
(version,) = [v for v in crd["spec"]["versions"] if v["served"]]
schema = version["schema"]["openAPIV3Schema"]
# OpenAPI v3.0 schemas use draft-04's boolean exclusiveMinimum/Maximum.
schema["$schema"] = "http://json-schema.org/draft-04/schema#"
json.dump(schema, open(sys.argv[2], "w"))
PY
kubernetes-validate --quiet --strict -k "$K8S_VERSION" crds/rltruns.rlt.dev.yaml
samples=(manifests/*.yaml)
check-jsonschema --schemafile "$tmp/rltrun.schema.json" "${samples[@]}"

echo "--- docs/rltrun-reference.md is what the CRD generates"
python3 scripts/crd-reference.py crds/rltruns.rlt.dev.yaml >"$tmp/reference.md"
diff -u docs/rltrun-reference.md "$tmp/reference.md" || {
  echo "docs/rltrun-reference.md is stale: python3 scripts/crd-reference.py crds/rltruns.rlt.dev.yaml > docs/rltrun-reference.md" >&2; exit 1; }

echo "--- shellcheck"
shellcheck -x scripts/dev scripts/render-kustomize images/*.sh e2e/kind.sh e2e/local.sh e2e/lib.sh e2e/scale.sh e2e/controlplane/cluster.sh e2e/node/node.sh e2e/kueue/kueue.sh .ci/run .ci/*.sh
echo "manifests: OK"
