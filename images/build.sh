#!/usr/bin/env bash
# Builds the images named in images/images.env from this checkout's release binaries:
#
#   images/build.sh [--prebuilt] [operator] [trainer-cpu] [trainer-cuda]      (default: all three)
#
# 1. `cargo build --release` of the operator and the trainer (skipped with --prebuilt: the
#    e2e builds them itself with the test suite's `cargo test --release --no-run`);
# 2. images/stage.sh lays out each image's files (binary, libtorch from the PyTorch wheel the
#    trainer was built against);
# 3. the image's recipe (images/<operator|trainer>.Dockerfile) is built on that context by
#    Docker, or without a daemon by buildah (RLT_IMAGE_BUILDER=docker|buildah; default docker
#    when it is on PATH).
#
# The base is distroless's cc-debian12:nonroot with Docker (RLT_IMAGE_BASE to change it); with
# buildah and no registry, the same kind of base built from Debian packages (images/base.sh).
# RLT_IMAGE_ARCHIVES=DIR also saves each image as DIR/<image>.tar (OCI archive; Docker: its own).
# RLT_BUILDAH_ROOT=DIR keeps buildah's storage there (default: buildah's own).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=images/images.env
. "$ROOT/images/images.env"
# shellcheck source=images/buildah.sh
. "$ROOT/images/buildah.sh"
prebuilt=
targets=()
for a in "$@"; do
  case "$a" in
    --prebuilt) prebuilt=1 ;;
    *) targets+=("$a") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(operator trainer-cpu trainer-cuda)
builder="${RLT_IMAGE_BUILDER:-}"
if [ -z "$builder" ]; then
  if command -v docker >/dev/null; then builder=docker; else builder=buildah; fi
fi

if [ -z "$prebuilt" ]; then
  cargo build --release --locked -p rlt-operator -p rlt-trainer --bins
fi
base="${RLT_IMAGE_BASE:-}"
if [ -z "$base" ]; then
  if [ "$builder" = docker ]; then base=gcr.io/distroless/cc-debian12:nonroot; else base="$("$ROOT/images/base.sh")"; fi
fi
torch="$("${RLT_PYTHON:-python3}" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo unknown)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for t in "${targets[@]}"; do
  case "$t" in
    operator) image="$OPERATOR_IMAGE" recipe=operator args=() ;;
    trainer-cpu) image="$TRAINER_CPU_IMAGE" recipe=trainer args=(--build-arg FLAVOR=cpu --build-arg "TORCH_VERSION=$torch") ;;
    trainer-cuda) image="$TRAINER_CUDA_IMAGE" recipe=trainer args=(--build-arg FLAVOR=cuda --build-arg "TORCH_VERSION=$torch") ;;
    *) echo "unknown image '$t' (operator, trainer-cpu, trainer-cuda)" >&2; exit 2 ;;
  esac
  started=$SECONDS
  "$ROOT/images/stage.sh" "$t" "$work/$t"
  args+=(--build-arg "BASE=$base" -f "$ROOT/images/$recipe.Dockerfile" -t "$image" "$work/$t")
  if [ "$builder" = docker ]; then
    docker build "${args[@]}"
  else
    bah bud --pull=never --layers --quiet "${args[@]}" >/dev/null
  fi
  if [ -n "${RLT_IMAGE_ARCHIVES:-}" ]; then
    mkdir -p "$RLT_IMAGE_ARCHIVES"
    rm -f "$RLT_IMAGE_ARCHIVES/$t.tar"
    if [ "$builder" = docker ]; then
      docker save -o "$RLT_IMAGE_ARCHIVES/$t.tar" "$image"
    else
      bah push --quiet --disable-compression "$image" "oci-archive:$RLT_IMAGE_ARCHIVES/$t.tar:$image"
    fi
  fi
  rm -rf "${work:?}/$t"
  echo "built $image ($t, $builder) in $((SECONDS - started)) s" >&2
done
