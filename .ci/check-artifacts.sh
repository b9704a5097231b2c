#!/usr/bin/env bash
# Asserts a finished run left every artifact of the workspace layout (api/src/layout.rs):
# HF checkpoints (config.json, tokenizer.json, *.safetensors, COMPLETE) for each stage's output,
# for the warm-up and RL stages (distillation is not run locally yet). Usage: check-artifacts.sh WORKSPACE RUN_NAME
set -euo pipefail
ws="$1"
run="$ws/$2"
fail=0
need() { if [ ! -s "$1" ] && [ ! -e "$1" ]; then echo "missing: $1" >&2; fail=1; fi; }
checkpoint() {
  need "$1/config.json"
  need "$1/tokenizer.json"
  need "$1/COMPLETE"
  compgen -G "$1/*.safetensors" >/dev/null || { echo "missing: $1/*.safetensors" >&2; fail=1; }
}
checkpoint "$run/warmup/final"
checkpoint "$run/rl/final"
[ "$fail" -eq 0 ] && echo "artifacts: OK ($run)"
exit "$fail"
