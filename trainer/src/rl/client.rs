//! The learner's side of the wire: connects to every parameter server (with backoff), checks
//! that they form one consistent set, pulls the full weights and pushes gradients per shard.
//!
//! A step on the wire: push this learner's gradients to every shard; ask every shard for its
//! part of the squared norm of the step's averaged gradient (it answers once every learner
//! pushed) and add them into the norm of the whole gradient; have every shard apply the step
//! clipped by that norm; pull the new weights. Every learner computes the same norm from the
//! same parts, so whichever `Apply` comes first applies and the others are acknowledged.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use tch::Tensor;
use tonic::transport::Channel;

use super::wire::{self, pb, KIND_POLICY, KIND_REFERENCE, PROTOCOL_VERSION};

type Client = pb::param_server_client::ParamServerClient<Channel>;

/// What the servers told us in `Hello`.
#[derive(Debug, Clone)]
pub struct Topology {
    /// (name, shape) per parameter, for the whole model.
    pub params: BTreeMap<String, Vec<i64>>,
    /// Which shard owns each parameter.
    pub owner: BTreeMap<String, usize>,
    /// The version every shard is at.
    pub version: u64,
    pub total_steps: u64,
    /// The servers' checkpoint interval (how many steps of gradients to keep for replay).
    pub checkpoint_every: u64,
}

/// Weights pulled from all shards.
pub struct Pulled {
    pub version: u64,
    pub reference_version: u64,
    pub policy: BTreeMap<String, Tensor>,
    pub reference: Option<BTreeMap<String, Tensor>>,
    pub bytes: u64,
}

pub struct ShardClients {
    addrs: Vec<String>,
    clients: Vec<Client>,
    pub learner: u32,
    pub num_learners: u32,
    /// How long to keep retrying a server that is down (restarting) before giving up.
    pub retry_for: Duration,
    /// Pushed gradients of the last steps, to replay to a restarted server.
    replay: BTreeMap<u64, Pushed>,
    /// The kind the learner computes in: weights are pulled in its wire dtype.
    pub weights_kind: tch::Kind,
}

/// One step as this learner sent it: its push to each shard and the norm of the step's whole
/// gradient, once known (a replayed step is applied with the norm it had).
#[derive(Clone)]
struct Pushed {
    per_shard: Vec<Vec<pb::PushMessage>>,
    global_norm: Option<f64>,
}

/// Retries `f` with exponential backoff (0.1 s doubling to 5 s) until `deadline`; gives up
/// at once on errors that a retry cannot fix (version or topology mismatch, bad input).
async fn with_backoff<T, F, Fut>(what: &str, retry_for: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if retryable(&s) && start.elapsed() < retry_for => {
                tracing::warn!(what, error = %s.message(), ?delay, "parameter server unavailable, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            // Still unreachable after `retry_for`: the server is lost, not this learner.
            Err(s) if retryable(&s) => {
                return Err(crate::exit::peer_lost(anyhow::anyhow!(
                    "{what}: {} ({:?}), unreachable for {retry_for:?}",
                    s.message(),
                    s.code()
                )))
            }
            Err(s) => bail!("{what}: {} ({:?})", s.message(), s.code()),
        }
    }
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
    )
}

impl ShardClients {
    /// Connects lazily to every address; the first RPC establishes the connection.
    pub fn new(
        addrs: &[String],
        learner: u32,
        num_learners: u32,
        retry_for: Duration,
    ) -> Result<Self> {
        if addrs.is_empty() {
            bail!("no parameter servers given (RLT_PARAM_SERVERS / --param-servers)");
        }
        if learner >= num_learners {
            bail!("learner index {learner} is out of range for {num_learners} learners");
        }
        let mut clients = Vec::new();
        for a in addrs {
            let uri = if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
            let ch = Channel::from_shared(uri.clone())
                .with_context(|| {
                    format!("parameter server address {a:?} is not a valid host:port")
                })?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .initial_stream_window_size(wire::STREAM_WINDOW)
                .initial_connection_window_size(wire::CONNECTION_WINDOW)
                .max_frame_size(wire::MAX_FRAME)
                .connect_lazy();
            clients.push(
                Client::new(ch)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            );
        }
        Ok(ShardClients {
            addrs: addrs.to_vec(),
            clients,
            learner,
            num_learners,
            retry_for,
            replay: BTreeMap::new(),
            weights_kind: tch::Kind::Float,
        })
    }

