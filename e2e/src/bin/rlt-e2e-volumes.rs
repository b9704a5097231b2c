//! `rlt-e2e-volumes`: the local e2e cluster's default StorageClass and its hostPath
//! provisioner (see `rlt_e2e::volumes`), so that the runs' workspace claims bind as they do on
//! kind.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

#[derive(Parser)]
#[command(about = "Installs a default StorageClass and provisions its claims as hostPath volumes")]
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
    let client = Client::try_from(config)?;
    rlt_e2e::volumes::install_class(&client)
        .await
        .context("install the default StorageClass")?;
    tracing::info!(dir = %dir.display(), class = rlt_e2e::volumes::CLASS, "rlt-e2e-volumes ready");
    rlt_e2e::volumes::run(client, dir).await;
    Ok(())
}
