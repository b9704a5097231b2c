#!/usr/bin/env bash
# The whole end-to-end test on any machine with Docker, kind, kubectl, helm and cargo:
# create a kind cluster, build and load the operator and CPU trainer images (images/build.sh:
# the same recipes and staged files as the local e2e, built by Docker), run the scenario tests
# of e2e/tests/scenarios.rs (the same ones `scripts/dev e2e` runs against the local cluster:
# chart install/upgrade, validation parity, the tiny run, faults, leader election, suspend,
# quiet when idle, probes, data-parallel ranks over DNS), show `kubectl get rltruns`, then
# clean up. Needs the torch venv's environment too (scripts/dev env): the trainer image carries
# the libtorch the trainer is built against.
#
#   e2e/kind.sh            everything, deleting the cluster at the end
#   KEEP_CLUSTER=1 e2e/kind.sh   leave the cluster for inspection
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=images/images.env
. "$ROOT/images/images.env"
CLUSTER="${CLUSTER:-rlt-e2e}"
NAMESPACE="${NAMESPACE:-rlt-e2e}"
RELEASE=rlt-operator

for tool in docker kind kubectl helm cargo cargo-nextest; do
  command -v "$tool" >/dev/null || { echo "e2e/kind.sh needs $tool on PATH" >&2; exit 2; }
done

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "--- failure: state of the cluster ---" >&2
    kubectl get rltruns,jobs,statefulsets,pods -n "$NAMESPACE" -o wide >&2 || true
    kubectl describe rltruns -n "$NAMESPACE" >&2 || true
    kubectl logs -n rlt-system deploy/"$RELEASE" --tail=200 >&2 || true
  fi
  if [ -z "${KEEP_CLUSTER:-}" ]; then
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap cleanup EXIT

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER"

RLT_IMAGE_BUILDER=docker "$ROOT/images/build.sh" operator trainer-cpu
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRAINER_CPU_IMAGE"

kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -

# Watch the printer columns the way a platform team would, for the log.
kubectl get rltruns -n "$NAMESPACE" --watch-only >"${TMPDIR:-/tmp}/rlt-e2e-watch.log" 2>&1 &
watch_pid=$!

# The same scenarios as scripts/dev e2e; they install the chart themselves (with these images).
# kind has no audit log: the scenarios that need it say what they skip. Their helper pods run
# busybox:1.36 (RLT_E2E_SHELL_IMAGE).
RLT_E2E_NAMESPACE="$NAMESPACE" RLT_E2E_OPERATOR_IMAGE="$OPERATOR_IMAGE" \
  RLT_E2E_TRAINER_IMAGE="$TRAINER_CPU_IMAGE" \
  cargo nextest run --release -p rlt-e2e --test scenarios --run-ignored ignored-only --test-threads 1

kill "$watch_pid" 2>/dev/null || true
echo "--- kubectl get rltruns --watch (as seen during the run) ---"
cat "${TMPDIR:-/tmp}/rlt-e2e-watch.log"
for column in NAME PHASE PROGRESS REWARD ATTEMPT AGE; do
  grep -q "$column" "${TMPDIR:-/tmp}/rlt-e2e-watch.log" || { echo "printer column $column missing" >&2; exit 1; }
done
for phase in WarmUp RL Distillation Succeeded; do
  grep -q " $phase " "${TMPDIR:-/tmp}/rlt-e2e-watch.log" || { echo "phase $phase never shown by kubectl get rltruns" >&2; exit 1; }
done

# Uninstall keeps the CRD (and so users' runs): it is annotated helm.sh/resource-policy=keep.
helm uninstall "$RELEASE" --namespace rlt-system
kubectl get crd rltruns.rlt.dev >/dev/null
echo "e2e: OK"
