//! Supervised fine-tuning on (prompt, completion) pairs with the loss on completion tokens
//! only: the warm-up stage (teacher format) and, later, the students' distillation fine-tune.
//!
//! Resumable: every `checkpoint_every` updates the model (HF layout), the AdamW state and the
//! step go into `<stage>/checkpoints/step-N-attempt-A/` (atomically, `COMPLETE` last); a
//! restarted run picks the latest complete one and continues with the same data order
//! (shuffles are a function of (seed, epoch), the position a function of the step). A
//! non-finite loss or gradient stops with an error before the update, so the last checkpoint
//! stays the last good state.
//!
//! Data-parallel: W ranks ([`run_sft_ranks`]) each take every W-th example of the global batch
//! and make one update together ([`crate::train::data_parallel`]); they reach the weights one rank
//! reaches with the same global batch. Rank 0 writes the model, each rank its share of the
//! optimizer state, into the same checkpoint.
use crate::data::PromptCompletion;
use crate::engine::sampling::{right_pad, SplitMix64};
use crate::metrics::Published;
use crate::model::checkpoint::{load_checkpoint, save_dir_atomically, CausalLm};
use crate::model::qwen2::{Qwen2, LOGIT_CHUNK};
use crate::model::tokenizer::Tokenizer;
use crate::train::collective::Group;
use crate::train::data_parallel::{local_rows, Update};
use crate::train::optim::{AdamWConfig, LrSchedule};
use anyhow::{bail, Context, Result};
use rlt_api::contract::TrainingFigures;
use rlt_api::layout::{
    checkpoint_name, is_complete, latest_checkpoint, parse_checkpoint_name, StageDir,
};
use rlt_api::spec::{activation_checkpointing, defaults, DistillationStage, WarmupStage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub use crate::train::data_parallel::OPTIMIZER_FILE;
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    pub epochs: usize,
    /// Examples per optimizer update (each rank splits its share into `grad_accum`
    /// micro-batches).
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub adamw: AdamWConfig,
    pub clip_grad_norm: f64,
    /// Longer examples are cut to this many tokens (counted in the outcome).
    pub max_len: usize,
    /// Recompute each decoder layer in the backward pass ([`Qwen2::backward_checkpointed`]):
    /// less memory, the same gradients, about a third more compute.
    #[serde(default)]
    pub activation_checkpointing: bool,
    pub checkpoint_every: u64,
    /// Older checkpoints of this stage beyond this many are deleted while it trains.
    pub keep_checkpoints: usize,
    /// Checkpoints kept once `final` is complete (`spec.workspace.keepCheckpoints`).
    #[serde(default)]
    pub keep_after_final: usize,
    pub seed: u64,
    /// With several ranks and micro-batches: sum each update's micro-batches locally in f32
    /// (a whole-model buffer per rank) and reduce them over the ranks once per update, rather
    /// than once per micro-batch into a 1/W share. Set by the memory preflight where the
    /// buffer fits ([`crate::train::memory::check_stage`]).
    #[serde(default)]
    pub local_sums: bool,
    /// Stop after this many updates (default: epochs x batches per epoch).
    pub max_steps: Option<u64>,
    pub log_every: u64,
}

impl SftConfig {
    /// The warm-up's fine-tune as `spec.warmup` gives it.
    pub fn warmup(w: &WarmupStage) -> Self {
        SftConfig {
            epochs: w.epochs as usize,
            batch_size: w.batch_size as usize,
            lr: w.learning_rate,
            warmup_ratio: w.warmup_ratio,
            adamw: AdamWConfig::from(&w.optimizer),
            clip_grad_norm: w.optimizer.max_grad_norm,
            max_len: w.max_length as usize,
            activation_checkpointing: activation_checkpointing(
                w.activation_checkpointing,
                w.max_length,
            ),
            checkpoint_every: w.checkpoint_interval.into(),
            ..Self::unstaged()
        }
    }

