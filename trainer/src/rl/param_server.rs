//! A parameter server: owns one shard of the teacher's parameters and its AdamW state, serves
//! the weights to learners, and applies ONE synchronous update per step once every learner
//! has pushed its gradients for that step (weighted average). The update is clipped by the
//! norm of the whole step's gradient: each server tells the learners its shard's part
//! (`GradNorm`), the learners add the parts and hand the total back (`Apply`), so every
//! shard scales by the same coefficient, as one optimizer over the whole model would.
//! Checkpoints its shard every K steps and resumes from the latest one. Server 0 also serves the training figures
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
use tch::{Kind, Tensor};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::grpo::GrpoConfig;
use super::shard::{prune_checkpoints, shard_names, RlOptimizer, ShardState};
use super::wire::{self, pb, KIND_POLICY, KIND_REFERENCE, PROTOCOL_VERSION};
use crate::train::optim::assign_shards;
use crate::train::optim::{clip_coefficient, squared_norm};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub shard: usize,
    pub num_shards: usize,
    pub num_learners: usize,
    pub total_steps: u64,
    pub optimizer: RlOptimizer,
    pub grpo: GrpoConfig,
    /// Checkpoint the shard every this many steps (and at the last step).
    pub checkpoint_every: u64,
    /// The RL stage directory of the run (`layout.rl()`); shard checkpoints go under
    /// `shard(i)`, server 0 writes `metrics.json`.
    pub stage_dir: layout::StageDir,
    pub attempt: u32,
    /// The learners' dtype, in which the reference is kept (they read it in no other).
    pub reference_kind: Kind,
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

/// Every learner's push of a step, averaged: what the step applies.
struct Averaged {
    grads: Vec<Tensor>,
    stats: pb::StepStats,
    squared_norm: f64,
}

struct Inner {
    state: ShardState,
    pending: BTreeMap<u32, Pending>,
    /// The average of `pending` once complete (cleared by a push).
    averaged: Option<Averaged>,
    /// (step, squared norm) of the last applied step, for a learner that asks after another
    /// one already applied it.
    last_norm: Option<(u64, f64)>,
    done: std::collections::BTreeSet<u32>,
    last_step_at: Instant,
    /// The last pull's messages, kept while they are current: the learners pulling a version
    /// share one encoding of it instead of each converting and holding their own.
    encoded: Option<Encoded>,
}

/// A pull's messages and the request they answer.
struct Encoded {
    /// (version, reference version, reference included, wire dtype).
    key: (u64, u64, bool, u32),
    messages: Arc<Vec<pb::PullMessage>>,
    bytes: u64,
}

impl Encoded {
    fn new(s: &ShardState, include_reference: bool, dtype: u32) -> Encoded {
        let mut messages = vec![pb::PullMessage {
            body: Some(pb::pull_message::Body::Header(pb::PullHeader {
                version: s.version,
                reference_version: s.reference_version,
            })),
        }];
        let mut bytes = 0;
        let mut add = |tensors: &Vec<Tensor>, kind| {
            for (name, t) in s.names.iter().zip(tensors) {
                for c in wire::tensor_chunks(name, t, kind, dtype) {
                    bytes += c.data.len() as u64;
                    messages.push(pb::PullMessage {
                        body: Some(pb::pull_message::Body::Chunk(c)),
                    });
                }
            }
        };
        add(&s.params, KIND_POLICY);
        if include_reference {
            add(&s.reference, KIND_REFERENCE);
        }
        Encoded {
            key: (s.version, s.reference_version, include_reference, dtype),
            messages: Arc::new(messages),
            bytes,
        }
    }
}

/// Where a shard stands with a step's gradients.
enum Collected {
    /// Still waiting for some learner's push.
    Waiting,
    /// Every learner pushed; the squared norm of the shard's averaged gradient.
    Ready(f64),
    /// Applied already (its squared norm when still known).
    Applied(Option<f64>),
}

/// Metrics of one server (its own registry: tests run several servers in one process).
pub struct ServerMetrics {
    pub registry: prometheus::Registry,
    step: prometheus::IntGauge,
    grad_norm: prometheus::Gauge,
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
        use rlt_api::contract::param_server_metrics as names;
        let step = prometheus::IntGauge::new(names::STEP, "RL steps applied (weights version)")?;
        let grad_norm = prometheus::Gauge::new(
            names::GRAD_NORM,
            "norm of the last step's whole gradient (all shards), before clipping",
        )?;
        let reward =
            prometheus::Gauge::new(names::MEAN_REWARD, "mean RLT reward of the last step")?;
        let solution = prometheus::Gauge::new(names::SOLUTION_TERM, "mean r_SS of the last step")?;
        let kl = prometheus::Gauge::new(names::KL_TERM, "mean r_KL of the last step")?;
        let tokens_per_second =
            prometheus::Gauge::new(names::TOKENS_PER_SECOND, "generated tokens/s, last step")?;
        let bytes_in =
            prometheus::IntCounter::new(names::BYTES_RECEIVED, "gradient bytes received")?;
        let bytes_out = prometheus::IntCounter::new(names::BYTES_SENT, "weight bytes sent")?;
        registry.register(Box::new(step.clone()))?;
        registry.register(Box::new(grad_norm.clone()))?;
        registry.register(Box::new(reward.clone()))?;
        registry.register(Box::new(solution.clone()))?;
        registry.register(Box::new(kl.clone()))?;
        registry.register(Box::new(tokens_per_second.clone()))?;
        registry.register(Box::new(bytes_in.clone()))?;
        registry.register(Box::new(bytes_out.clone()))?;
        Ok(ServerMetrics {
            registry,
            step,
            grad_norm,
            reward,
            solution,
            kl,
            tokens_per_second,
            bytes_in,
            bytes_out,
        })
    }
}

