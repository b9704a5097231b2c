//! A parameter server: owns one shard of the teacher's parameters and its AdamW state, serves
//! the weights to learners, and applies ONE synchronous update per step once every learner
//! has pushed its gradients for that step (weighted average). Checkpoints its shard every K
//! steps and resumes from the latest one. Server 0 also serves the training figures
//! (`/status`, JSON) and Prometheus `/metrics` on its metrics port.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::{Stream, StreamExt};
use rlt_api::contract::TrainingFigures;
use rlt_api::layout;
use tch::Tensor;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::grpo::GrpoConfig;
use super::optim::AdamWConfig;
use super::shard::{assign_shards, shard_names, ShardState};
use super::wire::{self, pb, KIND_POLICY, KIND_REFERENCE, PROTOCOL_VERSION};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub shard: usize,
    pub num_shards: usize,
    pub num_learners: usize,
    pub total_steps: u64,
    pub adamw: AdamWConfig,
    pub grpo: GrpoConfig,
    /// Checkpoint the shard every this many steps (and at the last step).
    pub checkpoint_every: u64,
    /// The RL stage directory of the run (`layout.rl()`); shard checkpoints go under
    /// `shard(i)`, server 0 writes `metrics.json`.
    pub stage_dir: layout::StageDir,
    pub attempt: u32,
}

