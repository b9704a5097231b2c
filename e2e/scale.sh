#!/usr/bin/env bash
# The operator at scale (`scripts/dev e2e-scale`): for each N (default 100 300 1000), first the
# control plane's floor (the same Jobs and StatefulSets created directly, no operator), then the
# operator, each on a fresh local cluster (the same sandbox, control plane and real node as
# e2e/local.sh), a simulated GPU fleet played by kwok (sigs.k8s.io/kwok, e2e/node/versions.env: 250 nodes x 8
# nvidia.com/gpu, tainted so only the runs' pods go there; a Job's pod runs a set time, then
# succeeds: e2e/kwok-stages.yaml), the operator installed by its chart on the real node, and
# N RltRuns applied at once. e2e/tests/scale.rs measures and prints one table per N; all tables
# are printed again at the end and kept in target/e2e-scale/reports/scale-N.{md,json}.
#
#   e2e/scale.sh [N...]
#   RLT_SCALE_STAGE_SECONDS=60   each stage's simulated duration
#   RLT_SCALE_GPU_NODES=250      the fleet
#   RLT_E2E_OPERATOR_DIR=DIR     the operator image carries DIR/rlt-operator (e.g. an older build,
#                                for a before/after comparison) instead of target/release's
# Needs (scripts/dev e2e-scale provides them): as e2e/local.sh.
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

# The fleet: Node objects kwok manages (label type=kwok), with their capacity in status.
fleet() {
  local i
  for i in $(seq 0 $((GPU_NODES - 1))); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-gpu-$i
  labels: {type: kwok, kubernetes.io/hostname: kwok-gpu-$i, kubernetes.io/os: linux, kubernetes.io/arch: amd64, nvidia.com/gpu.present: "true"}
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
spec:
  taints: [{key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}]
status:
  capacity: {cpu: "96", memory: 1Ti, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
EOF
  done
}

say "control-plane, node and kwok binaries"
"$CLUSTER" build >/dev/null
"$NODE" build kwok
say "building the operator, the volume provisioner and the scale test (release)"
# The same build as `scripts/dev test` and `scripts/dev e2e` (nothing is rebuilt with another
# feature set between them); the trainer is built but not used: the runs' pods are simulated.
cargo test --release --locked --workspace --no-run
mkdir -p "$OUT"
failed=()
# A fresh cluster with the fleet Ready: the same for both measurements of each N.
fresh_cluster() {
  teardown
  rm -rf --one-file-system "$STATE"
  mkdir -p "$STATE"
  RLT_RELEASE_DIR="${RLT_E2E_OPERATOR_DIR:-$REL}" build_images operator
  say "N = $n, $1: a fresh cluster, $GPU_NODES simulated GPU nodes"
  sandbox_up
  RLT_E2E_CONTROLLER_QPS=200 start_cluster
  sed "s/STAGE_MILLISECONDS/$((STAGE_SECONDS * 1000))/" "$ROOT/e2e/kwok-stages.yaml" >"$STATE/kwok-stages.yaml"
  # shellcheck disable=SC2016 # expanded inside
  in_sandbox sh -c 'setsid "$0" --kubeconfig "$1/admin.kubeconfig" --config "$1/kwok-stages.yaml" \
      --manage-nodes-with-label-selector type=kwok --node-lease-duration-seconds 40 \
      --cidr 10.89.0.0/16 --node-ip 10.87.0.2 \
      >"$1/logs/kwok.log" 2>&1 </dev/null &' "$CACHE/kwok-$KWOK_VERSION/bin/kwok" "$STATE"
  fleet >"$STATE/fleet.yaml"
  kubectl_in apply --server-side -f "$STATE/fleet.yaml" >/dev/null
  local i ready
  for i in $(seq 1 240); do
    ready="$(kubectl_in get nodes -l type=kwok --no-headers 2>/dev/null | grep -c ' Ready ' || true)"
    [ "$ready" -ge "$GPU_NODES" ] && break
    [ "$i" -lt 240 ] || { say "only $ready of $GPU_NODES kwok nodes became Ready"; exit 1; }
    sleep 1
  done
}

# Runs one scale test (by name) against the fresh cluster.
measure() {
  in_sandbox env RLT_SCALE_RUNS="$n" RLT_SCALE_STAGE_SECONDS="$STAGE_SECONDS" RLT_SCALE_GPU_NODES="$GPU_NODES" \
    RLT_SCALE_REPORT="$OUT/scale-$n" RLT_E2E_NAMESPACE=rlt-scale RLT_E2E_AUDIT_LOG="$STATE/logs/audit.log" \
    cargo nextest run --release --locked --offline --workspace \
    -E "binary_id(rlt-e2e::scale) and test(=$1)" --run-ignored ignored-only --no-capture
}

for n in "${RUNS[@]}"; do
  # The floor first (the same Jobs and StatefulSets created directly, no operator), so the
  # operator's table can report its time as a ratio to it; each on a cluster of its own.
  rm -f "$OUT/scale-$n-floor.json"
  fresh_cluster "the control plane's floor"
  measure the_same_workload_without_the_operator || failed+=("$n (floor)")
  fresh_cluster "the operator"
  measure a_thousand_runs_on_a_simulated_fleet || failed+=("$n")
  # Keep the last N's logs for a look; earlier ones are replaced by the next cluster.
done
say "done"
for n in "${RUNS[@]}"; do
  cat "$OUT/scale-$n-floor.md" 2>/dev/null || echo "(no floor table for N = $n)"
  cat "$OUT/scale-$n.md" 2>/dev/null || echo "(no table for N = $n)"
done
# A failed N still printed its table (the test writes it before its assertions); the other
# Ns ran all the same, so one invocation gives the whole comparison.
if [ "${#failed[@]}" -gt 0 ]; then
  say "FAILED for N = ${failed[*]}"
  exit 1
fi
