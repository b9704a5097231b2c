#!/usr/bin/env bash
# Kueue (sigs.k8s.io/kueue), the upstream manager, beside the local control plane: the e2e's
# cluster has the queueing a platform team's GPU cluster has.
#
#   e2e/kueue/kueue.sh build        build (or reuse) the pinned manager (e2e/node/versions.env)
#   e2e/kueue/kueue.sh up STATE     inside the sandbox, after e2e/controlplane/cluster.sh up: its
#                                   CRDs and webhooks, then the manager, ready once its webhooks
#                                   answer
#
# Run as a process outside the cluster, like the control plane: Kueue's own certificate
# management expects to run in a pod behind a Service, so here its webhooks are served on
# 127.0.0.1:9443 (inside the sandbox, the API server's loopback too) with a throw-away CA, and
# the webhook configurations of its module's config/ tree are rewritten to that URL. Only the
# webhooks of what is enabled are registered (Kueue's own kinds and batch/v1 Jobs: a webhook of
# a disabled integration would refuse every object it matches). The CRDs are its bases without
# the conversion webhook: everything here speaks v1beta2, the storage version.
# RltRun is one of its `externalFrameworks`: the operator admits whole stages through Workloads
# of its own, and Kueue leaves the children of an RltRun to it (never defaults their queue).
# Kueue's manager reads its metrics certificate from a fixed path, /etc/kueue/metrics/certs:
# an empty /etc/kueue is made on the host when missing (removed by the e2e's teardown), and
# the sandbox's mount namespace binds STATE/kueue/etc over it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=e2e/node/versions.env
. "$HERE/../node/versions.env"
CACHE="${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}"
BIN="$CACHE/kueue-$KUEUE_VERSION/bin"
WEBHOOK_PORT=9443

log() { printf '[kueue] %s\n' "$*" >&2; }

build() {
  if [ ! -x "$BIN/kueue" ]; then
    local started=$SECONDS
    log "building kueue $KUEUE_VERSION from the Go module proxy into $BIN (minutes, once)"
    mkdir -p "$BIN"
    (cd "$BIN" && GOBIN="$BIN" CGO_ENABLED=0 go install -trimpath -ldflags=-s "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION")
    log "built in $((SECONDS - started)) s"
  fi
  # The module's config/ tree (CRDs, webhooks) is in the module cache after the install.
  (cd "$BIN" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
}

up() {
  local s="$1" k="$1/kueue" src started=$SECONDS
  src="$(build)"
  mkdir -p "$k/certs" "$k/etc/metrics/certs"
  # A CA of its own and a serving certificate for 127.0.0.1 (webhooks and metrics).
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=rlt-e2e-kueue-ca" \
    -keyout "$k/ca.key" -out "$k/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kueue-webhook" \
    -keyout "$k/certs/tls.key" -out "$k/tls.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$k/tls.ext"
  openssl x509 -req -in "$k/tls.csr" -CA "$k/ca.crt" -CAkey "$k/ca.key" -CAcreateserial \
    -days 2 -extfile "$k/tls.ext" -out "$k/certs/tls.crt" 2>/dev/null
  cp "$k/certs/tls.crt" "$k/certs/tls.key" "$k/etc/metrics/certs/"
  [ -d /etc/kueue ] || { mkdir /etc/kueue && touch "$s/sandbox/made-etc-kueue"; }
  mount --bind "$k/etc" /etc/kueue

  kubectl apply --server-side -f "$src/config/components/crd/bases/" >/dev/null
  kubectl wait --for condition=established --timeout 60s -f "$src/config/components/crd/bases/" >/dev/null
  python3 - "$src/config/components/webhook/manifests.yaml" "$k/ca.crt" "$WEBHOOK_PORT" >"$k/webhooks.yaml" <<'PY'
import base64, sys, yaml
manifests, ca, port = sys.argv[1], sys.argv[2], sys.argv[3]
# Kueue's own kinds and the batch/job integration; the others' webhooks are no-ops here.
keep = {"mclusterqueue", "mresourceflavor", "mworkload", "mjob",
        "vclusterqueue", "vcohort", "vresourceflavor", "vworkload", "vjob"}
bundle = base64.b64encode(open(ca, "rb").read()).decode()
docs = []
for doc in yaml.safe_load_all(open(manifests)):
    if not doc:
        continue
    doc["metadata"]["name"] = "kueue-" + doc["metadata"]["name"]
    hooks = [w for w in doc["webhooks"] if w["name"].split(".")[0] in keep]
    for w in hooks:
        path = w["clientConfig"]["service"]["path"]
        w["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
    doc["webhooks"] = hooks
    docs.append(doc)
yaml.safe_dump_all(docs, sys.stdout)
PY
  cat >"$k/config.yaml" <<EOC
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
manageJobsWithoutQueueName: false
health: {healthProbeBindAddress: "127.0.0.1:8081"}
metrics: {bindAddress: "127.0.0.1:8443"}
webhook: {host: "127.0.0.1", port: $WEBHOOK_PORT, certDir: "$k/certs"}
leaderElection: {leaderElect: false}
internalCertManagement: {enable: false}
integrations:
  frameworks: ["batch/job"]
  externalFrameworks: ["RltRun.v1alpha1.rlt.dev"]
featureGates: {VisibilityOnDemand: false}
EOC
  kubectl create namespace kueue-system >/dev/null
  setsid "$BIN/kueue" --config "$k/config.yaml" --kubeconfig "$s/admin.kubeconfig" \
    >"$s/logs/kueue.log" 2>&1 </dev/null &
  echo $! >"$s/pids/kueue"
  local i
  for i in $(seq 1 240); do
    if curl -fsS --max-time 2 http://127.0.0.1:8081/readyz >/dev/null 2>&1 &&
      curl -s --max-time 2 --cacert "$k/ca.crt" -o /dev/null "https://127.0.0.1:$WEBHOOK_PORT/"; then
      break
    fi
    if ! kill -0 "$(cat "$s/pids/kueue")" 2>/dev/null; then
      log "kueue exited; its log:"; tail -n 40 "$s/logs/kueue.log" >&2; return 1
    fi
    [ "$i" -lt 240 ] || { log "kueue not ready after 120 s"; tail -n 40 "$s/logs/kueue.log" >&2; return 1; }
    sleep 0.5
  done
  # Registered once the server answers: with failurePolicy Fail, earlier would refuse writes.
  kubectl apply -f "$k/webhooks.yaml" >/dev/null
  log "kueue $KUEUE_VERSION up in $((SECONDS - started)) s (log: $s/logs/kueue.log)"
}

case "${1:-}" in
  build) build >/dev/null ;;
  up) up "${2:?usage: kueue.sh up STATE}" ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
