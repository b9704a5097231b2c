//! The e2e node agent (`rlt-e2e-node`): kubelets' stand-in against a real control plane.
//! See the binary's documentation for what it does and where it differs from a kubelet.
pub mod cli;
pub mod env;
pub mod images;
pub mod ip;
pub mod kubeapi;
pub mod nodes;
pub mod pods;
pub mod probes;
pub mod process;

pub mod rules;
pub mod status;
pub mod termination;
pub mod token;
pub mod volumes;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use tokio::sync::watch;

use cli::{Args, Mode};

/// What every pod worker shares.
pub struct Agent {
    pub client: Client,
    pub state_dir: PathBuf,
    pub images: images::Images,
    pub cluster: token::Cluster,
    /// Run mode (a process per pod) unless a rule says otherwise.
    pub process_by_default: bool,
    pub simulate_for: Duration,
    pub max_grace: Duration,
    pub shutdown_grace: Duration,
    pub node_cpu: f64,
    pub node_memory: f64,
    /// The agent's PATH and LD_LIBRARY_PATH: all a process inherits from it.
    pub path: String,
    pub ld_library_path: Option<String>,
    pub shutdown: watch::Receiver<bool>,
}

async fn kube_config(args: &Args) -> Result<kube::Config> {
    match &args.kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).with_context(|| format!("read {}", path.display()))?;
            Ok(kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
        }
        None => Ok(kube::Config::infer().await?),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: Args) -> Result<()> {
    let config = kube_config(&args).await?;
    let cluster = token::Cluster::from_config(&config);
    let client = Client::try_from(config)?;
    let state_dir = std::path::absolute(&args.state_dir)?;
    for sub in ["logs", "pods", "volumes"] {
        std::fs::create_dir_all(state_dir.join(sub))
            .with_context(|| format!("create {}", state_dir.join(sub).display()))?;
    }
    let (shutdown_tx, shutdown) = watch::channel(false);
    let agent = Arc::new(Agent {
        client: client.clone(),
        state_dir: state_dir.clone(),
        images: images::Images::new(&args.image_map, &args.entrypoint)?,
        cluster,
        process_by_default: args.mode == Mode::Run,
        simulate_for: args.simulate_duration,
        max_grace: args.max_grace_period,
        shutdown_grace: args.shutdown_grace,
        node_cpu: args.cpu_per_node as f64,
        node_memory: env::parse_quantity(&args.memory_per_node)
            .with_context(|| format!("--memory-per-node {}", args.memory_per_node))?,
        path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ld_library_path: std::env::var("LD_LIBRARY_PATH").ok(),
        shutdown,
    });

    let defs = nodes::definitions(&args);
    let registered = nodes::register(&client, &args, &defs).await?;
    let keep_alive = tokio::spawn(nodes::keep_alive(client.clone(), registered));
    let provisioner = tokio::spawn(crate::volumes::run(client.clone(), state_dir.join("volumes")));
    let names: Vec<String> = defs.iter().map(|d| d.name.clone()).collect();
    tracing::info!(nodes = ?names, state_dir = %state_dir.display(), mode = ?args.mode, "rlt-e2e-node ready");
    let pods = tokio::spawn(pods::run(agent.clone(), names));

    shutdown_signal().await;
    tracing::info!("stopping: ending the pods' processes");
    let _ = shutdown_tx.send(true);
    let _ = pods.await;
    keep_alive.abort();
    provisioner.abort();
    Ok(())
}