    pub fn num_shards(&self) -> usize {
        self.clients.len()
    }

    /// Says hello to every server and checks they agree: each reports the shard index of its
    /// position in the list, the same shard count (= the number of addresses), the same
    /// number of learners, and the same version.
    pub async fn hello(&mut self) -> Result<Topology> {
        let mut params = BTreeMap::new();
        let mut owner = BTreeMap::new();
        let mut versions = Vec::new();
        let mut total_steps = 0;
        let mut checkpoint_every = 1;
        for (i, c) in self.clients.iter_mut().enumerate() {
            let req = pb::HelloRequest {
                protocol: PROTOCOL_VERSION,
                learner: self.learner,
                num_learners: self.num_learners,
            };
            let what = format!("hello to parameter server {} at {}", i, self.addrs[i]);
            let r = with_backoff(&what, self.retry_for, || {
                let mut c = c.clone();
                async move { c.hello(req).await.map(|r| r.into_inner()) }
            })
            .await?;
            if r.protocol != PROTOCOL_VERSION {
                bail!(
                    "parameter server {i} speaks wire protocol {}, this learner {PROTOCOL_VERSION}",
                    r.protocol
                );
            }
            if r.num_shards as usize != self.addrs.len() {
                bail!(
                    "this learner was given {} parameter servers but server {} ({}) belongs to a set of {}; \
                     RLT_PARAM_SERVERS must list every server, in shard order",
                    self.addrs.len(),
                    i,
                    self.addrs[i],
                    r.num_shards
                );
            }
            if r.shard as usize != i {
                bail!(
                    "parameter server at position {i} of the list ({}) is shard {}; list the servers in shard order",
                    self.addrs[i],
                    r.shard
                );
            }
            for p in r.params {
                owner.insert(p.name.clone(), i);
                params.insert(p.name, p.shape);
            }
            versions.push(r.version);
            total_steps = r.total_steps;
            checkpoint_every = checkpoint_every.max(r.checkpoint_every);
        }
        let version = *versions.iter().min().unwrap();
        if versions.iter().any(|&v| v != version) {
            bail!(
                "parameter servers are at different versions {versions:?}: a server restarted from an older checkpoint \
                 while the others moved on; restart the RL stage so all resume from their last common checkpoint"
            );
        }
        Ok(Topology {
            params,
            owner,
            version,
            total_steps,
            checkpoint_every,
        })
    }

    /// Pulls the weights at version >= `min_version` from every shard (used when a learner
    /// starts or rejoins), checking every shard served the same version.
    pub async fn pull(&mut self, min_version: u64, include_reference: bool) -> Result<Pulled> {
        let mut parts = Vec::new();
        for i in 0..self.clients.len() {
            let what = format!("pull from parameter server {} at {}", i, self.addrs[i]);
            let c = self.clients[i].clone();
            parts.push(
                with_backoff(&what, self.retry_for, || {
                    pull_one(c.clone(), min_version, include_reference, self.weights_kind)
                })
                .await?,
            );
        }
        merge_pulls(parts, include_reference)
    }

