#!/usr/bin/env bash
# Shared by e2e/local.sh (the scenarios) and e2e/scale.sh (the scale benchmark): start and stop
# the local control plane and the e2e node agent in one state folder. Source it after setting
# ROOT and STATE.
CLUSTER="$ROOT/e2e/controlplane/cluster.sh"
REL="$ROOT/target/release"
say() { printf '[e2e %4ss] %s\n' "$SECONDS" "$*" >&2; }

# Stops what a previous (possibly killed) run left in $STATE, then everything of this one.
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

# Starts the control plane in $STATE and exports its KUBECONFIG.
start_cluster() {
  export KUBECONFIG
  KUBECONFIG="$("$CLUSTER" up "$STATE")"
  # Pod logs land in the node agent's state folder; one folder for everything to look at.
  mkdir -p "$STATE/node/logs"
  ln -sfn ../node/logs "$STATE/logs/pods"
}

# start_node_agent NODES [ARGS...]: the node agent with the images the pods name played by this
# checkout's binaries (see e2e/README.md), waiting until NODES nodes are Ready.
start_node_agent() {
  local want="$1"
  shift
  # shellcheck source=images/images.env
  . "$ROOT/images/images.env"
  setsid "$REL/rlt-e2e-node" --state-dir "$STATE/node" \
    --image-map "${OPERATOR_IMAGE%:*}=${RLT_E2E_OPERATOR_DIR:-$REL}" --entrypoint "${OPERATOR_IMAGE%:*}=rlt-operator" \
    --image-map "${TRAINER_CPU_IMAGE%:*}=$REL" \
    --image-map "busybox=/bin" "$@" \
    >"$STATE/logs/node-agent.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/node-agent"
  local ready
  for _ in $(seq 1 120); do
    ready="$(kubectl get nodes --no-headers 2>/dev/null | grep -c ' Ready ' || true)"
    [ "$ready" -ge "$want" ] && return 0
    kill -0 "$(cat "$STATE/pids/node-agent")" || { say "the node agent exited"; return 1; }
    sleep 1
  done
  say "only $ready of $want nodes became Ready"
  return 1
}
