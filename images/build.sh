#!/usr/bin/env bash
# Builds the images named in images/images.env: operator, trainer-cpu, trainer-cuda (default: all).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=images/images.env
. "$ROOT/images/images.env"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator trainer-cpu trainer-cuda)
for t in "${targets[@]}"; do
  case "$t" in
    operator) docker build -f "$ROOT/images/operator.Dockerfile" -t "$OPERATOR_IMAGE" "$ROOT" ;;
    trainer-cpu)
      docker build -f "$ROOT/images/trainer.Dockerfile" -t "$TRAINER_CPU_IMAGE" \
        --build-arg TORCH_VERSION="$TORCH_VERSION" \
        --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu "$ROOT" ;;
    trainer-cuda)
      docker build -f "$ROOT/images/trainer.Dockerfile" -t "$TRAINER_CUDA_IMAGE" \
        --build-arg TORCH_VERSION="$TORCH_VERSION" \
        --build-arg TORCH_INDEX_URL=https://pypi.org/simple "$ROOT" ;;
    *) echo "unknown image '$t' (operator, trainer-cpu, trainer-cuda)" >&2; exit 2 ;;
  esac
done