    /// A student's fine-tune as `spec.distillation` gives it (the reference students' recipe
    /// by default: batch 96, 10% warm-up, betas (0.9, 0.999), no weight decay).
    pub fn distillation(d: &DistillationStage) -> Self {
        SftConfig {
            epochs: d.epochs as usize,
            batch_size: d.batch_size as usize,
            lr: d.learning_rate,
            warmup_ratio: d.warmup_ratio,
            adamw: AdamWConfig::from(&d.optimizer),
            clip_grad_norm: d.optimizer.max_grad_norm,
            max_len: d.max_length as usize,
            activation_checkpointing: activation_checkpointing(
                d.activation_checkpointing,
                d.max_length,
            ),
            checkpoint_every: d.checkpoint_interval.into(),
            ..Self::unstaged()
        }
    }

    /// The settings no stage of the spec has (process-local: accumulation, logging, seeds).
    fn unstaged() -> Self {
        let w = defaults::warmup();
        SftConfig {
            epochs: w.epochs as usize,
            batch_size: w.batch_size as usize,
            grad_accum: 1,
            lr: w.learning_rate,
            warmup_ratio: w.warmup_ratio,
            adamw: AdamWConfig::from(&w.optimizer),
            clip_grad_norm: w.optimizer.max_grad_norm,
            max_len: w.max_length as usize,
            activation_checkpointing: false,
            checkpoint_every: w.checkpoint_interval.into(),
            keep_checkpoints: 2,
            keep_after_final: defaults::workspace().keep_checkpoints as usize,
            seed: 0,
            local_sums: false,
            max_steps: None,
            log_every: 10,
        }
    }
}

impl Default for SftConfig {
    /// The spec's default warm-up (the RLT recipe).
    fn default() -> Self {
        SftConfig::warmup(&defaults::warmup())
    }
}

/// What to fine-tune, on what, and where to write.
pub struct SftJob {
    /// Stage name for logs and metric names (`warmup`, `distill`).
    pub name: String,
    pub stage: StageDir,
    pub attempt: u32,
    /// Initial checkpoint directory (used unless a checkpoint of this stage exists).
    pub init_model: PathBuf,
    pub device: Device,
    pub kind: Kind,
    pub pairs: Vec<PromptCompletion>,
    pub published: Option<Published>,
    pub progress_bar: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub total_steps: u64,
    pub attempt: u32,
    pub last_loss: f64,
    pub resumed_from_step: Option<u64>,
    pub config: SftConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SftOutcome {
    pub final_dir: PathBuf,
    pub total_steps: u64,
    /// Steps run by this process (0 when the stage was already complete).
    pub steps_run: u64,
    pub resumed_from_step: Option<u64>,
    /// Mean loss of the first and last `log_every` steps run by this process.
    pub first_losses: f64,
    pub last_losses: f64,
    pub tokens_per_second: f64,
    /// Examples cut to `max_len`.
    pub truncated: usize,
}

struct Encoded {
    ids: Vec<i64>,
    /// Index of the first completion token.
    completion_start: usize,
}

fn encode_pairs(
    tok: &Tokenizer,
    pairs: &[PromptCompletion],
    max_len: usize,
) -> Result<(Vec<Encoded>, usize)> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut truncated = 0;
    for (i, p) in pairs.iter().enumerate() {
        let mut ids = tok
            .encode(&p.prompt)
            .with_context(|| format!("example {i}"))?;
        let start = ids.len();
        ids.extend(
            tok.encode(&p.completion)
                .with_context(|| format!("example {i}"))?,
        );
        if start + 1 >= max_len {
            bail!("example {i}: its prompt alone has {start} tokens, max_len is {max_len}; raise --max-len");
        }
        if ids.len() > max_len {
            ids.truncate(max_len);
            truncated += 1;
        }
        out.push(Encoded {
            ids,
            completion_start: start,
        });
    }
    Ok((out, truncated))
}