    /// Pushes this learner's gradients for `step` (each shard gets the tensors it owns; `grads`
    /// are sums over `weight` units, i.e. groups; `stats` go to every server), then waits for
    /// and pulls the weights of version `step + 1` from every shard.
    ///
    /// A shard that went away meanwhile is reconnected with backoff; if it restarted from a
    /// checkpoint older than `step`, the steps since are replayed from the gradients this
    /// learner kept (every learner does the same, so the shard recomputes exactly the updates
    /// it lost). Returns the bytes pushed and the new weights.
    #[allow(clippy::too_many_arguments)]
    pub async fn push_and_pull(
        &mut self,
        step: u64,
        owner: &BTreeMap<String, usize>,
        grads: BTreeMap<String, Tensor>,
        weight: f64,
        stats: pb::StepStats,
        keep_steps: u64,
        include_reference: bool,
    ) -> Result<(u64, Pulled)> {
        let mut per_shard: Vec<Vec<pb::PushMessage>> = (0..self.clients.len())
            .map(|_| {
                vec![pb::PushMessage {
                    body: Some(pb::push_message::Body::Header(pb::PushHeader {
                        protocol: PROTOCOL_VERSION,
                        step,
                        learner: self.learner,
                        num_learners: self.num_learners,
                        weight,
                        stats: Some(stats),
                    })),
                }]
            })
            .collect();
        let mut bytes = 0;
        for (name, g) in grads {
            let shard = *owner
                .get(&name)
                .with_context(|| format!("no parameter server owns {name:?}"))?;
            let dtype = wire::wire_dtype(g.kind());
            for c in wire::owned_tensor_chunks(&name, g, KIND_POLICY, dtype) {
                bytes += c.data.len() as u64;
                per_shard[shard].push(pb::PushMessage {
                    body: Some(pb::push_message::Body::Chunk(c)),
                });
            }
        }
        self.replay.insert(
            step,
            Pushed {
                per_shard,
                global_norm: None,
            },
        );
        let oldest = step.saturating_sub(keep_steps);
        self.replay.retain(|&s, _| s >= oldest);
        let (me, retry_for) = ((self.learner, self.num_learners), self.retry_for);
        let what = |i: usize, phase: &str| {
            format!(
                "{phase} of step {step} with parameter server {i} at {}",
                self.addrs[i]
            )
        };

        // 1. Every shard holds this learner's gradients of `step`.
        let replay = &self.replay;
        let delivered = self.clients.iter().enumerate().map(|(i, c)| async move {
            with_backoff(&what(i, "push"), retry_for, move || {
                deliver(c.clone(), i, me, step, replay)
            })
            .await
        });
        for r in futures::future::join_all(delivered).await {
            r?;
        }
        // 2. The norm of the whole gradient: the shards' parts, added in shard order. A shard
        // that restarted meanwhile lost the pushes and gets them again before it answers.
        let parts = self.clients.iter().enumerate().map(|(i, c)| async move {
            let mut first = true;
            with_backoff(&what(i, "gradient norm"), retry_for, move || {
                let again = !std::mem::replace(&mut first, false);
                let mut c = c.clone();
                async move {
                    if again {
                        deliver(c.clone(), i, me, step, replay).await?;
                    }
                    let req = pb::GradNormRequest {
                        protocol: PROTOCOL_VERSION,
                        step,
                    };
                    Ok(c.grad_norm(req).await?.into_inner().squared_norm)
                }
            })
            .await
        });
        let mut squared = 0.0;
        for r in futures::future::join_all(parts).await {
            squared += r?;
        }
        let global_norm = squared.sqrt();
        if let Some(p) = self.replay.get_mut(&step) {
            p.global_norm = Some(global_norm);
        }
        // 3. Every shard applies the step with that norm; then the new weights.
        let replay = &self.replay;
        let weights_kind = self.weights_kind;
        let tasks = self.clients.iter().enumerate().map(|(i, c)| async move {
            let mut first = true;
            with_backoff(&what(i, "apply"), retry_for, move || {
                let again = !std::mem::replace(&mut first, false);
                let mut c = c.clone();
                async move {
                    if again {
                        deliver(c.clone(), i, me, step, replay).await?;
                    }
                    let req = pb::ApplyRequest {
                        protocol: PROTOCOL_VERSION,
                        step,
                        global_norm,
                    };
                    c.apply(req).await?;
                    pull_one(c, step + 1, include_reference, weights_kind).await
                }
            })
            .await
        });
        let mut parts = Vec::new();
        for r in futures::future::join_all(tasks).await {
            parts.push(r?);
        }
        Ok((bytes, merge_pulls(parts, include_reference)?))
    }

    pub async fn done(&mut self) -> Result<()> {
        for (i, c) in self.clients.iter_mut().enumerate() {
            let what = format!("done to parameter server {i}");
            let req = pb::DoneRequest {
                protocol: PROTOCOL_VERSION,
                learner: self.learner,
            };
            with_backoff(&what, self.retry_for, || {
                let mut c = c.clone();
                async move { c.done(req).await }
            })
            .await?;
        }
        Ok(())
    }
}

type Part = (pb::PullHeader, BTreeMap<(u32, String), Tensor>, u64);

