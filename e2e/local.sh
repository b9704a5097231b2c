#!/usr/bin/env bash
# The end-to-end scenarios on a real cluster on this machine (`scripts/dev e2e`), every part of
# it upstream: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
# (e2e/controlplane/cluster.sh), and a node of containerd + runc, the kubelet, kube-proxy and
# CoreDNS (e2e/node/node.sh), all in a network and mount namespace of the e2e's own
# (e2e/lib.sh), and Kueue (e2e/kueue/kueue.sh). The pods run the operator and trainer images built here from this checkout's
# release build (images/build.sh with buildah); the operator is installed by its Helm chart;
# then e2e/tests/scenarios.rs. Everything is torn down at the end, also on failure; the
# component logs, the audit log and every pod's log stay in $RLT_E2E_STATE/logs (default
# target/e2e/logs), whose path is printed on failure.
#
#   e2e/local.sh [nextest filter...]     e.g. e2e/local.sh s03
#   RLT_E2E_KEEP=1 e2e/local.sh ...      leave the cluster running afterwards; then
#   e2e/local.sh --enter [CMD...]        a shell (or CMD) inside it, KUBECONFIG set
#   e2e/local.sh --down                  stop it (the next run does too)
# Needs (scripts/dev e2e provides them): root, Go, the torch venv's environment, helm, kubectl;
# the Debian packages it lacks are installed (e2e/node/node.sh deps).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="$(realpath -m "${RLT_E2E_STATE:-$ROOT/target/e2e}")"
# shellcheck source=e2e/lib.sh
. "$ROOT/e2e/lib.sh"

case "${1:-}" in
  --down) teardown; exit 0 ;;
  --enter)
    shift
    [ "$#" -gt 0 ] || set -- bash
    export KUBECONFIG="$STATE/kubeconfig"
    exec nsenter --target "$(cat "$STATE/sandbox/holder.pid")" --net --mount --wd="$PWD" -- "$@"
    ;;
esac

on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -d "$STATE/logs" ]; then
    say "FAILED (exit $rc). Logs of every component, the audit log and each pod: $STATE/logs"
    for f in kubelet kube-controller-manager; do
      [ -f "$STATE/logs/$f.log" ] && { echo "--- last lines of $f.log" >&2; tail -n 15 "$STATE/logs/$f.log" >&2; }
    done
    for f in "$STATE"/logs/pods/rlt-system_rlt-operator*/*/*.log; do
      [ -f "$f" ] && { echo "--- last lines of ${f#"$STATE"/}" >&2; tail -n 30 "$f" >&2; }
    done
  fi
  if [ "${RLT_E2E_KEEP:-}" = 1 ] && [ -f "$STATE/sandbox/holder.pid" ]; then
    say "left running: e2e/local.sh --enter [CMD] runs inside it (KUBECONFIG=$STATE/kubeconfig); e2e/local.sh --down stops it"
  else
    teardown
  fi
  exit "$rc"
}

teardown
trap on_exit EXIT
trap 'exit 130' INT TERM

say "control-plane and node binaries (cached after the first build)"
"$CLUSTER" build >/dev/null
"$NODE" build
"$KUEUE" build
say "building the operator, trainer, volume provisioner and scenario tests (release)"
# The same build as `scripts/dev test` (nextest builds with `cargo test --no-run`), so after the
# test suite nothing is rebuilt with another feature set; the images carry these binaries.
cargo test --release --locked --workspace --no-run
rm -rf --one-file-system "$STATE"
mkdir -p "$STATE"
say "images (operator, CPU trainer, pause, busybox) from this build, without a registry"
build_images operator trainer-cpu

say "starting the sandbox, the control plane and the node"
sandbox_up
start_cluster
in_sandbox "$NODE" gpus "$STATE" 8
# Kueue, as a shared GPU cluster runs it (RltRun among its external frameworks).
in_sandbox "$KUEUE" up "$STATE"
kubectl_in get nodes -o wide

# What a platform team would watch, kept for the log.
kubectl_in get rltruns -A --watch >"$STATE/logs/rltruns-watch.log" 2>&1 &

say "running the scenarios"
in_sandbox env RLT_E2E_AUDIT_LOG="$STATE/logs/audit.log" RLT_E2E_SHELL_IMAGE="$SHELL_IMAGE" \
  cargo nextest run --release --locked --offline --workspace -E 'binary_id(rlt-e2e::scenarios)' \
  --run-ignored ignored-only --test-threads 1 --no-fail-fast --success-output final "$@"
say "OK: every scenario passed"
