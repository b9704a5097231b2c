#!/usr/bin/env bash
# Sourced by images/build.sh, images/base.sh and e2e/node/node.sh: buildah with its storage in
# $RLT_BUILDAH_ROOT when set (the e2e keeps it under target/images), else buildah's default.
bah() {
  local store=()
  if [ -n "${RLT_BUILDAH_ROOT:-}" ]; then
    store=(--root "$RLT_BUILDAH_ROOT/root" --runroot "$RLT_BUILDAH_ROOT/run" --storage-driver overlay)
  fi
  buildah "${store[@]}" "$@"
}
