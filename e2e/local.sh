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
CLUSTER="$ROOT/e2e/controlplane/cluster.sh"
REL="$ROOT/target/release"
say() { printf '[e2e %4ss] %s\n' "$SECONDS" "$*" >&2; }

# Stops what a previous (possibly killed) run left, then everything of this one.
teardown() {
  if [ -f "$STATE/pids/node-agent" ]; then
    local pid
    pid="$(cat "$STATE/pids/node-agent")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    rm -f "$STATE/pids/node-agent"
  fi
  if [ -f "$STATE/pids/watch" ]; then
    kill "$(cat "$STATE/pids/watch")" 2>/dev/null || true
    rm -f "$STATE/pids/watch"
  fi
  "$CLUSTER" down "$STATE" || true
  # Pod processes whose agent died with SIGKILL: their environment names the state folder.
  local p
  for p in /proc/[0-9]*; do
    if grep -qsF "$STATE/" "$p/environ" 2>/dev/null; then kill -KILL "${p#/proc/}" 2>/dev/null || true; fi
  done
}

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
export KUBECONFIG
KUBECONFIG="$("$CLUSTER" up "$STATE")"
# Pod logs land in the node agent's state folder; one folder for everything to look at.
mkdir -p "$STATE/node/logs"
ln -sfn ../node/logs "$STATE/logs/pods"

say "starting the node agent (2 CPU nodes, 1 GPU node with 8 nvidia.com/gpu)"
# The images the pods name are played by this checkout's binaries (see e2e/README.md).
# shellcheck source=images/images.env
. "$ROOT/images/images.env"
setsid "$REL/rlt-e2e-node" --state-dir "$STATE/node" --mode run \
  --cpu-nodes 2 --gpu-nodes 1 --gpus-per-node 8 \
  --image-map "${OPERATOR_IMAGE%:*}=$REL" --entrypoint "${OPERATOR_IMAGE%:*}=rlt-operator" \
  --image-map "${TRAINER_CPU_IMAGE%:*}=$REL" \
  --image-map "busybox=/bin" \
  >"$STATE/logs/node-agent.log" 2>&1 </dev/null &
echo $! >"$STATE/pids/node-agent"
for _ in $(seq 1 60); do
  ready="$(kubectl get nodes --no-headers 2>/dev/null | grep -c ' Ready ' || true)"
  [ "$ready" -ge 3 ] && break
  kill -0 "$(cat "$STATE/pids/node-agent")" || { say "the node agent exited"; exit 1; }
  sleep 1
done
kubectl get nodes -o wide

# What a platform team would watch, kept for the log.
kubectl get rltruns -A --watch >"$STATE/logs/rltruns-watch.log" 2>&1 &
echo $! >"$STATE/pids/watch"

say "running the scenarios"
RLT_E2E_AUDIT_LOG="$STATE/logs/audit.log" RLT_E2E_NODE_RULES=1 \
  cargo nextest run --release --locked --workspace -E 'binary_id(rlt-e2e::scenarios)' \
  --run-ignored ignored-only --test-threads 1 --no-fail-fast --success-output final "$@"
say "OK: every scenario passed"
