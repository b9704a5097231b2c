#!/usr/bin/env bash
# A real Kubernetes node for the e2e, from upstream components: containerd (Go module) with
# Debian's runc and CNI plugins (bridge, host-local, loopback), the kubelet and kube-proxy (the
# k8s.io/kubernetes module the control plane is built from), CoreDNS (Go module) for Service
# names, and a small static provisioner for hostPath volumes (this crate's rlt-e2e-volumes).
#
#   e2e/node/node.sh deps           install the Debian packages the node and the images need
#   e2e/node/node.sh build [kwok]   build (or reuse) containerd, CoreDNS, the pause program (and
#                                   kwok) into the cache; prints nothing
#   e2e/node/node.sh images OUT     the node's own images as OCI archives in OUT: pause (the
#                                   pod sandbox) and a busybox shell (the scenarios' inspector)
#   e2e/node/node.sh up STATE       start the node of the cluster in STATE and wait until it is
#                                   Ready (run inside the e2e's namespaces: e2e/lib.sh)
#   e2e/node/node.sh gpus STATE N   advertise N nvidia.com/gpu on the node (a node status patch)
#
# Versions: e2e/node/versions.env. Binaries go to ${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}; the
# containerd root (the imported images) too, one per state folder, reused by the next run.
# Everything else lives in STATE (config, sockets, the kubelet's root, logs in STATE/logs).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=e2e/node/versions.env
. "$HERE/versions.env"
# shellcheck source=images/buildah.sh
. "$ROOT/images/buildah.sh"
K8S_VERSION="$(awk 'NF >= 2 && $(NF - 1) == "k8s.io/kubernetes" && $NF ~ /^v/ {print $NF}' "$ROOT/e2e/controlplane/go.mod")"
CACHE="${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}"
K8S_BIN="$CACHE/$K8S_VERSION/bin"
CONTAINERD_BIN="$CACHE/containerd-$CONTAINERD_VERSION/bin"
COREDNS_BIN="$CACHE/coredns-$COREDNS_VERSION/bin"
KWOK_BIN="$CACHE/kwok-$KWOK_VERSION/bin"
PAUSE_BIN="$CACHE/pause-$PAUSE_VERSION/pause"
POD_CIDR=10.88.0.0/16
POD_GATEWAY=10.88.0.1
DEBIAN_PACKAGES=(runc containernetworking-plugins iptables conntrack mmdebstrap buildah patchelf)

log() { printf '[node] %s\n' "$*" >&2; }

