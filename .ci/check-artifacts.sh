#!/usr/bin/env bash
# Asserts a finished run left every artifact of the workspace layout (api/src/layout.rs): an HF
# checkpoint (config.json, tokenizer.json, *.safetensors, COMPLETE) for each stage's output,
# the RL figures, and for every student one raw trace row per training row.
# Usage: check-artifacts.sh WORKSPACE RUN_NAME STUDENT...
set -euo pipefail
ws="$1"
run="$ws/$2"
shift 2
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
need "$run/rl/metrics.json"
train="$(compgen -G "$run/inputs/data/*/train.jsonl" | head -n 1 || true)"
for student in "$@"; do
  checkpoint "$run/distill/$student/final"
  need "$run/distill/$student/traces.jsonl"
  if [ -n "$train" ] && [ -f "$run/distill/$student/traces.jsonl" ]; then
    rows="$(wc -l <"$train")"
    traces="$(wc -l <"$run/distill/$student/traces.jsonl")"
    [ "$rows" -eq "$traces" ] || { echo "distill/$student/traces.jsonl has $traces rows for $rows training rows" >&2; fail=1; }
  fi
done
[ "$fail" -eq 0 ] && echo "artifacts: OK ($run)"
exit "$fail"