/// Epoch `e`'s order of the examples: a Fisher-Yates shuffle seeded by (seed, e).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

struct Gauges {
    step: prometheus::IntGauge,
    total: prometheus::IntGauge,
    loss: prometheus::Gauge,
    lr: prometheus::Gauge,
    grad_norm: prometheus::Gauge,
    tps: prometheus::Gauge,
}

impl Gauges {
    fn new(name: &str, p: &Option<Published>) -> Result<Self> {
        // Job names may carry hyphens (student names do); metric names may not.
        let name = name.replace('-', "_");
        let g = Gauges {
            step: prometheus::IntGauge::new(format!("rlt_{name}_step"), "optimizer updates done")?,
            total: prometheus::IntGauge::new(
                format!("rlt_{name}_total_steps"),
                "optimizer updates planned",
            )?,
            loss: prometheus::Gauge::new(
                format!("rlt_{name}_loss"),
                "completion cross-entropy of the last update",
            )?,
            lr: prometheus::Gauge::new(
                format!("rlt_{name}_learning_rate"),
                "learning rate of the last update",
            )?,
            grad_norm: prometheus::Gauge::new(
                format!("rlt_{name}_grad_norm"),
                "gradient norm before clipping",
            )?,
            tps: prometheus::Gauge::new(
                format!("rlt_{name}_tokens_per_second"),
                "tokens processed per second",
            )?,
        };
        if let Some(p) = p {
            for c in [&g.loss, &g.lr, &g.grad_norm, &g.tps] {
                p.registry.register(Box::new(c.clone()))?;
            }
            p.registry.register(Box::new(g.step.clone()))?;
            p.registry.register(Box::new(g.total.clone()))?;
        }
        Ok(g)
    }
}