deps() {
  local missing=() p
  for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then echo "missing Debian packages: apt-get install ${missing[*]} (as root)" >&2; exit 1; fi
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# go_install DIR TAGS PACKAGE@VERSION...: `go install` of upstream modules at a pinned version
# (each with its own go.mod and go.sum, checked against the Go checksum database), static.
go_install() {
  local dir="$1" tags="$2" started=$SECONDS
  shift 2
  log "building ${*##*/} from the Go module proxy into $dir (minutes, once)"
  mkdir -p "$dir"
  (cd "$dir" && GOBIN="$dir" CGO_ENABLED=0 go install -trimpath -ldflags=-s -tags "$tags" "$@")
  log "built in $((SECONDS - started)) s"
}

build() {
  deps
  if [ ! -x "$CONTAINERD_BIN/containerd" ] || [ ! -x "$CONTAINERD_BIN/containerd-shim-runc-v2" ] || [ ! -x "$CONTAINERD_BIN/ctr" ]; then
    local m=github.com/containerd/containerd/v2/cmd
    go_install "$CONTAINERD_BIN" "no_btrfs no_devmapper no_zfs" \
      "$m/containerd@$CONTAINERD_VERSION" "$m/containerd-shim-runc-v2@$CONTAINERD_VERSION" "$m/ctr@$CONTAINERD_VERSION"
  fi
  if [ ! -x "$COREDNS_BIN/coredns" ]; then
    go_install "$COREDNS_BIN" "" "github.com/coredns/coredns@$COREDNS_VERSION"
  fi
  if [ "${1:-}" = kwok ] && [ ! -x "$KWOK_BIN/kwok" ]; then
    go_install "$KWOK_BIN" "" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  fi
  if [ ! -x "$PAUSE_BIN" ]; then
    # The sandbox's init process, from the kubernetes module's own source, as its Makefile builds it.
    local src
    src="$(cd "$ROOT/e2e/controlplane" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
    [ -f "$src" ] || (cd "$ROOT/e2e/controlplane" && go mod download k8s.io/kubernetes)
    mkdir -p "$(dirname "$PAUSE_BIN")"
    gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-rlt-e2e" -o "$PAUSE_BIN" "$src"
    strip "$PAUSE_BIN"
  fi
}

# images OUT: the pause image from the pause program, the shell image from Debian's
# busybox-static (images/base.sh), both with buildah into OCI archives (RLT_BUILDAH_ROOT as for
# images/build.sh).
images() {
  local out="$1" ctx
  mkdir -p "$out"
  ctx="$(mktemp -d)"
  cp "$PAUSE_BIN" "$ctx/pause"
  bah bud --pull=never --quiet -f "$HERE/pause.Dockerfile" -t "$PAUSE_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
  bah tag "$("$ROOT/images/base.sh" busybox)" "$SHELL_IMAGE"
  rm -f "$out/pause.tar" "$out/busybox.tar"
  bah push --quiet --disable-compression "$PAUSE_IMAGE" "oci-archive:$out/pause.tar:$PAUSE_IMAGE"
  bah push --quiet --disable-compression "$SHELL_IMAGE" "oci-archive:$out/busybox.tar:$SHELL_IMAGE"
}

# start STATE name cmd...: in its own process group, logging to STATE/logs/<name>.log.
start() {
  local s="$1" n="$2"
  shift 2
  setsid "$@" >"$s/logs/$n.log" 2>&1 </dev/null &
  echo $! >"$s/pids/$n"
}

alive() { # STATE name: fails, with the end of its log, when the component exited
  kill -0 "$(cat "$1/pids/$2")" 2>/dev/null && return 0
  log "$2 exited; its log:"
  tail -n 40 "$1/logs/$2.log" >&2
  return 1
}

start_containerd() { # STATE SOCKET
  local i
  PATH="$CONTAINERD_BIN:$PATH" start "$1" containerd "$CONTAINERD_BIN/containerd" --config "$1/node/containerd/config.toml"
  for i in $(seq 1 120); do
    "$CONTAINERD_BIN/ctr" --address "$2" version >/dev/null 2>&1 && return 0
    alive "$1" containerd || return 1
    sleep 0.25
  done
  log "containerd did not answer in 30 s"
  return 1
}

containerd_config() { # STATE SOCKET ROOT
  local n="$1/node"
  # Root (content and snapshots: the imported images) cached per state folder, everything
  # else in STATE (shim sockets in /run/containerd/s, /run being the sandbox's own tmpfs);
  # Debian's runc; the CNI plugins Debian installs in /usr/lib/cni.
  # restrict_oom_score_adj: without CAP_SYS_RESOURCE (this VM) runc fails every sandbox with
  # "can't get final child's PID from pipe" when asked for a lower oom_score_adj than its own.
  cat <<EOF
version = 4
root = '$3'
state = '$n/containerd/state'
imports = []
disabled_plugins = ['io.containerd.nri.v1.nri']

[plugins]
  [plugins.'io.containerd.server.v1.grpc']
    address = '$2'
  [plugins.'io.containerd.server.v1.ttrpc']
    address = '$2.ttrpc'
  [plugins.'io.containerd.internal.v1.opt']
    path = '$n/containerd/opt'
  [plugins.'io.containerd.image-verifier.v1.bindir']
    bin_dir = '$n/containerd/image-verifier'
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '$PAUSE_IMAGE'
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    cdi_spec_dirs = []
    enable_criu = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '$(command -v runc)'
          Root = '$n/containerd/runc'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '$n/cni/net.d'
EOF
}

# The pod network: one bridge, addresses from host-local, the default route via the bridge
# (inside the e2e's namespace, which has no route anywhere else).
cni_config() { # STATE
  cat <<EOF
{
  "cniVersion": "1.0.0",
  "name": "rlt-e2e",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$1/node/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
}

# The kubelet. cgroup v1 here (failCgroupV1: false); pods go under the cgroup root the e2e made
# (and removes). Cluster DNS is CoreDNS on the node's address; pod logs go to STATE/logs/pods.
kubelet_config() { # STATE SOCKET ADDRESS
  local s="$1"
  cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$(cat "$s/cgroup")
containerRuntimeEndpoint: unix://$2
imageServiceEndpoint: unix://$2
address: $3
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $s/pki/kubelet-serving.crt
tlsPrivateKeyFile: $s/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $s/pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$3]
resolvConf: $s/node/resolv.conf
podLogsDir: $s/logs/pods
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
# The machine's tunables (vm.overcommit_memory, kernel.panic, ...) get the kubelet's values;
# e2e/lib.sh saved them before and puts them back at teardown.
protectKernelDefaults: false
EOF
}

# kube-proxy: the `kubernetes` Service (how the operator reaches the API server) and every
# ClusterIP. masqueradeAll: a pod reaching a Service whose endpoint sits on the same bridge gets
# the reply back through the node (no bridge netfilter needed). Conntrack sysctls untouched.
kube_proxy_config() { # STATE NAME
  cat <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $1/kube-proxy.kubeconfig}
hostnameOverride: $2
mode: iptables
clusterCIDR: $POD_CIDR
iptables: {masqueradeAll: true, localhostNodePorts: false}
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
}