async fn pull_one(
    mut c: Client,
    min_version: u64,
    include_reference: bool,
    weights_kind: tch::Kind,
) -> Result<Part, tonic::Status> {
    let req = pb::PullRequest {
        protocol: PROTOCOL_VERSION,
        min_version,
        include_reference,
        dtype: wire::wire_dtype(weights_kind),
    };
    let mut stream = c.pull(req).await?.into_inner();
    let mut header = None;
    let mut asm = wire::Assembler::default();
    while let Some(msg) = stream.next().await {
        match msg?.body {
            Some(pb::pull_message::Body::Header(h)) => header = Some(h),
            Some(pb::pull_message::Body::Chunk(ch)) => asm
                .add(ch)
                .map_err(|e| tonic::Status::data_loss(e.to_string()))?,
            None => {}
        }
    }
    let header = header.ok_or_else(|| tonic::Status::data_loss("pull reply without header"))?;
    let bytes = asm.bytes;
    let tensors = asm
        .finish()
        .map_err(|e| tonic::Status::data_loss(e.to_string()))?;
    Ok((header, tensors, bytes))
}

fn merge_pulls(parts: Vec<Part>, include_reference: bool) -> Result<Pulled> {
    let versions: Vec<u64> = parts.iter().map(|p| p.0.version).collect();
    let version = versions[0];
    if versions.iter().any(|&v| v != version) {
        bail!("parameter servers served different versions {versions:?} for the same step");
    }
    let mut policy = BTreeMap::new();
    let mut reference = BTreeMap::new();
    let mut bytes = 0;
    let mut reference_version = 0;
    for (h, tensors, b) in parts {
        bytes += b;
        reference_version = reference_version.max(h.reference_version);
        policy.extend(wire::of_kind(&tensors, KIND_POLICY));
        reference.extend(wire::of_kind(&tensors, KIND_REFERENCE));
    }
    Ok(Pulled {
        version,
        reference_version,
        policy,
        reference: include_reference.then_some(reference),
        bytes,
    })
}