/// Reads every tensor of a Hugging Face checkpoint directory (`*.safetensors`).
pub fn read_checkpoint_tensors(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading checkpoint directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no *.safetensors files (expected a Hugging Face checkpoint)",
            dir.display()
        );
    }
    let mut out = BTreeMap::new();
    for f in files {
        for (name, t) in
            Tensor::read_safetensors(&f).with_context(|| format!("reading {}", f.display()))?
        {
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// Learner pushes for the step being collected.
struct Pending {
    weight: f64,
    grads: Vec<Tensor>,
    stats: pb::StepStats,
}

struct Inner {
    state: ShardState,
    pending: BTreeMap<u32, Pending>,
    done: std::collections::BTreeSet<u32>,
    last_step_at: Instant,
}

/// Metrics of one server (its own registry: tests run several servers in one process).
pub struct ServerMetrics {
    pub registry: prometheus::Registry,
    step: prometheus::IntGauge,
    reward: prometheus::Gauge,
    solution: prometheus::Gauge,
    kl: prometheus::Gauge,
    tokens_per_second: prometheus::Gauge,
    bytes_in: prometheus::IntCounter,
    bytes_out: prometheus::IntCounter,
}

impl ServerMetrics {
    fn new(shard: usize) -> Result<Self> {
        let registry = prometheus::Registry::new_custom(
            Some("rlt".into()),
            Some(
                [("shard".to_string(), shard.to_string())]
                    .into_iter()
                    .collect(),
            ),
        )?;
        let step = prometheus::IntGauge::new("rl_step", "RL steps applied (weights version)")?;
        let reward = prometheus::Gauge::new("rl_mean_reward", "mean RLT reward of the last step")?;
        let solution = prometheus::Gauge::new("rl_solution_term", "mean r_SS of the last step")?;
        let kl = prometheus::Gauge::new("rl_kl_term", "mean r_KL of the last step")?;
        let tokens_per_second =
            prometheus::Gauge::new("rl_tokens_per_second", "generated tokens/s, last step")?;
        let bytes_in =
            prometheus::IntCounter::new("ps_bytes_received_total", "gradient bytes received")?;
        let bytes_out = prometheus::IntCounter::new("ps_bytes_sent_total", "weight bytes sent")?;
        registry.register(Box::new(step.clone()))?;
        registry.register(Box::new(reward.clone()))?;
        registry.register(Box::new(solution.clone()))?;
        registry.register(Box::new(kl.clone()))?;
        registry.register(Box::new(tokens_per_second.clone()))?;
        registry.register(Box::new(bytes_in.clone()))?;
        registry.register(Box::new(bytes_out.clone()))?;
        Ok(ServerMetrics {
            registry,
            step,
            reward,
            solution,
            kl,
            tokens_per_second,
            bytes_in,
            bytes_out,
        })
    }
}

#[derive(Clone)]
pub struct ParamServer {
    cfg: Arc<ServerConfig>,
    inner: Arc<Mutex<Inner>>,
    version: watch::Sender<u64>,
    all_done: watch::Sender<bool>,
    figures: Arc<Mutex<TrainingFigures>>,
    metrics: Arc<ServerMetrics>,
}

impl ParamServer {
    /// Builds the server's shard: resumes from the latest complete checkpoint of this shard
    /// (attempts up to ours), else starts from the initial teacher checkpoint.
    pub fn new(cfg: ServerConfig, initial: &BTreeMap<String, Tensor>) -> Result<Self> {
        if cfg.shard >= cfg.num_shards {
            bail!(
                "parameter server index {} is out of range for {} servers",
                cfg.shard,
                cfg.num_shards
            );
        }
        if cfg.num_learners == 0 {
            bail!("the number of learners must be at least 1");
        }
        let sizes: Vec<(String, i64)> = initial
            .iter()
            .map(|(n, t)| (n.clone(), t.numel() as i64))
            .collect();
        let names = shard_names(&assign_shards(&sizes, cfg.num_shards), cfg.shard);
        let shapes: Vec<(String, Vec<i64>)> = names
            .iter()
            .map(|n| (n.clone(), initial[n].size()))
            .collect();
        let dir = cfg.stage_dir.shard(cfg.shard);
        let state = match layout::latest_checkpoint(&dir, cfg.attempt) {
            Some((step, path)) => {
                let s = ShardState::load(&path, &shapes).with_context(|| {
                    format!(
                        "resuming parameter server {} from {}",
                        cfg.shard,
                        path.display()
                    )
                })?;
                tracing::info!(shard = cfg.shard, step, path = %path.display(), "resumed shard from checkpoint");
                s
            }
            None => ShardState::fresh(names, initial)?,
        };
        let version = state.version;
        let metrics = ServerMetrics::new(cfg.shard)?;
        metrics.step.set(version as i64);
        let figures = TrainingFigures {
            step: version,
            total_steps: cfg.total_steps,
            ..Default::default()
        };
        Ok(ParamServer {
            inner: Arc::new(Mutex::new(Inner {
                state,
                pending: BTreeMap::new(),
                done: Default::default(),
                last_step_at: Instant::now(),
            })),
            version: watch::channel(version).0,
            all_done: watch::channel(false).0,
            figures: Arc::new(Mutex::new(figures)),
            metrics: Arc::new(metrics),
            cfg: Arc::new(cfg),
        })
    }

    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    pub fn figures(&self) -> TrainingFigures {
        self.figures.lock().unwrap().clone()
    }

    /// Serves gRPC on `listener` (and, on server 0, HTTP on `metrics_listener`) until every
    /// learner reported done after the last step.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        metrics_listener: Option<tokio::net::TcpListener>,
    ) -> Result<()> {
        let mut done_rx = self.all_done.subscribe();
        let http = metrics_listener.map(|l| {
            let app = status_router(self.figures.clone(), self.metrics.clone());
            let mut rx = self.all_done.subscribe();
            tokio::spawn(async move {
                axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|d| *d).await;
                    })
                    .await
            })
        });
        // No Nagle: pushes and pulls are request/response, delayed ACKs would add ~40 ms each.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(pb::param_server_server::ParamServerServer::new(
                self.clone(),
            ))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = done_rx.wait_for(|d| *d).await;
            })
            .await
            .context("gRPC server failed")?;
        if let Some(h) = http {
            h.await
                .context("metrics server task")?
                .context("metrics server failed")?;
        }
        Ok(())
    }

    /// Applies the step once all learners pushed: averages, updates, checkpoints, publishes.
    fn maybe_apply(&self, inner: &mut Inner) -> Result<()> {
        if inner.pending.len() < self.cfg.num_learners {
            return Ok(());
        }
        let pending = std::mem::take(&mut inner.pending);
        let total_weight: f64 = pending.values().map(|p| p.weight).sum();
        let n = inner.state.params.len();
        let mut grads: Vec<Tensor> = (0..n)
            .map(|i| Tensor::zeros_like(&inner.state.params[i]))
            .collect();
        let mut stats = pb::StepStats::default();
        for p in pending.values() {
            for (acc, g) in grads.iter_mut().zip(&p.grads) {
                *acc += g;
            }
            stats.reward_sum += p.stats.reward_sum;
            stats.solution_sum += p.stats.solution_sum;
            stats.kl_sum += p.stats.kl_sum;
            stats.samples += p.stats.samples;
            stats.generated_tokens += p.stats.generated_tokens;
            stats.loss_sum += p.stats.loss_sum;
        }
        let scale = if total_weight > 0.0 {
            1.0 / total_weight
        } else {
            0.0
        };
        let grads: Vec<Tensor> = grads.into_iter().map(|g| g * scale).collect();
        inner.state.apply(&grads, &self.cfg.adamw, &self.cfg.grpo);
        let version = inner.state.version;
        if version.is_multiple_of(self.cfg.checkpoint_every.max(1))
            || version == self.cfg.total_steps
        {
            let path = inner
                .state
                .save(&self.cfg.stage_dir.shard(self.cfg.shard), self.cfg.attempt)?;
            tracing::info!(shard = self.cfg.shard, version, path = %path.display(), "checkpointed shard");
        }
        let elapsed = inner.last_step_at.elapsed().as_secs_f64();
        inner.last_step_at = Instant::now();
        self.publish(version, &stats, elapsed)?;
        self.version.send_replace(version);
        Ok(())
    }

    fn publish(&self, version: u64, s: &pb::StepStats, elapsed: f64) -> Result<()> {
        let per = |x: f64| (s.samples > 0).then(|| x / s.samples as f64);
        let figures = TrainingFigures {
            step: version,
            total_steps: self.cfg.total_steps,
            mean_reward: per(s.reward_sum),
            solution_term: per(s.solution_sum),
            kl_term: per(s.kl_sum),
            tokens_per_second: (elapsed > 0.0).then(|| s.generated_tokens as f64 / elapsed),
        };
        let m = &self.metrics;
        m.step.set(version as i64);
        m.reward.set(figures.mean_reward.unwrap_or(0.0));
        m.solution.set(figures.solution_term.unwrap_or(0.0));
        m.kl.set(figures.kl_term.unwrap_or(0.0));
        m.tokens_per_second
            .set(figures.tokens_per_second.unwrap_or(0.0));
        if self.cfg.shard == 0 {
            tracing::info!(
                step = version,
                mean_reward = ?figures.mean_reward,
                r_ss = ?figures.solution_term,
                r_kl = ?figures.kl_term,
                tokens_per_s = ?figures.tokens_per_second,
                "RL step applied"
            );
            let path = self.cfg.stage_dir.metrics();
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&figures)?)?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        }
        *self.figures.lock().unwrap() = figures;
        Ok(())
    }
}