/// Deletes the complete checkpoints in `dir` but the newest `keep`.
pub fn prune_checkpoints(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let (step, _) = parse_checkpoint_name(e.file_name().to_str()?)?;
            is_complete(&e.path()).then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    let n = found.len();
    for (_, path) in found.into_iter().take(n.saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Summed negative log-likelihood of the tokens marked in `loss_mask` (`[batch, seq]`, 1 =
/// completion token) of right-padded `ids`, divided by `denominator` (the number of completion
/// tokens of the whole optimizer batch, so micro-batch gradients add up to the batch mean).
pub fn completion_loss(
    model: &Qwen2,
    ids: &Tensor,
    loss_mask: &Tensor,
    denominator: usize,
) -> Tensor {
    // Right padding needs no attention mask: real tokens never attend to later pads.
    let t = ids.size()[1];
    let lp = crate::engine::logprobs::sequence_logprobs(model, ids, None, 1.0);
    let m = loss_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    -(lp * m).sum(Kind::Float) / denominator.max(1) as f64
}

/// [`completion_loss`] and its backward pass with activation checkpointing, the logits
/// computed `chunk` positions at a time. Returns the loss.
pub fn completion_loss_checkpointed(
    model: &Qwen2,
    ids: &Tensor,
    loss_mask: &Tensor,
    denominator: usize,
    chunk: i64,
) -> f64 {
    let t = ids.size()[1];
    let targets = ids.narrow(1, 1, t - 1);
    let m = loss_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    model.backward_checkpointed(ids, None, chunk, |h, start| {
        // Position p predicts token p + 1: the last position predicts nothing.
        let len = h.size()[1].min(t - 1 - start);
        if len <= 0 {
            return Tensor::from(0.0);
        }
        let logits = model.lm_logits(&h.narrow(1, 0, len));
        let lp =
            crate::engine::logprobs::token_logprobs(&logits, &targets.narrow(1, start, len), 1.0);
        -(lp * m.narrow(1, start, len)).sum(Kind::Float) / denominator.max(1) as f64
    })
}

/// Runs (or resumes, or finds already done) one SFT stage in this process alone.
pub fn run_sft(job: SftJob, cfg: &SftConfig) -> Result<SftOutcome> {
    run_sft_ranks(job, cfg, &mut Group::single())
}

/// Runs one SFT stage as rank `group.rank` of `group.world` data-parallel ranks (every rank
/// is given the same job and configuration).
pub fn run_sft_ranks(job: SftJob, cfg: &SftConfig, group: &mut Group) -> Result<SftOutcome> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 {
        bail!(
            "batch size {} and grad_accum {} must be positive",
            cfg.batch_size,
            cfg.grad_accum
        );
    }
    if job.pairs.is_empty() {
        bail!("no training examples");
    }
    let final_dir = job.stage.final_dir();
    if is_complete(&final_dir) {
        tracing::info!(stage = %job.name, dir = %final_dir.display(), "stage output already complete; nothing to do");
        return Ok(SftOutcome {
            total_steps: Schedule::new(cfg, job.pairs.len()).total_steps,
            final_dir,
            steps_run: 0,
            resumed_from_step: None,
            first_losses: f64::NAN,
            last_losses: f64::NAN,
            tokens_per_second: 0.0,
            truncated: 0,
        });
    }
    let mut run = SftRun::open(job, cfg, group)?;
    for step in run.start..run.schedule.total_steps {
        let (loss, grad_norm, tokens) = run.train_step(step, group)?;
        run.record(step, loss, grad_norm, tokens);
        run.checkpoint_if_due(step + 1, group)?;
    }
    run.finish(group)
}

/// How many updates a stage makes and which examples each one takes.
struct Schedule {
    steps_per_epoch: u64,
    total_steps: u64,
}

impl Schedule {
    fn new(cfg: &SftConfig, examples: usize) -> Self {
        let steps_per_epoch = examples.div_ceil(cfg.batch_size) as u64;
        let total_steps = cfg.max_steps.unwrap_or(cfg.epochs as u64 * steps_per_epoch);
        Schedule {
            steps_per_epoch,
            total_steps,
        }
    }
}

/// One rank's fine-tune in progress: the model, its optimizer share, the data, and the
/// figures of the steps run so far.
struct SftRun<'c> {
    job: SftJob,
    cfg: &'c SftConfig,
    rank: usize,
    world: usize,
    lm: CausalLm,
    tok: Tokenizer,
    update: Update,
    data: Vec<Encoded>,
    truncated: usize,
    schedule: Schedule,
    /// The checkpoint this process resumed from, as (step, directory).
    resume: Option<(u64, PathBuf)>,
    start: u64,
    sched: LrSchedule,
    published: Option<Published>,
    gauges: Gauges,
    bar: indicatif::ProgressBar,
    /// The current epoch's order of the examples, as (epoch, order).
    order: (u64, Vec<usize>),
    losses: Vec<f64>,
    first_losses: Option<f64>,
    last_loss: f64,
    tokens: usize,
    t0: Instant,
    /// Tokens and time at the last log line (the logged rate is the window's).
    window: (usize, Instant),
}

impl<'c> SftRun<'c> {
    /// Loads the model (from this stage's latest checkpoint, else the initial one), the
    /// optimizer share, and the encoded examples.
    fn open(job: SftJob, cfg: &'c SftConfig, group: &Group) -> Result<Self> {
        let (rank, world) = (group.rank, group.world);
        let lead = rank == 0;
        let schedule = Schedule::new(cfg, job.pairs.len());
        let total_steps = schedule.total_steps;
        let resume = latest_checkpoint(&job.stage.checkpoints(), job.attempt);
        let (lm, tok) = match &resume {
            Some((step, dir)) => {
                tracing::info!(stage = %job.name, step, dir = %dir.display(), "resuming from checkpoint");
                load_checkpoint(dir, job.device, job.kind)?
            }
            None => load_checkpoint(&job.init_model, job.device, job.kind)?,
        };
        let vars = lm.vs.variables().into_iter().collect();
        let mut update = Update::new(vars, group, cfg.adamw, cfg.local_sums);
        let start = match &resume {
            Some((step, dir)) => {
                update.load(dir)?;
                *step
            }
            None => 0,
        };
        let (data, truncated) = encode_pairs(&tok, &job.pairs, cfg.max_len)?;
        if truncated > 0 && lead {
            tracing::warn!(truncated, max_len = cfg.max_len, "examples cut to max_len");
        }
        let sched = LrSchedule::with_warmup_ratio(cfg.lr, total_steps, cfg.warmup_ratio);
        let published = if lead { job.published.clone() } else { None };
        let gauges = Gauges::new(&job.name, &published)?;
        gauges.total.set(total_steps as i64);
        let bar = if job.progress_bar && lead {
            let b = indicatif::ProgressBar::new(total_steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(job.name.clone());
            b.set_position(start);
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        tracing::info!(stage = %job.name, rank, world, examples = data.len(), total_steps, start, params = lm.num_parameters(), "training");
        Ok(SftRun {
            job,
            cfg,
            rank,
            world,
            lm,
            tok,
            update,
            data,
            truncated,
            schedule,
            resume,
            start,
            sched,
            published,
            gauges,
            bar,
            order: (u64::MAX, vec![]),
            losses: Vec::new(),
            first_losses: None,
            last_loss: f64::NAN,
            tokens: 0,
            t0: Instant::now(),
            window: (0, Instant::now()),
        })
    }

    /// The examples of update `step`: the step's slice of its epoch's order.
    fn batch(&mut self, step: u64) -> Vec<&Encoded> {
        let spe = self.schedule.steps_per_epoch;
        let epoch = step / spe;
        if epoch != self.order.0 {
            self.order = (epoch, epoch_order(self.data.len(), self.cfg.seed, epoch));
        }
        let order = &self.order.1;
        let k = (step % spe) as usize * self.cfg.batch_size;
        order[k..(k + self.cfg.batch_size).min(order.len())]
            .iter()
            .map(|&i| &self.data[i])
            .collect()
    }

    /// Forward and backward over this rank's share of the step's batch, then one update
    /// together with the other ranks. Returns the global (loss, gradient norm, tokens).
    fn train_step(&mut self, step: u64, group: &mut Group) -> Result<(f64, f64, usize)> {
        let (rank, world, cfg) = (self.rank, self.world, self.cfg);
        let (device, pad) = (self.job.device, self.tok.pad_id());
        let batch = self.batch(step);
        // Every rank knows the whole batch: each divides its loss by the batch's completion
        // tokens, so the ranks' gradients add up to the batch mean.
        let targets: usize = batch.iter().map(|e| e.ids.len() - e.completion_start).sum();
        let share = local_rows(&batch, rank, world);
        let mine: Vec<Vec<i64>> = share.iter().map(|e| e.ids.clone()).collect();
        let starts: Vec<usize> = share.iter().map(|e| e.completion_start).collect();
        // Every rank makes the same number of micro-steps (each one is a collective), sized
        // by the largest share: rank 0's, with the rows dealt round-robin.
        let most = batch.len().div_ceil(world);
        let micro = most.div_ceil(cfg.grad_accum).max(1);
        let (mut loss_local, mut tokens_local) = (0.0, 0usize);
        for m in 0..most.div_ceil(micro) {
            let range = (m * micro).min(mine.len())..((m + 1) * micro).min(mine.len());
            if range.is_empty() {
                self.update.accumulate(group)?;
                continue;
            }
            let rows = &mine[range.clone()];
            let (ids, _) = right_pad(rows, pad, device);
            let loss_rows: Vec<Vec<i64>> = rows
                .iter()
                .zip(&starts[range])
                .map(|(r, &start)| (0..r.len()).map(|i| (i >= start) as i64).collect())
                .collect();
            let (loss_mask, _) = right_pad(&loss_rows, 0, device);
            let model = &self.lm.model;
            loss_local += if cfg.activation_checkpointing {
                completion_loss_checkpointed(model, &ids, &loss_mask, targets, LOGIT_CHUNK)
            } else {
                let loss = completion_loss(model, &ids, &loss_mask, targets);
                loss.backward();
                loss.double_value(&[])
            };
            self.update.accumulate(group)?;
            tokens_local += rows.iter().map(Vec::len).sum::<usize>();
        }
        let reduced = self
            .update
            .reduce(group, [loss_local, tokens_local as f64])?;
        let ([loss, step_tokens], grad_norm) = (reduced.sums, reduced.grad_norm);
        let ckpt_root = self.job.stage.checkpoints();
        if !loss.is_finite() {
            bail!(
                "{}: loss is {loss} at step {step}; stopping (last good checkpoint kept in {})",
                self.job.name,
                ckpt_root.display()
            );
        }
        if !grad_norm.is_finite() {
            bail!("{}: gradient norm is {grad_norm} at step {step}; stopping (last good checkpoint kept in {})", self.job.name, ckpt_root.display());
        }
        let lr = self.sched.lr(step);
        self.update.step(group, lr, cfg.clip_grad_norm, &reduced)?;
        Ok((loss, grad_norm, step_tokens as usize))
    }

    /// The figures of update `step`: gauges, published figures, progress bar, log line.
    fn record(&mut self, step: u64, loss: f64, grad_norm: f64, step_tokens: usize) {
        let total_steps = self.schedule.total_steps;
        let lr = self.sched.lr(step);
        self.tokens += step_tokens;
        self.last_loss = loss;
        self.losses.push(loss);
        let done = step + 1;
        let tps = self.tokens as f64 / self.t0.elapsed().as_secs_f64().max(1e-9);
        let g = &self.gauges;
        g.step.set(done as i64);
        g.loss.set(loss);
        g.lr.set(lr);
        g.grad_norm.set(grad_norm);
        g.tps.set(tps);
        if let Some(p) = &self.published {
            p.set_figures(TrainingFigures {
                step: done,
                total_steps,
                tokens_per_second: Some(tps),
                ..Default::default()
            });
        }
        self.bar.set_position(done);
        self.bar.set_message(format!("loss {loss:.4}"));
        let every = self.cfg.log_every.max(1);
        if done.is_multiple_of(every) || done == total_steps {
            let n = self.losses.len().min(every as usize);
            let mean = self.losses[self.losses.len() - n..].iter().sum::<f64>() / n as f64;
            self.first_losses.get_or_insert(mean);
            let elapsed = self.window.1.elapsed().as_secs_f64().max(1e-9);
            let wtps = (self.tokens - self.window.0) as f64 / elapsed;
            self.window = (self.tokens, Instant::now());
            if self.bar.is_hidden() && self.rank == 0 {
                tracing::info!(stage = %self.job.name, step = done, total_steps, loss = mean, lr, grad_norm, tokens_per_s = wtps as u64, "step");
            }
        }
    }

    fn state(&self, step: u64) -> TrainerState {
        TrainerState {
            step,
            total_steps: self.schedule.total_steps,
            attempt: self.job.attempt,
            last_loss: self.last_loss,
            resumed_from_step: self.resume.as_ref().map(|r| r.0),
            config: self.cfg.clone(),
        }
    }

    /// Every `checkpoint_every` updates (but not after the last: `final` follows), the
    /// model, every rank's optimizer share and the trainer state, then older ones pruned.
    fn checkpoint_if_due(&self, done: u64, group: &mut Group) -> Result<()> {
        if !done.is_multiple_of(self.cfg.checkpoint_every.max(1))
            || done >= self.schedule.total_steps
        {
            return Ok(());
        }
        let ckpt_root = self.job.stage.checkpoints();
        let dir = ckpt_root.join(checkpoint_name(done, self.job.attempt));
        let state = self.state(done);
        save_checkpoint(&dir, group, &self.update, |tmp| {
            self.lm.save(tmp)?;
            self.tok.save(tmp)?;
            std::fs::write(
                tmp.join(TRAINER_STATE_FILE),
                serde_json::to_string_pretty(&state)?,
            )?;
            Ok(())
        })?;
        if self.rank == 0 {
            prune_checkpoints(&ckpt_root, self.cfg.keep_checkpoints.max(1));
            tracing::info!(stage = %self.job.name, step = done, dir = %dir.display(), "checkpoint saved");
        }
        Ok(())
    }

    /// Rank 0 writes `final`; every rank returns once it is there.
    fn finish(self, group: &mut Group) -> Result<SftOutcome> {
        self.bar.finish_and_clear();
        let total_steps = self.schedule.total_steps;
        let final_dir = self.job.stage.final_dir();
        if self.rank == 0 {
            save_final(&final_dir, &self.lm, &self.tok, &self.state(total_steps))?;
            // What later stages read is `final`; at 7B each checkpoint is tens of GB.
            prune_checkpoints(&self.job.stage.checkpoints(), self.cfg.keep_after_final);
        }
        // No rank reports success before the final model is there.
        group.barrier()?;
        let n = self
            .losses
            .len()
            .min(self.cfg.log_every.max(1) as usize)
            .max(1);
        let last_losses = self.losses.iter().rev().take(n).sum::<f64>() / n as f64;
        Ok(SftOutcome {
            final_dir,
            total_steps,
            steps_run: total_steps - self.start,
            resumed_from_step: self.resume.map(|r| r.0),
            first_losses: self.first_losses.unwrap_or(last_losses),
            last_losses,
            tokens_per_second: self.tokens as f64 / self.t0.elapsed().as_secs_f64().max(1e-9),
            truncated: self.truncated,
        })
    }
}

/// Writes one checkpoint of a (possibly data-parallel) fine-tune: each rank other than 0
/// stages its optimizer share beside the checkpoint, then rank 0 writes the model (`fill`),
/// its own share and the staged ones into the directory atomically, so the checkpoint
/// becomes complete with every rank's state in it or not at all.
fn save_checkpoint(
    dir: &Path,
    group: &mut Group,
    update: &Update,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let staging = dir.with_file_name(format!(".{name}.ranks"));
    if group.rank != 0 {
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        let file = staging.join(update.optimizer_file());
        let tmp = staging.join(format!(".{}", update.optimizer_file()));
        update.optimizer.save(&tmp)?;
        std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    }
    group.barrier()?;
    if group.rank == 0 {
        save_dir_atomically(dir, |tmp| {
            fill(tmp)?;
            update.optimizer.save(&tmp.join(update.optimizer_file()))?;
            if group.world > 1 {
                for entry in std::fs::read_dir(&staging)
                    .with_context(|| format!("reading {}", staging.display()))?
                {
                    let from = entry?.path();
                    if let Some(n) = from
                        .file_name()
                        .filter(|n| !n.to_string_lossy().starts_with('.'))
                    {
                        std::fs::rename(&from, tmp.join(n))
                            .with_context(|| format!("moving {}", from.display()))?;
                    }
                }
            }
            Ok(())
        })?;
        let _ = std::fs::remove_dir_all(&staging);
    }
    // Every rank continues only once the checkpoint is complete (or rank 0 failed writing it).
    group.barrier()
}

fn save_final(dir: &Path, lm: &CausalLm, tok: &Tokenizer, state: &TrainerState) -> Result<()> {
    save_dir_atomically(dir, |tmp| {
        lm.save(tmp)?;
        tok.save(tmp)?;
        std::fs::write(
            tmp.join(TRAINER_STATE_FILE),
            serde_json::to_string_pretty(state)?,
        )
        .with_context(|| format!("writing {}", tmp.display()))
    })
}
