#!/usr/bin/env bash
# The end-to-end scenarios against a real control plane on this machine (`scripts/dev e2e`):
# upstream etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback
# (e2e/controlplane/cluster.sh), the e2e node agent playing the pods as local processes, the
# operator installed by its Helm chart, then e2e/tests/scenarios.rs. Everything is torn down
# at the end, also on failure; the component logs, the audit log and every pod's log stay in
# $RLT_E2E_STATE/logs (default target/e2e/logs), whose path is printed on failure.
#
#   e2e/local.sh [nextest filter...]     e.g. e2e/local.sh s03
#   RLT_E2E_KEEP=1 e2e/local.sh ...      leave the cluster running afterwards (KUBECONFIG printed;
#                                        the next run, or `e2e/local.sh --down`, stops it)
# Needs (scripts/dev e2e provides them): the torch venv's environment, helm and kubectl on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="${RLT_E2E_STATE:-$ROOT/target/e2e}"
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"

on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -d "$STATE/logs" ]; then
    say "FAILED (exit $rc). Logs of every component, the audit log and each pod: $STATE/logs"
    for f in node-agent kube-controller-manager; do
      [ -f "$STATE/logs/$f.log" ] && { echo "--- last lines of $f.log" >&2; tail -n 15 "$STATE/logs/$f.log" >&2; }
    done
    for f in "$STATE"/logs/pods/*rlt-operator*; do
      [ -f "$f" ] && { echo "--- last lines of ${f#"$STATE"/}" >&2; tail -n 30 "$f" >&2; }
    done
  fi
  if [ "${RLT_E2E_KEEP:-}" = 1 ]; then
    say "left running: export KUBECONFIG=$STATE/kubeconfig (stop it with e2e/local.sh --down)"
  else
    teardown
  fi
  exit "$rc"
}

teardown
[ "${1:-}" = --down ] && exit 0
trap on_exit EXIT
trap 'exit 130' INT TERM

say "control-plane binaries"
"$CLUSTER" build >/dev/null
say "building the operator, trainer, node agent and scenario tests (release)"
# The same build as `scripts/dev test` (nextest builds with `cargo test --no-run`), so after the
# test suite nothing is rebuilt with another feature set.
cargo test --release --locked --workspace --no-run

say "starting the control plane"
start_cluster

say "starting the node agent (2 CPU nodes, 1 GPU node with 8 nvidia.com/gpu)"
start_node_agent 3 --mode run --cpu-nodes 2 --gpu-nodes 1 --gpus-per-node 8
kubectl get nodes -o wide

# What a platform team would watch, kept for the log.
kubectl get rltruns -A --watch >"$STATE/logs/rltruns-watch.log" 2>&1 &
echo $! >"$STATE/pids/watch"

say "running the scenarios"
RLT_E2E_AUDIT_LOG="$STATE/logs/audit.log" RLT_E2E_NODE_RULES=1 \
  cargo nextest run --release --locked --workspace -E 'binary_id(rlt-e2e::scenarios)' \
  --run-ignored ignored-only --test-threads 1 --no-fail-fast --success-output final "$@"
say "OK: every scenario passed"
