#!/usr/bin/env bash
# Shared by e2e/local.sh (the scenarios) and e2e/scale.sh (the scale benchmark): the sandbox the
# local cluster runs in, the cluster itself (e2e/controlplane/cluster.sh, e2e/node/node.sh),
# the images its pods run, and the teardown. Source it after setting ROOT and STATE.
#
# The sandbox: one network namespace and one mount namespace of the e2e's own, held open by a
# `sleep` process. Inside, the node's address (a veth pair with no peer outside), the control
# plane, the kubelet, the pod bridge and every pod's namespace: no interface or route leads out,
# so no test traffic leaves it. Inside, /run is a fresh tmpfs and /var/log and /var/lib/cni (the
# paths the kubelet and libcni hard-code) are folders of STATE, so nothing the cluster mounts or
# writes lands on the host's; the mounts die with the namespace. Every process of the cluster
# (components, shims, containers) lives under one cgroup, /rlt-e2e-<id> (the kubelet's cgroup
# root), so the teardown finds them all, also after a killed run, and removes the cgroups.
# The id is a hash of STATE: two checkouts (or the e2e and the scale benchmark) never share a
# namespace, cgroup or containerd root, and nothing listens on the host's ports.
# shellcheck source=e2e/node/versions.env
. "$ROOT/e2e/node/versions.env"
CLUSTER="$ROOT/e2e/controlplane/cluster.sh"
NODE="$ROOT/e2e/node/node.sh"
# shellcheck disable=SC2034 # used by e2e/local.sh
KUEUE="$ROOT/e2e/kueue/kueue.sh"
# shellcheck disable=SC2034 # used by the scripts that source this one
REL="$ROOT/target/release"
# shellcheck disable=SC2034
CACHE="${RLT_E2E_CACHE:-$HOME/.cache/rlt-e2e}"
ID="$(realpath -m "$STATE" | sha256sum | cut -c1-10)"
CGROUP="rlt-e2e-$ID"
# The node's address inside the sandbox (the API server, the kubelet and CoreDNS listen on it).
export RLT_E2E_ADDRESS=10.87.0.1 RLT_E2E_NODE_NAME=rlt-e2e
# The kernel-wide sysctls the kubelet sets at start (protectKernelDefaults: false); saved
# before and restored by the teardown.
KERNEL_TUNABLES=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
say() { printf '[e2e %4ss] %s\n' "$SECONDS" "$*" >&2; }

# Stops what a previous (possibly killed) run left for STATE, then everything of this one:
# every process in the cluster's cgroup, its cgroups, the sysctls, the host folder it made.
# The namespaces and their mounts go with their last process. Idempotent.
teardown() {
  local pids h
  for _ in $(seq 1 50); do
    pids="$(find "/sys/fs/cgroup/pids/$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null || true)"
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086 # one pid a word
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$CGROUP" ] && find "$h$CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h$CGROUP" ] && { say "teardown: could not remove the cgroup $h$CGROUP"; return 1; }
  done
  if [ -f "$STATE/sandbox/sysctl" ]; then
    local k v
    while read -r k v; do sysctl -qw "$k=$v" || true; done <"$STATE/sandbox/sysctl"
    rm -f "$STATE/sandbox/sysctl"
  fi
  if [ -f "$STATE/sandbox/made-etc-kueue" ]; then
    rmdir /etc/kueue 2>/dev/null || true
    rm -f "$STATE/sandbox/made-etc-kueue"
  fi
  if [ -f "$STATE/sandbox/made-var-lib-cni" ]; then
    rmdir /var/lib/cni 2>/dev/null || true
    rm -f "$STATE/sandbox/made-var-lib-cni"
  fi
  # Nothing is mounted on the host's side; if anything ever is, it goes before STATE does.
  local m
  awk -v s="$(realpath -m "$STATE")/" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do
      say "teardown: unmounting $m"
      umount -l "$m" || true
    done
}