fn status_router(
    figures: Arc<Mutex<TrainingFigures>>,
    metrics: Arc<ServerMetrics>,
) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            rlt_api::contract::STATUS_PATH,
            get(move || {
                let f = figures.lock().unwrap().clone();
                async move { axum::Json(f) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = prometheus::TextEncoder::new()
                    .encode_to_string(&metrics.registry.gather())
                    .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"));
                async move { text }
            }),
        )
}

#[allow(clippy::result_large_err)]
fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::param_server_server::ParamServer for ParamServer {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let req = req.into_inner();
        wire::check_protocol(req.protocol)?;
        if req.num_learners as usize != self.cfg.num_learners {
            return Err(Status::failed_precondition(format!(
                "learner {} was started for {} learners, parameter server {} for {}",
                req.learner, req.num_learners, self.cfg.shard, self.cfg.num_learners
            )));
        }
        let inner = self.inner.lock().unwrap();
        Ok(Response::new(pb::HelloReply {
            protocol: PROTOCOL_VERSION,
            shard: self.cfg.shard as u32,
            num_shards: self.cfg.num_shards as u32,
            version: inner.state.version,
            num_learners: self.cfg.num_learners as u32,
            params: inner
                .state
                .shapes()
                .into_iter()
                .map(|(name, shape)| pb::ParamInfo { name, shape })
                .collect(),
            total_steps: self.cfg.total_steps,
            checkpoint_every: self.cfg.checkpoint_every.max(1),
        }))
    }

    type PullStream = PullStream;

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<PullStream>, Status> {
        let req = req.into_inner();
        wire::check_protocol(req.protocol)?;
        let mut rx = self.version.subscribe();
        rx.wait_for(|v| *v >= req.min_version)
            .await
            .map_err(|_| Status::unavailable("server shutting down"))?;
        let mut msgs = Vec::new();
        {
            let inner = self.inner.lock().unwrap();
            let s = &inner.state;
            msgs.push(pb::PullMessage {
                body: Some(pb::pull_message::Body::Header(pb::PullHeader {
                    version: s.version,
                    reference_version: s.reference_version,
                })),
            });
            let mut bytes = 0;
            let mut add = |tensors: &Vec<Tensor>, kind| {
                for (name, t) in s.names.iter().zip(tensors) {
                    for c in wire::tensor_chunks(name, t, kind) {
                        bytes += c.data.len() as u64;
                        msgs.push(pb::PullMessage {
                            body: Some(pb::pull_message::Body::Chunk(c)),
                        });
                    }
                }
            };
            add(&s.params, KIND_POLICY);
            if req.include_reference {
                add(&s.reference, KIND_REFERENCE);
            }
            self.metrics.bytes_out.inc_by(bytes);
        }
        Ok(Response::new(Box::pin(futures::stream::iter(
            msgs.into_iter().map(Ok),
        ))))
    }

    async fn push(
        &self,
        req: Request<Streaming<pb::PushMessage>>,
    ) -> Result<Response<pb::PushReply>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::PushMessage {
                body: Some(pb::push_message::Body::Header(h)),
            })) => h,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "a push must start with its header",
                ))
            }
        };
        wire::check_protocol(header.protocol)?;
        if header.num_learners as usize != self.cfg.num_learners
            || header.learner as usize >= self.cfg.num_learners
        {
            return Err(Status::failed_precondition(format!(
                "push from learner {} of {} but parameter server {} serves {} learners",
                header.learner, header.num_learners, self.cfg.shard, self.cfg.num_learners
            )));
        }
        let mut asm = wire::Assembler::default();
        while let Some(msg) = stream.next().await {
            match msg?.body {
                Some(pb::push_message::Body::Chunk(c)) => asm
                    .add(c)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
                _ => {
                    return Err(Status::invalid_argument(
                        "only tensor chunks may follow a push header",
                    ))
                }
            }
        }
        self.metrics.bytes_in.inc_by(asm.bytes);
        let tensors = wire::of_kind(
            &asm.finish()
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            KIND_POLICY,
        );
        let mut inner = self.inner.lock().unwrap();
        let version = inner.state.version;
        if header.step != version {
            return Err(Status::failed_precondition(format!(
                "learner {} pushed gradients for step {} but parameter server {} is at version {version} \
                 (it collects gradients for step {version}); pull the current weights and recompute",
                header.learner, header.step, self.cfg.shard
            )));
        }
        let mut grads = Vec::with_capacity(inner.state.names.len());
        if tensors.len() != inner.state.names.len() {
            return Err(Status::invalid_argument(format!(
                "push has {} gradient tensors, shard {} owns {}",
                tensors.len(),
                self.cfg.shard,
                inner.state.names.len()
            )));
        }
        for (name, p) in inner.state.names.iter().zip(&inner.state.params) {
            let g = tensors.get(name).ok_or_else(|| {
                Status::invalid_argument(format!("push lacks the gradient of {name:?}"))
            })?;
            if g.size() != p.size() {
                return Err(Status::invalid_argument(format!(
                    "gradient of {name:?} has shape {:?}, the parameter has {:?}",
                    g.size(),
                    p.size()
                )));
            }
            grads.push(g.shallow_clone());
        }
        // A learner that retries (e.g. after a lost reply) replaces its earlier push.
        inner.pending.insert(
            header.learner,
            Pending {
                weight: header.weight,
                grads,
                stats: header.stats.unwrap_or_default(),
            },
        );
        self.maybe_apply(&mut inner).map_err(internal)?;
        Ok(Response::new(pb::PushReply {
            version: inner.state.version,
        }))
    }

    async fn done(&self, req: Request<pb::DoneRequest>) -> Result<Response<pb::DoneReply>, Status> {
        let req = req.into_inner();
        wire::check_protocol(req.protocol)?;
        let mut inner = self.inner.lock().unwrap();
        inner.done.insert(req.learner);
        if inner.done.len() >= self.cfg.num_learners && inner.state.version >= self.cfg.total_steps
        {
            self.all_done.send_replace(true);
        }
        Ok(Response::new(pb::DoneReply {}))
    }
}

/// Binds the gRPC port (and metrics port on server 0) and serves until all learners are done.
pub async fn run(
    cfg: ServerConfig,
    initial_dir: &Path,
    rpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
) -> Result<()> {
    let initial = read_checkpoint_tensors(initial_dir)?;
    let server = ParamServer::new(cfg, &initial)?;
    drop(initial);
    let listener = tokio::net::TcpListener::bind(rpc_addr)
        .await
        .with_context(|| format!("binding gRPC port {rpc_addr}"))?;
    let metrics = match metrics_addr {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding metrics port {a}"))?,
        ),
        None => None,
    };
    tracing::info!(%rpc_addr, version = server.version(), "parameter server listening");
    server.serve(listener, metrics).await
}
