//! `rlt-operator`: the RltRun controller. See `--help` for flags; every flag also reads its
//! environment variable.
use clap::{Parser, ValueEnum};
use rlt_operator::controller::{self, Context, Settings};
use rlt_operator::figures::Figures;
use rlt_operator::http::{self, Health, Role};
use rlt_operator::leader::{self, LeaseSettings};
use rlt_operator::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Kubernetes operator for RltRun (Reinforcement-Learned Teacher training runs)"
)]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "RLT_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "RLT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "RLT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Elect a leader through a Lease: needed whenever two operator pods may run at once
    /// (replicas > 1, and the old and new pod of a rolling update); the chart always sets it.
    #[arg(long, env = "RLT_LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "RLT_LEASE_NAME", default_value = "rlt-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace from POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in Events (default: POD_NAME, else the hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Coalesce child events within this many milliseconds into one reconcile.
    #[arg(long, env = "RLT_DEBOUNCE_MS", default_value_t = 1000)]
    debounce_ms: u64,
    /// Poll parameter server 0 for training figures this often while RL runs (seconds).
    #[arg(long, env = "RLT_POLL_INTERVAL_S", default_value_t = Settings::default().poll_interval.as_secs())]
    poll_interval_s: u64,
    /// Reconcile at most this many runs at once (0: no limit). Reconciles wait on API writes,
    /// so a few dozen keep up with thousands of runs without bursting the API server.
    #[arg(long, env = "RLT_CONCURRENCY", default_value_t = Settings::default().concurrency)]
    concurrency: u16,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    // Colours only on a terminal, never in a pod's log.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let metrics = Metrics::default();
    let health = Health::default();
    let server = tokio::spawn(http::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));

    let client = kube::Client::try_default().await?;
    let identity = args
        .identity
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| format!("rlt-operator-{}", std::process::id()));
    let lease = args.leader_elect.then(|| {
        LeaseSettings::new(
            args.lease_name.clone(),
            args.lease_namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            identity.clone(),
        )
    });
    let lost = match &lease {
        Some(settings) => {
            health.set_role(Role::Standby);
            let lost = leader::lead(client.clone(), settings.clone()).await;
            Some(lost)
        }
        None => None,
    };
    health.set_role(Role::Active);
    metrics.leader.set(1);

    // Looked up once: a Kueue installed later is picked up when the operator restarts.
    let kueue = controller::kueue_installed(&client).await?;
    tracing::info!(
        kueue,
        "Kueue's Workload API (kueue.x-k8s.io/v1beta2) served"
    );
    let settings = Settings {
        kueue,
        namespace: args.namespace.clone(),
        debounce: Duration::from_millis(args.debounce_ms),
        poll_interval: Duration::from_secs(args.poll_interval_s),
        concurrency: args.concurrency,
        ..Settings::default()
    };
    let figures = Figures::Http {
        timeout: Duration::from_secs(3),
    };
    let (ctx, feeds) = Context::new(client.clone(), metrics, figures, settings, Some(identity));
    tracing::info!(namespace = ?args.namespace, concurrency = args.concurrency, "starting controller");
    tokio::select! {
        _ = controller::run(Arc::new(ctx), feeds, health) => {}
        // Not renewed within the deadline: stop reconciling at once (a standby may take over).
        _ = async { match lost { Some(l) => l.await, None => std::future::pending().await } } => {
            anyhow::bail!("leadership lost");
        }
        res = server => {
            anyhow::bail!("metrics server stopped: {res:?}");
        }
    }
    // Shut down cleanly (SIGTERM): hand the Lease over now rather than after it expires.
    if let Some(settings) = &lease {
        if let Err(e) = leader::release(client, settings).await {
            tracing::warn!(error = %e, "releasing the lease");
        }
    }
    Ok(())
}