# Runs a command inside the sandbox (its namespaces and cgroup).
in_sandbox() {
  # shellcheck disable=SC2016 # $0 and $@ are the inner shell's
  nsenter --target "$(cat "$STATE/sandbox/holder.pid")" --net --mount --wd="$PWD" -- \
    sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "/sys/fs/cgroup/pids/$CGROUP/cluster" "$@"
}

# Makes the sandbox in a fresh STATE.
sandbox_up() {
  local h sb="$STATE/sandbox"
  mkdir -p "$sb/var/log" "$sb/var/lib/cni"
  echo "$ID" >"$STATE/id"
  echo "$CGROUP" >"$STATE/cgroup"
  # The kubelet refuses a cgroup root missing from any hierarchy; cpuset needs its sets copied.
  for h in /sys/fs/cgroup/*/; do
    [ -f "${h}cgroup.procs" ] || continue
    mkdir -p "$h$CGROUP"
    if [ -f "${h}cpuset.cpus" ]; then
      cat "${h}cpuset.cpus" >"$h$CGROUP/cpuset.cpus"
      cat "${h}cpuset.mems" >"$h$CGROUP/cpuset.mems"
    fi
  done
  mkdir -p "/sys/fs/cgroup/pids/$CGROUP/cluster"
  for h in "${KERNEL_TUNABLES[@]}"; do echo "$h $(sysctl -n "$h")"; done >"$sb/sysctl"
  if [ ! -d /var/lib/cni ]; then
    mkdir -p /var/lib/cni
    touch "$sb/made-var-lib-cni"
  fi
  # shellcheck disable=SC2016 # $$ and $0 are the inner shell's
  setsid sh -c 'echo $$ >"$0/cgroup.procs" && exec unshare --net --mount --propagation private sleep infinity' \
    "/sys/fs/cgroup/pids/$CGROUP/cluster" </dev/null >/dev/null 2>&1 &
  local holder=$!
  disown "$holder"
  echo "$holder" >"$sb/holder.pid"
  for _ in $(seq 1 50); do
    [ "$(readlink "/proc/$holder/ns/net")" != "$(readlink /proc/self/ns/net)" ] && break
    sleep 0.1
  done
  # shellcheck disable=SC2016 # expanded inside
  in_sandbox sh -euc '
    ip link set lo up
    ip link add eth0 type veth peer name eth1
    ip address add "$0/24" dev eth0
    ip link set eth0 up
    ip link set eth1 up
    mount -t tmpfs -o mode=0755 rlt-e2e-run /run
    mount --bind "$1/var/log" /var/log
    mount --bind "$1/var/lib/cni" /var/lib/cni
  ' "$RLT_E2E_ADDRESS" "$sb"
}

# The images the pods run, as OCI archives in STATE/images for the node to import: the
# operator's and the CPU trainer's, built by images/build.sh with buildah from this checkout's
# release build, and the node's own (pause, a busybox shell). No registry is asked.
build_images() {
  local started=$SECONDS
  export RLT_BUILDAH_ROOT="$ROOT/target/images/buildah" RLT_IMAGE_BUILDER=buildah RLT_IMAGE_ARCHIVES="$STATE/images"
  "$ROOT/images/build.sh" --prebuilt "$@"
  "$NODE" images "$STATE/images"
  say "images built in $((SECONDS - started)) s: $(du -sh "$STATE/images" | cut -f1) of OCI archives"
}

# Starts the control plane and the node in the sandbox; exports KUBECONFIG.
start_cluster() {
  export KUBECONFIG="$STATE/kubeconfig"
  in_sandbox "$CLUSTER" up "$STATE" >/dev/null
  RLT_E2E_IMAGES="$STATE/images" in_sandbox "$NODE" up "$STATE"
}

# Runs kubectl (or any client) against the cluster, from inside the sandbox.
kubectl_in() { in_sandbox kubectl "$@"; }