/// Makes sure shard `i` holds this learner's gradients for `step`: a shard that restarted
/// from an older checkpoint is first replayed the steps since (each applied with the norm it
/// had, once every learner replayed it too).
async fn deliver(
    mut c: Client,
    i: usize,
    (learner, num_learners): (u32, u32),
    step: u64,
    replay: &BTreeMap<u64, Pushed>,
) -> Result<(), tonic::Status> {
    let hello = pb::HelloRequest {
        protocol: PROTOCOL_VERSION,
        learner,
        num_learners,
    };
    let mut at = c.hello(hello).await?.into_inner().version;
    if at < step {
        tracing::warn!(shard = i, from = at, to = step, "parameter server is behind (restarted from a checkpoint); replaying this learner's gradients");
    }
    while at <= step {
        let pushed = replay.get(&at).ok_or_else(|| {
            tonic::Status::failed_precondition(format!(
                "parameter server {i} restarted at version {at}, but this learner no longer holds its \
                 gradients of step {at} (it keeps the last steps since the server's checkpoint interval); \
                 restart the RL stage to resume all servers from their checkpoints"
            ))
        })?;
        match c
            .push(futures::stream::iter(pushed.per_shard[i].clone()))
            .await
        {
            Ok(_) => {}
            // Another learner's Apply completed this step meanwhile: carry on from where the
            // server is now.
            Err(s)
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("pushed gradients for step") =>
            {
                at = c.hello(hello).await?.into_inner().version;
                continue;
            }
            Err(s) => return Err(s),
        }
        if at == step {
            break;
        }
        let global_norm = pushed.global_norm.ok_or_else(|| {
            tonic::Status::internal(format!("the norm of step {at} was never computed"))
        })?;
        let req = pb::ApplyRequest {
            protocol: PROTOCOL_VERSION,
            step: at,
            global_norm,
        };
        c.apply(req).await?;
        at += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::grpo::GrpoConfig;
    use crate::rl::param_server::{ParamServer, ServeUntil, ServerConfig};
    use crate::rl::shard::{RlOptimizer, ShardState};
    use crate::train::optim::assign_shards;
    use crate::train::optim::{clip_coefficient, squared_norm, AdamWConfig};
    use rlt_api::layout::RunDir;
    use tch::Kind;

    fn weights() -> BTreeMap<String, Tensor> {
        let mut w = BTreeMap::new();
        w.insert("a".to_string(), Tensor::from_slice(&[1.0f32, 2.0]));
        w.insert("b".to_string(), Tensor::from_slice(&[3.0f32, 4.0, 5.0]));
        w.insert(
            "c".to_string(),
            Tensor::from_slice(&[6.0f32, 7.0, 8.0, 9.0]).view([2, 2]),
        );
        w
    }

    async fn start(servers: usize, learners: usize, ws: &std::path::Path) -> Vec<String> {
        let mut addrs = Vec::new();
        for shard in 0..servers {
            let cfg = ServerConfig {
                shard,
                num_shards: servers,
                num_learners: learners,
                total_steps: 2,
                optimizer: optimizer(),
                grpo: GrpoConfig {
                    ref_sync_every: 1,
                    ..GrpoConfig::default()
                },
                checkpoint_every: 1,
                stage_dir: RunDir::new(ws, "t").rl(),
                attempt: 0,
                reference_kind: Kind::Float,
            };
            let server = ParamServer::new(cfg, &weights()).unwrap();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap().to_string());
            tokio::spawn(server.serve(l, None, ServeUntil::AllLearnersDone));
        }
        addrs
    }

    fn optimizer() -> RlOptimizer {
        RlOptimizer {
            adamw: AdamWConfig::rl(),
            lr: 0.1,
            max_grad_norm: 1.0,
        }
    }

    fn ws(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("rlt-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Two learners push different gradients (weights 1 and 3) for two steps; the servers
    /// apply one update per step with their weighted average, clipped by the norm of the whole
    /// gradient over both shards: exactly what one AdamW over all parameters does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_synchronous_update_per_step_clipped_by_the_norm_of_the_whole_gradient() {
        let dir = ws("sync");
        let addrs = start(2, 2, &dir).await;
        let mut l0 = ShardClients::new(&addrs, 0, 2, Duration::from_secs(5)).unwrap();
        let mut l1 = ShardClients::new(&addrs, 1, 2, Duration::from_secs(5)).unwrap();
        let topo = l0.hello().await.unwrap();
        assert_eq!(topo.version, 0);
        assert_eq!(topo.params.len(), 3);
        assert!(topo.owner.values().any(|&s| s == 0) && topo.owner.values().any(|&s| s == 1));
        let g = |x: f32| -> BTreeMap<String, Tensor> {
            weights()
                .into_iter()
                .map(|(n, t)| (n, t.ones_like() * x as f64))
                .collect()
        };
        let stats = pb::StepStats {
            reward_sum: 2.0,
            samples: 2,
            ..Default::default()
        };
        // Sums over groups: learner 0 one group, learner 1 three. Step 0's average (-0.5 per
        // element, norm 1.5) is clipped; step 1's (0.05, norm 0.15) is not, and its update
        // depends on the moments step 0 left, so the clipping shows in the weights.
        let steps = [(g(1.0), g(-3.0)), (g(0.2), g(0.0))];
        let shallow = |m: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
            m.iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        };
        let grpo = GrpoConfig {
            ref_sync_every: 1,
            ..GrpoConfig::default()
        };
        let names: Vec<String> = weights().keys().cloned().collect();
        let mut whole =
            ShardState::fresh(names.clone(), &weights(), optimizer().adamw, Kind::Float).unwrap();
        // What clipping each shard by its own part's norm would give instead.
        let owner = assign_shards(
            &weights()
                .iter()
                .map(|(n, t)| (n.clone(), t.numel() as i64))
                .collect::<Vec<_>>(),
            2,
        );
        let mut per_shard =
            ShardState::fresh(names, &weights(), optimizer().adamw, Kind::Float).unwrap();
        let mut pulled = None;
        for (step, (g0, g1)) in steps.iter().enumerate() {
            let step = step as u64;
            let (r0, r1) = tokio::join!(
                l0.push_and_pull(step, &topo.owner, shallow(g0), 1.0, stats, 2, true),
                l1.push_and_pull(step, &topo.owner, shallow(g1), 3.0, stats, 2, true)
            );
            let (p0, p1) = (r0.unwrap().1, r1.unwrap().1);
            assert_eq!((p0.version, p1.version), (step + 1, step + 1));
            for (n, t) in &p0.policy {
                assert!(p1.policy[n].equal(t));
            }
            let avg: Vec<Tensor> = whole
                .names
                .iter()
                .map(|n| (&g0[n] + &g1[n]) / 4.0)
                .collect();
            let scale = clip_coefficient(squared_norm(&avg).sqrt(), 1.0);
            whole.apply(&avg, 0.1, scale, &grpo);
            let own: Vec<Tensor> = per_shard
                .names
                .iter()
                .zip(&avg)
                .map(|(n, g)| {
                    let mine: Vec<Tensor> = per_shard
                        .names
                        .iter()
                        .zip(&avg)
                        .filter(|(m, _)| owner[*m] == owner[n])
                        .map(|(_, g)| g.shallow_clone())
                        .collect();
                    g * clip_coefficient(squared_norm(&mine).sqrt(), 1.0)
                })
                .collect();
            per_shard.apply(&own, 0.1, 1.0, &grpo);
            pulled = Some(p0);
        }
        let p0 = pulled.unwrap();
        let mut differs = false;
        for (i, n) in whole.names.iter().enumerate() {
            assert!(
                p0.policy[n].allclose(&whole.params[i], 1e-6, 1e-7, false),
                "{n}: {:?} vs {:?}",
                p0.policy[n],
                whole.params[i]
            );
            differs |= !p0.policy[n].allclose(&per_shard.params[i], 1e-6, 1e-7, false);
            // The reference was re-synced at every step here.
            assert!(p0.reference.as_ref().unwrap()[n].allclose(
                &whole.reference[i],
                1e-6,
                1e-7,
                false
            ));
        }
        assert!(
            differs,
            "per-shard clipping would give the same weights: the test shows nothing"
        );
        assert_eq!(p0.reference_version, 2);
        // Each shard checkpointed step 2.
        for s in 0..2 {
            assert_eq!(
                rlt_api::layout::latest_checkpoint(&RunDir::new(&dir, "t").rl().shard(s), 0)
                    .unwrap()
                    .0,
                2
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_server_list_or_protocol_fails_fast() {
        let dir = ws("bad");
        let addrs = start(2, 1, &dir).await;
        let err = ShardClients::new(&addrs[..1], 0, 1, Duration::from_secs(5))
            .unwrap()
            .hello()
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("given 1 parameter servers but server 0"),
            "{err}"
        );
        let swapped = vec![addrs[1].clone(), addrs[0].clone()];
        let err = ShardClients::new(&swapped, 0, 1, Duration::from_secs(5))
            .unwrap()
            .hello()
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("is shard 1; list the servers in shard order"),
            "{err}"
        );
        let err = ShardClients::new(&addrs, 0, 3, Duration::from_secs(5))
            .unwrap()
            .hello()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("started for 3 learners"), "{err}");
        let mut raw = Client::connect(format!("http://{}", addrs[0]))
            .await
            .unwrap();
        let err = raw
            .hello(pb::HelloRequest {
                protocol: PROTOCOL_VERSION + 1,
                learner: 0,
                num_learners: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("wire protocol version mismatch"),
            "{}",
            err.message()
        );
        // A push for a step the server is not collecting is refused with the reason.
        let header = pb::PushMessage {
            body: Some(pb::push_message::Body::Header(pb::PushHeader {
                protocol: PROTOCOL_VERSION,
                step: 5,
                learner: 0,
                num_learners: 1,
                weight: 1.0,
                stats: None,
            })),
        };
        let err = raw
            .push(futures::stream::iter(vec![header]))
            .await
            .unwrap_err();
        assert!(
            err.message()
                .contains("pushed gradients for step 5 but parameter server 0 is at version 0"),
            "{}",
            err.message()
        );
        // Nothing listening: the learner retries, then gives up naming the server.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = ShardClients::new(
            &[format!("127.0.0.1:{port}")],
            0,
            1,
            Duration::from_millis(300),
        )
        .unwrap()
        .hello()
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("hello to parameter server 0 at 127.0.0.1:{port}")),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
