#!/usr/bin/env bash
# A real Kubernetes control plane from upstream binaries: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler (the node is e2e/node/node.sh).
#
#   e2e/controlplane/cluster.sh build        build (or reuse) the pinned binaries (the control
#                                            plane's, the kubelet and kube-proxy); prints their folder
#   e2e/controlplane/cluster.sh up STATE     throw-away PKI, start everything, write STATE/kubeconfig
#                                            (STATE: a fresh folder)
#   e2e/controlplane/cluster.sh down STATE   stop everything started from STATE (also after a kill)
#
# `up` runs inside the e2e's own network namespace (e2e/lib.sh), so its ports are fixed: the API
# server listens on ${RLT_E2E_ADDRESS:-127.0.0.1}:6443 (the node's address, which the
# `kubernetes` Service's endpoint and the kubelet's clients need), etcd and the controllers on
# loopback. The PKI also holds the node's certificates (kubelet client and serving, kube-proxy)
# for node ${RLT_E2E_NODE_NAME:-rlt-e2e}.
#
# The Kubernetes version is the one go.mod pins; binaries are cached under
# ${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}/<version>/bin and reused, etcd too (the version go.mod
# pins: the one the kubernetes module uses). STATE/logs holds every component's log and the audit log
# (audit.log: every write, and every request of a service account in the operator's namespace).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="$(awk 'NF >= 2 && $(NF - 1) == "k8s.io/kubernetes" && $NF ~ /^v/ {print $NF}' "$HERE/go.mod")"
CACHE="${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}/$VERSION"
BIN="$CACHE/bin"
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
# The namespace whose service accounts' reads are audited too (the operator's, see the chart).
AUDITED_NAMESPACE="${RLT_E2E_OPERATOR_NAMESPACE:-rlt-system}"
ADDRESS="${RLT_E2E_ADDRESS:-127.0.0.1}"
NODE_NAME="${RLT_E2E_NODE_NAME:-rlt-e2e}"
API_PORT=6443
# The first address of the Service range: the `kubernetes` Service, which in-cluster clients dial.
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SERVICE_IP=10.96.0.1

log() { printf '[cluster] %s\n' "$*" >&2; }

