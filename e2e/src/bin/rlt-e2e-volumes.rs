//! `rlt-e2e-volumes`: the local e2e cluster's static hostPath provisioner (see
//! `rlt_e2e::volumes`), so that the runs' workspace claims bind as they do on kind.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

#[derive(Parser)]
#[command(about = "Binds every pending PersistentVolumeClaim to a new hostPath volume")]
struct Args {
    /// The cluster's kubeconfig.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Where the volumes' folders are made.
    #[arg(long)]
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let kc = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("read {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let dir = std::path::absolute(&args.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "rlt-e2e-volumes ready");
    rlt_e2e::volumes::run(Client::try_from(config)?, dir).await;
    Ok(())
}