# CoreDNS: Service names and a headless Service's pods by hostname.subdomain, from the API
# server, on the node's address; nothing is forwarded anywhere.
corefile() { # STATE ADDRESS
  cat <<EOF
.:53 {
    bind $2
    errors
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $1/admin.kubeconfig
        pods insecure
        ttl 5
    }
    cache 5
}
EOF
}

up() {
  local s started=$SECONDS
  s="$(cd "$1" && pwd)"
  local n="$s/node" address="${RLT_E2E_ADDRESS:?}" name="${RLT_E2E_NODE_NAME:-rlt-e2e}" i c f
  local sock="$s/node/containerd/containerd.sock" croot
  croot="$CACHE/containerd/$(cat "$s/id")"
  export KUBECONFIG="$s/admin.kubeconfig"
  mkdir -p "$n/containerd" "$n/cni/net.d" "$n/cni/ipam" "$n/kubelet" "$s/logs/pods" "$s/volumes" "$s/pids" "$croot"

  containerd_config "$s" "$sock" "$croot" >"$n/containerd/config.toml"
  start_containerd "$s" "$sock" || return 1
  # The cached root still lists the containers of the previous run (its processes were killed
  # with the sandbox): removed, and containerd restarted, so that its CRI plugin starts empty.
  local ctr=("$CONTAINERD_BIN/ctr" --address "$sock" -n k8s.io) left
  left="$("${ctr[@]}" containers ls -q 2>/dev/null)"
  if [ -n "$left" ]; then
    for c in $left; do
      "${ctr[@]}" tasks delete --force "$c" >/dev/null 2>&1 || true
      "${ctr[@]}" containers delete "$c" >/dev/null 2>&1 || true
    done
    kill -TERM "$(cat "$s/pids/containerd")"
    for i in $(seq 1 40); do kill -0 "$(cat "$s/pids/containerd")" 2>/dev/null || break; sleep 0.25; done
    start_containerd "$s" "$sock" || return 1
  fi
  # The images, from the OCI archives the e2e built (no registry is ever asked); an image
  # already in the cached root is only re-tagged.
  for f in "${RLT_E2E_IMAGES:?}"/*.tar; do
    "$CONTAINERD_BIN/ctr" --address "$sock" -n k8s.io images import "$f" >>"$s/logs/images.log" 2>&1
  done
  cni_config "$s" >"$n/cni/net.d/10-rlt-e2e.conflist"

  printf 'nameserver %s\n' "$address" >"$n/resolv.conf"
  kubelet_config "$s" "$sock" "$address" >"$n/kubelet.yaml"
  start "$s" kubelet "$K8S_BIN/kubelet" --config "$n/kubelet.yaml" --kubeconfig "$s/node.kubeconfig" \
    --root-dir "$n/kubelet" --node-ip "$address" --hostname-override "$name" --v=2
  for i in $(seq 1 240); do
    kubectl get node "$name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True && break
    alive "$s" kubelet && alive "$s" containerd || return 1
    [ "$i" -lt 240 ] || { log "node $name not Ready after 120 s"; tail -n 30 "$s/logs/kubelet.log" >&2; return 1; }
    sleep 0.5
  done

  kube_proxy_config "$s" "$name" >"$n/kube-proxy.yaml"
  start "$s" kube-proxy "$K8S_BIN/kube-proxy" --config "$n/kube-proxy.yaml"
  corefile "$s" "$address" >"$n/Corefile"
  start "$s" coredns "$COREDNS_BIN/coredns" -conf "$n/Corefile"
  # Volumes for claims: a default StorageClass that binds at the first consumer, provisioned as
  # hostPath folders made world-writable (as kind's local-path provisioner does).
  start "$s" volumes "$ROOT/target/release/rlt-e2e-volumes" --kubeconfig "$s/admin.kubeconfig" --dir "$s/volumes"
  for i in $(seq 1 120); do
    curl -fsS --max-time 1 http://127.0.0.1:8181/ready >/dev/null 2>&1 &&
      curl -fsS --max-time 1 http://127.0.0.1:10256/healthz >/dev/null 2>&1 &&
      kubectl get storageclass rlt-e2e-local >/dev/null 2>&1 && break
    for c in kube-proxy coredns volumes; do alive "$s" "$c" || return 1; done
    [ "$i" -lt 120 ] || { log "kube-proxy, CoreDNS or the default StorageClass not ready after 60 s"; return 1; }
    sleep 0.5
  done
  log "node $name Ready in $((SECONDS - started)) s (containerd $CONTAINERD_VERSION, kubelet and kube-proxy $K8S_VERSION, CoreDNS $COREDNS_VERSION)"
}

# gpus STATE N: the node advertises N nvidia.com/gpu. Without NVIDIA's device plugin the kubelet
# does not manage that resource, so a status patch sets it (as the Kubernetes docs' "Advertise
# Extended Resources for a Node" does); the scheduler counts it and the kubelet admits pods that
# ask for it. Patched after the kubelet registered: a restarting kubelet zeroes extended
# resources no device plugin reports.
gpus() {
  local s="$1" count="$2" name="${RLT_E2E_NODE_NAME:-rlt-e2e}"
  export KUBECONFIG="$s/admin.kubeconfig"
  kubectl patch node "$name" --subresource=status --type=json \
    -p "[{\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$count\"}]" >/dev/null
  kubectl label node "$name" --overwrite nvidia.com/gpu.present=true >/dev/null
}

case "${1:-}" in
  deps) deps ;;
  build) build "${2:-}" ;;
  images) images "${2:?usage: node.sh images OUT}" ;;
  up) up "${2:?usage: node.sh up STATE}" ;;
  gpus) gpus "${2:?usage: node.sh gpus STATE N}" "${3:?usage: node.sh gpus STATE N}" ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