/// When a server stops serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeUntil {
    /// Once every learner reported done after the last step: servers inside one process.
    AllLearnersDone,
    /// After that, at SIGTERM or SIGINT: a server process, removed by its owner (the
    /// operator deletes the StatefulSet, the local pipeline kills it).
    Terminated,
}

/// Waits for SIGTERM or SIGINT. Installed only once the stage is done: until then the
/// default disposition ends the process at once, as an interrupted stage should.
async fn terminated() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Replaces the process's end-at-once handler (`exit::end_at_termination`).
    crate::exit::default_termination();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

#[derive(Clone)]
pub struct ParamServer {
    cfg: Arc<ServerConfig>,
    inner: Arc<Mutex<Inner>>,
    version: watch::Sender<u64>,
    /// Bumped on every push, so a `GradNorm` or `Apply` waiting for the last learner wakes.
    pushed: watch::Sender<u64>,
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
                let s = ShardState::load(&path, &shapes, cfg.optimizer.adamw, cfg.reference_kind)
                    .with_context(|| {
                    format!(
                        "resuming parameter server {} from {}",
                        cfg.shard,
                        path.display()
                    )
                })?;
                tracing::info!(shard = cfg.shard, step, path = %path.display(), "resumed shard from checkpoint");
                s
            }
            None => ShardState::fresh(names, initial, cfg.optimizer.adamw, cfg.reference_kind)?,
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
                averaged: None,
                last_norm: None,
                done: Default::default(),
                last_step_at: Instant::now(),
                encoded: None,
            })),
            version: watch::channel(version).0,
            pushed: watch::channel(0).0,
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

    /// Serves gRPC on `listener` (and, on server 0, HTTP on `metrics_listener`) until
    /// `until` says so.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        metrics_listener: Option<tokio::net::TcpListener>,
        until: ServeUntil,
    ) -> Result<()> {
        let stop = watch::channel(false).0;
        let mut all_done = self.all_done.subscribe();
        let stopper = stop.clone();
        tokio::spawn(async move {
            let _ = all_done.wait_for(|d| *d).await;
            if until == ServeUntil::Terminated {
                tracing::info!("every learner is done; serving the final figures until stopped");
                if let Err(e) = terminated().await {
                    tracing::warn!(error = %e, "cannot wait for a stop signal; stopping now");
                }
            }
            stopper.send_replace(true);
        });
        let stopped = || {
            let mut rx = stop.subscribe();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let http = metrics_listener.map(|l| {
            let app = status_router(self.figures.clone(), self.metrics.clone());
            let shutdown = stopped();
            tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(shutdown).await })
        });
        // No Nagle: pushes and pulls are request/response, delayed ACKs would add ~40 ms each.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .initial_stream_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW)
            .max_frame_size(wire::MAX_FRAME)
            .add_service(pb::param_server_server::ParamServerServer::new(
                self.clone(),
            ))
            .serve_with_incoming_shutdown(incoming, stopped())
            .await
            .context("gRPC server failed")?;
        if let Some(h) = http {
            h.await
                .context("metrics server task")?
                .context("metrics server failed")?;
        }
        Ok(())
    }

    /// Where this shard stands with `step`, averaging the pushes once all are in.
    fn collected(&self, inner: &mut Inner, step: u64) -> Collected {
        let version = inner.state.version;
        if step < version {
            let norm = inner.last_norm.filter(|(s, _)| *s == step).map(|n| n.1);
            return Collected::Applied(norm);
        }
        if step > version || inner.pending.len() < self.cfg.num_learners {
            return Collected::Waiting;
        }
        let averaged = inner.averaged.get_or_insert_with(|| {
            let total_weight: f64 = inner.pending.values().map(|p| p.weight).sum();
            let scale = if total_weight > 0.0 {
                1.0 / total_weight
            } else {
                0.0
            };
            let mut stats = pb::StepStats::default();
            let mut grads: Vec<Tensor> =
                inner.state.params.iter().map(Tensor::zeros_like).collect();
            for p in inner.pending.values() {
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
            let grads: Vec<Tensor> = grads.into_iter().map(|g| g * scale).collect();
            Averaged {
                squared_norm: squared_norm(&grads),
                grads,
                stats,
            }
        });
        Collected::Ready(averaged.squared_norm)
    }

    /// Waits until every learner pushed `step` (or it was applied), then reads it.
    async fn wait_collected(&self, step: u64) -> Result<Collected, Status> {
        let mut pushed = self.pushed.subscribe();
        loop {
            // Subscribed before looking, so a push or an applied step that comes between the
            // look and the wait still wakes it.
            let mut version = self.version.subscribe();
            {
                let mut inner = self.inner.lock().unwrap();
                match self.collected(&mut inner, step) {
                    Collected::Waiting => {}
                    done => return Ok(done),
                }
            }
            tokio::select! {
                r = pushed.changed() => r.map_err(|_| Status::unavailable("server shutting down"))?,
                r = version.changed() => r.map_err(|_| Status::unavailable("server shutting down"))?,
            }
        }
    }

    /// Applies `step`: the averaged gradient, scaled so the whole step's gradient (norm
    /// `global_norm`) is within the clipping norm; then checkpoints and publishes.
    fn apply_step(&self, inner: &mut Inner, step: u64, global_norm: f64) -> Result<()> {
        let Some(averaged) = inner.averaged.take() else {
            bail!("step {step} is not collected");
        };
        inner.pending.clear();
        let o = &self.cfg.optimizer;
        let scale = clip_coefficient(global_norm, o.max_grad_norm);
        inner
            .state
            .apply(&averaged.grads, o.lr, scale, &self.cfg.grpo);
        inner.last_norm = Some((step, averaged.squared_norm));
        let version = inner.state.version;
        if version.is_multiple_of(self.cfg.checkpoint_every.max(1))
            || version == self.cfg.total_steps
        {
            let c = &self.cfg;
            let path = inner.state.save(&c.stage_dir.shard(c.shard), c.attempt)?;
            prune_checkpoints(&c.stage_dir, c.shard, c.num_shards, c.attempt);
            tracing::info!(shard = c.shard, version, path = %path.display(), "checkpointed shard");
        }
        let elapsed = inner.last_step_at.elapsed().as_secs_f64();
        inner.last_step_at = Instant::now();
        self.publish(version, &averaged.stats, global_norm, elapsed)?;
        self.version.send_replace(version);
        Ok(())
    }

    fn publish(&self, version: u64, s: &pb::StepStats, grad_norm: f64, elapsed: f64) -> Result<()> {
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
        m.grad_norm.set(grad_norm);
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
                grad_norm,
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
        let (messages, bytes) = {
            let mut guard = self.inner.lock().unwrap();
            let inner = &mut *guard;
            let s = &inner.state;
            let key = (
                s.version,
                s.reference_version,
                req.include_reference,
                req.dtype,
            );
            if inner.encoded.as_ref().is_none_or(|e| e.key != key) {
                inner.encoded = Some(Encoded::new(s, req.include_reference, req.dtype));
            }
            let e = inner.encoded.as_ref().expect("just set");
            (e.messages.clone(), e.bytes)
        };
        self.metrics.bytes_out.inc_by(bytes);
        // Cloning a message clones its chunk's name and a handle on the shared bytes.
        Ok(Response::new(Box::pin(futures::stream::iter(
            (0..messages.len()).map(move |i| Ok(messages[i].clone())),
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
            // Averaged and applied in f32, whatever dtype the learner sent.
            grads.push(g.to_kind(Kind::Float));
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
        inner.averaged = None;
        // A learner pushes a step only after pulling its version: that version's pulls are
        // (all but surely) done, and the encoding need not be held through the next step.
        inner.encoded = None;
        let version = inner.state.version;
        drop(inner);
        self.pushed.send_modify(|n| *n += 1);
        Ok(Response::new(pb::PushReply { version }))
    }

    async fn grad_norm(
        &self,
        req: Request<pb::GradNormRequest>,
    ) -> Result<Response<pb::GradNormReply>, Status> {
        let req = req.into_inner();
        wire::check_protocol(req.protocol)?;
        match self.wait_collected(req.step).await? {
            Collected::Ready(squared_norm) | Collected::Applied(Some(squared_norm)) => {
                Ok(Response::new(pb::GradNormReply { squared_norm }))
            }
            _ => Err(Status::failed_precondition(format!(
                "parameter server {} applied step {} long ago; its gradient norm is gone",
                self.cfg.shard, req.step
            ))),
        }
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyReply>, Status> {
        let req = req.into_inner();
        wire::check_protocol(req.protocol)?;
        if let Collected::Ready(_) = self.wait_collected(req.step).await? {
            let mut inner = self.inner.lock().unwrap();
            // Another learner's Apply may have come first while this one waited for the lock.
            if let Collected::Ready(_) = self.collected(&mut inner, req.step) {
                self.apply_step(&mut inner, req.step, req.global_norm)
                    .map_err(internal)?;
            }
        }
        Ok(Response::new(pb::ApplyReply {
            version: self.version(),
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

/// Binds the gRPC port (and metrics port on server 0) and serves until stopped: the process
/// outlives the stage's last step so that a pod's ending is never mistaken for a failure (a
/// StatefulSet restarts whatever exits, even with 0) and the final figures stay readable.
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
    server
        .serve(listener, metrics, ServeUntil::Terminated)
        .await
}
