//! Command-line flags of `rlt-e2e-node`.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use super::rules::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Start each pod's first container as a local process.
    Run,
    /// Start nothing: pods run for --simulate-duration, then succeed.
    Simulate,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Stands in for kubelets against a real control plane: registers nodes, provisions
/// volumes, and plays the pods scheduled to its nodes (as local processes, or simulated).
#[derive(Debug, Clone, Parser)]
#[command(name = "rlt-e2e-node", version)]
pub struct Args {
    /// Admin kubeconfig (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where pod folders, logs (logs/<ns>_<pod>_<container>.log) and volumes live.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// What a pod's container does unless a rule says otherwise.
    #[arg(long, value_enum, default_value = "run")]
    pub mode: Mode,
    /// CPU nodes, named cpu-0, cpu-1, ...
    #[arg(long, default_value_t = 2)]
    pub cpu_nodes: u32,
    /// GPU nodes, named gpu-0, ...; they advertise nvidia.com/gpu.
    #[arg(long, default_value_t = 1)]
    pub gpu_nodes: u32,
    /// Allocatable cpu of every node.
    #[arg(long, default_value_t = 16)]
    pub cpu_per_node: u32,
    /// Allocatable memory of every node.
    #[arg(long, default_value = "64Gi")]
    pub memory_per_node: String,
    /// Allocatable pods of every node.
    #[arg(long, default_value_t = 110)]
    pub pods_per_node: u32,
    /// nvidia.com/gpu of every GPU node.
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: u32,
    /// IMAGE_PREFIX=DIR: the host folder of binaries standing in for an image (longest
    /// prefix of the full image reference wins; the folder is prepended to PATH). Repeatable.
    #[arg(long = "image-map", value_name = "IMAGE_PREFIX=DIR")]
    pub image_map: Vec<String>,
    /// IMAGE_PREFIX=BINARY: the entrypoint of an image, run when a container has no command.
    /// Repeatable.
    #[arg(long = "entrypoint", value_name = "IMAGE_PREFIX=BINARY")]
    pub entrypoint: Vec<String>,
    /// How long a simulated container runs before it succeeds (restartPolicy Always: until
    /// deleted).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub simulate_duration: Duration,
    /// The longest grace period given to a deleted pod's process before SIGKILL.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub max_grace_period: Duration,
    /// Grace given to the processes when the agent itself is stopped.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// tracing filter (RUST_LOG syntax).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}
