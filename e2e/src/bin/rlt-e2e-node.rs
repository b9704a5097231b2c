//! `rlt-e2e-node`: the e2e node agent. It stands in for the kubelets of a real control plane
//! (kube-apiserver, kube-controller-manager, kube-scheduler; no container runtime):
//!
//! - registers Nodes `cpu-0..` and `gpu-0..` (the latter advertise `nvidia.com/gpu`), keeps
//!   them Ready (a Lease per node every 10 s, the Ready heartbeat every 30 s);
//! - provisions a hostPath PersistentVolume under `<state-dir>/volumes` for every pending
//!   claim (there is no storage provisioner);
//! - plays the pods the scheduler binds to its nodes, as a kubelet reports them: in run mode
//!   a pod's init containers and first container are local processes (the image is a host
//!   folder of binaries, `--image-map`), in simulate mode nothing runs and pods succeed after
//!   `--simulate-duration`; faults come from the rules ConfigMap
//!   `kube-system/rlt-e2e-node-rules` (see `rlt_e2e::node::rules`);
//! - logs each container's output to `<state-dir>/logs/<ns>_<pod>_<container>.log`.
//!
//! Where it deliberately differs from a kubelet: a process gets no mount or network
//! namespace of its own, so the agent REWRITES what it hands to the process:
//!
//! - a volumeMount's `mountPath` in an env value or argument (at its start, or after a
//!   separator such as a space, `=`, `:`, `,`, `;`, a quote or a redirection; longest match,
//!   on a path-component boundary) names the host folder behind that volume instead
//!   (+ subPath): `/workspace/x`, `--config=/etc/rlt/c.yaml`, `sh -c 'cat /etc/rlt/c.yaml'`;
//!   the container's `terminationMessagePath` is a per-pod host file, rewritten the same way;
//! - pod DNS names `<hostname>.<subdomain>.<ns>.svc[.cluster.local]` inside env values and
//!   arguments become the pod's address: every pod gets a deterministic address in
//!   127.64.0.0/10 (a hash of namespace, subdomain and hostname when the pod sets both, else
//!   of namespace and name), so the name resolves before its pod runs;
//! - `RLT_BIND_ADDRESS` is set to the pod's address, and `0.0.0.0:` in env values and
//!   arguments becomes `<pod address>:`;
//! - the process starts from a clean environment: PATH (the image's folder first, then the
//!   agent's PATH; a container's own PATH is ignored), LD_LIBRARY_PATH, HOSTNAME, the
//!   container's env, and KUBECONFIG naming a kubeconfig with a bound token of the pod's
//!   service account (unless automountServiceAccountToken is false), which is how clients
//!   find the API server in place of the in-cluster files;
//! - only the first container runs; further containers are reported running and ready
//!   without a process; liveness and startup probes are ignored; security contexts, resource
//!   limits and image pull policies are not enforced.
use clap::Parser;
use rlt_e2e::node::{self, cli::Args};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match node::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