build() {
  local missing=() minor="${VERSION#v1.}"
  minor="${minor%%.*}"
  for c in "${COMPONENTS[@]}"; do [ -x "$BIN/$c" ] || missing+=("k8s.io/kubernetes/cmd/$c"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "building ${missing[*]##*/} $VERSION from the Go module proxy into $BIN (minutes, once)"
    mkdir -p "$BIN"
    local started=$SECONDS ldflags="-s" pkg
    # The version the release build stamps (Helm's kubeVersion check and clients read it).
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    (cd "$HERE" && CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$BIN/" "${missing[@]}")
    log "built in $((SECONDS - started)) s"
  fi
  if [ ! -x "$BIN/etcd" ]; then
    # The etcd the kubernetes module uses (go.mod): it answers the watch-progress requests the
    # API server's watch cache relies on (Debian's 3.4.23 is too old for them, and then every
    # client-go 0.36 streaming list falls back with errors and delays).
    local started=$SECONDS
    log "building etcd $(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "$HERE/go.mod") from the Go module proxy into $BIN"
    (cd "$HERE" && CGO_ENABLED=0 go build -trimpath -ldflags=-s -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
    log "built in $((SECONDS - started)) s"
  fi
  echo "$BIN"
}

# pki STATE: a CA, the API server's serving cert, client certs per component, SA signing keys.
pki() {
  local d="$1/pki"
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=rlt-e2e-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  cert() { # name subject [extensions]
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
    printf '%s\n' "${3:-extendedKeyUsage=clientAuth}" >"$d/$1.ext"
    openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 2 -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
  }
  # Pods reach the API server as the `kubernetes` Service's IP and by its DNS names.
  cert apiserver "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1,IP:$ADDRESS,IP:$KUBERNETES_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  cert admin "/O=system:masters/CN=rlt-e2e-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  # The API server's client identity towards kubelets (logs, exec).
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  # The node: the kubelet as system:node:<name> (the Node authorizer), its serving certificate,
  # and kube-proxy (bound to system:node-proxier by the default RBAC policy).
  cert node "/O=system:nodes/CN=system:node:$NODE_NAME"
  cert kubelet-serving "/CN=$NODE_NAME" "subjectAltName=IP:$ADDRESS,DNS:$NODE_NAME
extendedKeyUsage=serverAuth"
  cert kube-proxy "/CN=system:kube-proxy"
}

kubeconfig() { # STATE name -> STATE/<name>.kubeconfig
  local s="$1" n="$2" server
  server="https://$ADDRESS:$API_PORT"
  cat >"$s/$n.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: rlt-e2e
  cluster: {server: "$server", certificate-authority: "$s/pki/ca.crt"}
users:
- name: $n
  user: {client-certificate: "$s/pki/$n.crt", client-key: "$s/pki/$n.key"}
contexts:
- name: rlt-e2e
  context: {cluster: rlt-e2e, user: $n}
current-context: rlt-e2e
EOF
}

# start STATE name cmd...: in its own process group (so `down` stops its children too).
start() {
  local s="$1" n="$2"
  shift 2
  setsid "$@" >"$s/logs/$n.log" 2>&1 </dev/null &
  echo $! >"$s/pids/$n"
}

wait_healthy() { # STATE what url [curl args]
  local s="$1" what="$2" url="$3" i
  shift 3
  for i in $(seq 1 240); do
    if curl -fsS --max-time 2 "$@" "$url" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$(cat "$s/pids/$what")" 2>/dev/null; then
      log "$what exited; its log:"; tail -n 40 "$s/logs/$what.log" >&2; return 1
    fi
    [ "$i" -eq 1 ] || sleep 0.5
  done
  log "$what not healthy after 120 s; its log:"; tail -n 40 "$s/logs/$what.log" >&2; return 1
}

up() {
  local s="$1" started=$SECONDS
  # STATE is the caller's, fresh (e2e/local.sh wipes it after its teardown).
  mkdir -p "$s/logs" "$s/pids" "$s/etcd"
  s="$(cd "$s" && pwd)"
  build >/dev/null
  pki "$s"
  echo "$API_PORT" >"$s/apiserver.port"

  start "$s" etcd "$BIN/etcd" --name rlt-e2e --data-dir "$s/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster rlt-e2e=http://127.0.0.1:2380 --quota-backend-bytes 4294967296 \
    --listen-metrics-urls http://127.0.0.1:2381
  wait_healthy "$s" etcd "http://127.0.0.1:2379/health"

  cat >"$s/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  # Every request of the operator's service accounts (reads too: the scale benchmark counts them).
  - level: Metadata
    userGroups: ["system:serviceaccounts:$AUDITED_NAMESPACE"]
  # Every write by anyone.
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
EOF
  start "$s" kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers http://127.0.0.1:2379 \
    --bind-address 0.0.0.0 --advertise-address "$ADDRESS" --secure-port "$API_PORT" \
    --cert-dir "$s/pki" --tls-cert-file "$s/pki/apiserver.crt" --tls-private-key-file "$s/pki/apiserver.key" \
    --client-ca-file "$s/pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$s/pki/sa.pub" --service-account-signing-key-file "$s/pki/sa.key" \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --authorization-mode Node,RBAC \
    --kubelet-client-certificate "$s/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$s/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$s/pki/ca.crt" --kubelet-preferred-address-types InternalIP \
    --audit-policy-file "$s/audit-policy.yaml" --audit-log-path "$s/logs/audit.log" \
    --audit-log-format json --audit-log-mode blocking --audit-log-maxsize 0
  wait_healthy "$s" kube-apiserver "https://127.0.0.1:$API_PORT/readyz" \
    --cacert "$s/pki/ca.crt" --cert "$s/pki/admin.crt" --key "$s/pki/admin.key"

  kubeconfig "$s" admin
  kubeconfig "$s" controller-manager
  kubeconfig "$s" scheduler
  kubeconfig "$s" node
  kubeconfig "$s" kube-proxy
  cp "$s/admin.kubeconfig" "$s/kubeconfig"

  # RLT_E2E_CONTROLLER_QPS: the controller-manager's and scheduler's client rate (upstream
  # defaults 20 and 50 requests/s), raised by the scale benchmark as large clusters do, so a
  # thousand runs measure the operator rather than the Job controller's client throttle.
  local qps=()
  if [ -n "${RLT_E2E_CONTROLLER_QPS:-}" ]; then
    qps=(--kube-api-qps "$RLT_E2E_CONTROLLER_QPS" --kube-api-burst "$((2 * RLT_E2E_CONTROLLER_QPS))")
  fi
  start "$s" kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig "$s/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$s/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$s/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10257 --leader-elect=false \
    --use-service-account-credentials \
    --service-account-private-key-file "$s/pki/sa.key" --root-ca-file "$s/pki/ca.crt" \
    --controllers '*' --concurrent-job-syncs 10 "${qps[@]}"
  start "$s" kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig "$s/scheduler.kubeconfig" \
    --authentication-kubeconfig "$s/scheduler.kubeconfig" \
    --authorization-kubeconfig "$s/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false "${qps[@]}"

  # The controllers are up once the service-account controller made `default`'s account.
  local i
  for i in $(seq 1 120); do
    if KUBECONFIG="$s/kubeconfig" kubectl get serviceaccount default -n default >/dev/null 2>&1; then break; fi
    for c in kube-controller-manager kube-scheduler; do
      kill -0 "$(cat "$s/pids/$c")" 2>/dev/null || { log "$c exited:"; tail -n 40 "$s/logs/$c.log" >&2; return 1; }
    done
    sleep 0.5
  done
  log "control plane $VERSION up in $((SECONDS - started)) s: KUBECONFIG=$s/kubeconfig (logs: $s/logs)"
  echo "$s/kubeconfig"
}

down() {
  local s="$1" f pid
  [ -d "$s/pids" ] || return 0
  # Reverse start order; a process group each, TERM then KILL.
  for f in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [ -f "$s/pids/$f" ] || continue
    pid="$(cat "$s/pids/$f")"
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for f in "$s"/pids/*; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

case "${1:-}" in
  build) build ;;
  up) up "${2:?usage: cluster.sh up STATE}" ;;
  down) down "${2:?usage: cluster.sh down STATE}" ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
