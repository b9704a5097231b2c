#!/usr/bin/env bash
# The operator at scale (`scripts/dev e2e-scale`): for each N (default 100 300 1000), a fresh
# local control plane, a simulated GPU fleet (the e2e node agent in simulate mode: 250 GPU nodes
# x 8 nvidia.com/gpu; stage pods run for a set time, then succeed), the operator installed by
# its chart as a real process, and N RltRuns applied at once. e2e/tests/scale.rs measures and
# prints one table per N; all tables are printed again at the end and kept in
# target/e2e-scale/reports/scale-N.{md,json}.
#
#   e2e/scale.sh [N...]
#   RLT_SCALE_STAGE_SECONDS=60   each stage's simulated duration
#   RLT_SCALE_GPU_NODES=250      the fleet
#   RLT_E2E_OPERATOR_DIR=DIR     play the operator image with DIR/rlt-operator (e.g. an older
#                                build, for a before/after comparison) instead of target/release
# Needs (scripts/dev e2e-scale provides them): the torch venv's environment, helm and kubectl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Absolute: the scale test runs in the e2e crate's directory.
BASE="$(realpath -m "${RLT_SCALE_STATE:-$ROOT/target/e2e-scale}")"
OUT="$BASE/reports"
STATE="$BASE/cluster"
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"
RUNS=("$@")
[ "${#RUNS[@]}" -gt 0 ] || RUNS=(100 300 1000)
GPU_NODES="${RLT_SCALE_GPU_NODES:-250}"
STAGE_SECONDS="${RLT_SCALE_STAGE_SECONDS:-60}"

on_exit() {
  local rc=$?
  [ "$rc" -ne 0 ] && say "FAILED (exit $rc); logs: $STATE/logs"
  teardown
  exit "$rc"
}
teardown
trap on_exit EXIT
trap 'exit 130' INT TERM

say "control-plane binaries"
"$CLUSTER" build >/dev/null
say "building the operator, the node agent and the scale test (release; no trainer: its pods are simulated)"
cargo build --release --locked -p rlt-operator -p rlt-e2e --bins
mkdir -p "$OUT"
failed=()
for n in "${RUNS[@]}"; do
  teardown
  rm -rf "$STATE"
  say "N = $n: a fresh control plane, $GPU_NODES GPU nodes"
  RLT_E2E_CONTROLLER_QPS=200 start_cluster
  start_node_agent "$((GPU_NODES + 2))" --mode simulate --simulate-duration "${STAGE_SECONDS}s" \
    --cpu-nodes 2 --gpu-nodes "$GPU_NODES" --gpus-per-node 8 --log-level warn
  RLT_SCALE_RUNS="$n" RLT_SCALE_STAGE_SECONDS="$STAGE_SECONDS" RLT_SCALE_GPU_NODES="$GPU_NODES" \
    RLT_SCALE_REPORT="$OUT/scale-$n" RLT_E2E_NODE_STATE="$STATE/node" RLT_E2E_NAMESPACE=rlt-scale \
    RLT_E2E_AUDIT_LOG="$STATE/logs/audit.log" RLT_E2E_NODE_RULES=1 \
    cargo nextest run --release --locked -p rlt-e2e -E 'binary_id(rlt-e2e::scale)' \
    --run-ignored ignored-only --no-capture || failed+=("$n")
  # Keep the last N's logs for a look; earlier ones are replaced by the next cluster.
done
say "done"
for n in "${RUNS[@]}"; do cat "$OUT/scale-$n.md" 2>/dev/null || echo "(no table for N = $n)"; done
# A failed N still printed its table (the test writes it before its assertions); the other
# Ns ran all the same, so one invocation gives the whole comparison.
if [ "${#failed[@]}" -gt 0 ]; then
  say "FAILED for N = ${failed[*]}"
  exit 1
fi
