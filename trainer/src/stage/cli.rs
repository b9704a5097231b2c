//! Argument types and entry points of the `rlt-trainer` subcommands (kept in the library so
//! other roles and tests can call them directly).
use crate::device::{parse_device, parse_kind};
use crate::engine::sampling::{generate as sample, SamplingConfig};
use crate::model::checkpoint;
use crate::model::config::TinySpec;
use crate::stage::runconfig::{flag_or_run, Staged};
use anyhow::Result;
use clap::Args;
use rlt_api::contract::env;
use rlt_api::spec::defaults;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = env::DEVICE, default_value = "cpu")]
    pub device: String,
    /// f32 or bf16; default: the run's `spec.precision` (`auto`: bf16 on CUDA, f32 on the
    /// CPU), f32 without a run.
    #[arg(long)]
    pub dtype: Option<String>,
    /// libtorch intra-op CPU threads (default: libtorch's choice, one per core). Tiny models
    /// run faster on 1, especially on a busy machine.
    #[arg(long)]
    pub threads: Option<i32>,
}

impl DeviceArgs {
    /// Applies `--threads` and parses `--device` / `--dtype` (f32 unless given).
    pub fn resolve(&self) -> Result<(tch::Device, tch::Kind)> {
        self.resolve_for(None)
    }

    /// As [`DeviceArgs::resolve`], the dtype defaulting to the run's `spec.precision`.
    pub fn resolve_for(&self, run: Option<&Staged>) -> Result<(tch::Device, tch::Kind)> {
        use rlt_api::spec::Precision;
        if let Some(t) = self.threads {
            tch::set_num_threads(t.max(1));
        }
        let device = parse_device(&self.device)?;
        let kind = match (&self.dtype, run.map(|s| s.spec().precision)) {
            (Some(d), _) => parse_kind(d)?,
            (None, Some(Precision::Bf16)) => tch::Kind::BFloat16,
            (None, Some(Precision::Auto)) if device.is_cuda() => tch::Kind::BFloat16,
            _ => tch::Kind::Float,
        };
        Ok((device, kind))
    }
}

/// A tiny model's shape; defaults: the spec's `tiny: {}`.
#[derive(Args, Debug, Clone)]
pub struct TinyArgs {
    #[arg(long, default_value_t = defaults::tiny_hidden().into())]
    pub hidden_size: i64,
    #[arg(long, default_value_t = defaults::tiny_layers().into())]
    pub layers: i64,
    #[arg(long, default_value_t = defaults::tiny_heads().into())]
    pub heads: i64,
    #[arg(long, default_value_t = defaults::tiny_kv_heads().into())]
    pub kv_heads: i64,
    #[arg(long, default_value_t = defaults::tiny_intermediate().into())]
    pub intermediate_size: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl TinyArgs {
    pub fn spec(&self) -> TinySpec {
        TinySpec {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            intermediate_size: self.intermediate_size,
            seed: self.seed,
        }
    }
}

#[derive(Args, Debug)]
pub struct InitTinyArgs {
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub tiny: TinyArgs,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Write the weights in shards of at most this many MiB (as large published checkpoints
    /// are), not one file.
    #[arg(long)]
    pub max_shard_mib: Option<usize>,
}

pub fn init_tiny(a: InitTinyArgs) -> Result<()> {
    let shard = a
        .max_shard_mib
        .map_or(checkpoint::DEFAULT_MAX_SHARD_BYTES, |m| m << 20);
    checkpoint::init_tiny_sharded(&a.out, &a.tiny.spec(), parse_kind(&a.dtype)?, shard)?;
    tracing::info!(out = %a.out.display(), "wrote tiny checkpoint");
    Ok(())
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text; repeat for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let (device, kind) = a.device.resolve()?;
    let (lm, tok) = checkpoint::load_checkpoint(&a.model, device, kind)?;
    let prompts = a
        .prompt
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<Vec<_>>>()?;
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        stop_tokens: tok.eos_ids().to_vec(),
        seed: a.seed,
    };
    let out = sample(&lm.model, &prompts, tok.pad_id(), &cfg)?;
    for (p, ids) in a.prompt.iter().zip(out.token_lists()) {
        println!("{p}{}", tok.decode(&ids)?);
    }
    Ok(())
}

/// Which system prompts the chat formats use.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptStyle {
    /// Full-length prompts (real models).
    Standard,
    /// One-line prompts (tiny byte-level models).
    Short,
}

impl PromptStyle {
    pub fn prompts(self) -> crate::data::Prompts {
        match self {
            PromptStyle::Standard => crate::data::Prompts::standard(),
            PromptStyle::Short => crate::data::Prompts::short(),
        }
    }
}

/// Where the dataset comes from.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset file: .json / .jsonl (Bespoke-Stratos or question/solution/reasoning_trace rows);
    /// default: the run's training rows (`RLT_CONFIG`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Instead of --data: this many generated synthetic arithmetic examples (train split).
    #[arg(long, conflicts_with = "data")]
    pub synthetic: Option<usize>,
    /// Skip malformed rows (each one counted and logged) instead of failing.
    #[arg(long)]
    pub skip_malformed: bool,
    #[command(flatten)]
    pub prompts: PromptArgs,
}

/// The system prompts of the chats: overrides of the run's (`spec.prompts`), or of the
/// full-length defaults in a hand run.
#[derive(Args, Debug, Clone, Default)]
pub struct PromptArgs {
    /// The system prompts' default wording: full-length, or one line for tiny models.
    #[arg(long, value_enum)]
    pub prompts: Option<PromptStyle>,
    /// The teacher's system prompt (`spec.prompts.teacher`), replacing the style's.
    #[arg(long)]
    pub teacher_system: Option<String>,
    /// The student's system prompt (`spec.prompts.student`), replacing the style's; a Stratos
    /// row's own `system` still wins for that row.
    #[arg(long)]
    pub student_system: Option<String>,
}

impl PromptArgs {
    /// The run's prompts (`None`: the full-length defaults) with the flags given over them.
    pub fn over(&self, run: Option<&Staged>) -> crate::data::Prompts {
        let mut p = match (self.prompts, run) {
            (Some(style), _) => style.prompts(),
            (None, Some(s)) => crate::data::Prompts::of_run(s.spec()),
            (None, None) => crate::data::Prompts::standard(),
        };
        if let Some(t) = &self.teacher_system {
            p.teacher_system = t.clone();
        }
        if let Some(s) = &self.student_system {
            p.student_system = s.clone();
        }
        p
    }
}

impl DataArgs {
    /// `--data`, `--synthetic`, else the run's training rows.
    pub fn load(&self, run: Option<&Staged>) -> Result<Vec<crate::data::Example>> {
        use crate::data::synthetic;
        if let Some(n) = self.synthetic {
            let all = synthetic::generate(&synthetic::SyntheticSpec {
                count: n,
                ..Default::default()
            });
            return Ok(synthetic::split(all, SYNTHETIC_HELD_OUT, 0).0);
        }
        let path = &crate::stage::runconfig::flag_or_run(
            self.data.clone(),
            run.map(|s| s.inputs.train.clone()),
            "--data (or --synthetic)",
        )?;
        let loaded = crate::data::load_examples(path, self.skip_malformed)?;
        if !loaded.skipped.is_empty() {
            tracing::warn!(skipped = loaded.skipped.len(), file = %path.display(), "malformed rows skipped");
            for (row, why) in &loaded.skipped {
                tracing::warn!(file = %path.display(), %row, reason = %why, "skipped row");
            }
        }
        tracing::info!(rows = loaded.examples.len(), skipped = loaded.skipped.len(), file = %path.display(), "dataset loaded");
        Ok(loaded.examples)
    }
}

/// Fraction of synthetic questions held out from training (see `synth`).
pub const SYNTHETIC_HELD_OUT: f64 = 0.1;

#[derive(Args, Debug, Clone)]
pub struct StageArgs {
    /// Root of the shared workspace.
    #[arg(long, env = env::WORKSPACE)]
    pub workspace: PathBuf,
    /// The run's directory under the workspace; default: the run configuration's
    /// (`spec.workspace.directory`, else its name).
    #[arg(long = "run")]
    pub run: Option<String>,
    /// Stage attempt; fences checkpoint writes.
    #[arg(long, env = env::ATTEMPT, default_value_t = 0)]
    pub attempt: u32,
    /// Serve Prometheus /metrics and /status on this port.
    #[arg(long, env = env::METRICS_PORT)]
    pub metrics_port: Option<u16>,
    /// Address the metrics listener binds.
    #[arg(long, env = env::BIND_ADDRESS, default_value = "0.0.0.0")]
    pub bind: String,
}

/// Fine-tune settings as overrides: each flag given replaces that setting of the stage's
/// recipe (`spec.warmup` or `spec.distillation`, whose defaults are the recipe of a hand run).
#[derive(Args, Debug, Clone, Default)]
pub struct SftArgs {
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Examples per optimizer update.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per update (the batch is split into this many).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate (linear warm-up, then cosine).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub beta1: Option<f64>,
    #[arg(long)]
    pub beta2: Option<f64>,
    /// Largest global gradient norm (0 = no clipping).
    #[arg(long)]
    pub clip: Option<f64>,
    /// Longest training sequence in tokens.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Recompute each decoder layer in the backward pass (true/false).
    #[arg(long)]
    pub activation_checkpointing: Option<bool>,
    /// Optimizer steps between resumable checkpoints.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept (older ones are deleted).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many updates (default: epochs x batches per epoch).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long)]
    pub log_every: Option<u64>,
}

impl SftArgs {
    /// `base` with every setting the flags give replaced.
    pub fn over(&self, base: crate::train::sft::SftConfig) -> crate::train::sft::SftConfig {
        fn set<T: Copy>(dst: &mut T, flag: Option<T>) {
            if let Some(v) = flag {
                *dst = v;
            }
        }
        let mut c = base;
        set(&mut c.epochs, self.epochs);
        set(&mut c.batch_size, self.batch_size);
        set(&mut c.grad_accum, self.grad_accum);
        set(&mut c.lr, self.lr);
        set(&mut c.warmup_ratio, self.warmup_ratio);
        set(&mut c.adamw.weight_decay, self.weight_decay);
        set(&mut c.adamw.beta1, self.beta1);
        set(&mut c.adamw.beta2, self.beta2);
        set(&mut c.clip_grad_norm, self.clip);
        set(&mut c.max_len, self.max_len);
        set(
            &mut c.activation_checkpointing,
            self.activation_checkpointing,
        );
        set(&mut c.checkpoint_every, self.checkpoint_every);
        set(&mut c.keep_checkpoints, self.keep_checkpoints);
        set(&mut c.seed, self.seed);
        set(&mut c.log_every, self.log_every);
        if self.max_steps.is_some() {
            c.max_steps = self.max_steps;
        }
        c
    }
}

impl StageArgs {
    /// The run's directory in the workspace.
    pub fn run_dir(&self, run: Option<&Staged>) -> Result<rlt_api::layout::RunDir> {
        crate::stage::runconfig::run_dir(&self.workspace, self.run.as_deref(), run)
    }
}

#[derive(Args, Debug)]
pub struct WarmupArgs {
    /// Teacher checkpoint directory to fine-tune (HF layout; see `init-tiny`); default: the
    /// run's teacher.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub stage: StageArgs,
    #[command(flatten)]
    pub sft: SftArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub ranks: crate::train::ranks::RankArgs,
}

impl WarmupArgs {
    /// The run's warm-up (a hand run: the spec's default one) with the flags given over it.
    pub fn sft_config(&self, run: Option<&Staged>) -> crate::train::sft::SftConfig {
        let warmup = run.map_or_else(defaults::warmup, |s| s.spec().warmup.clone());
        crate::train::sft::SftConfig {
            keep_after_final: keep_after_final(run),
            ..self.sft.over(crate::train::sft::SftConfig::warmup(&warmup))
        }
    }
}

/// Checkpoints a stage keeps once its final output is complete: the run's
/// `spec.workspace.keepCheckpoints` (a hand run: the default).
pub fn keep_after_final(run: Option<&Staged>) -> usize {
    run.map_or_else(defaults::workspace, |s| s.spec().workspace.clone())
        .keep_checkpoints as usize
}

/// Starts the metrics server when the stage has a metrics port.
pub fn publish(stage: &StageArgs) -> Result<Option<crate::metrics::Published>> {
    let Some(port) = stage.metrics_port else {
        return Ok(None);
    };
    let p = crate::metrics::Published::default();
    let bound = crate::metrics::serve(&stage.bind, port, p.clone())?;
    tracing::info!(port = bound, "serving /metrics and /status");
    Ok(Some(p))
}

pub fn warmup(a: WarmupArgs) -> Result<()> {
    use std::io::IsTerminal;
    let run = Staged::from_env()?;
    let run = run.as_ref();
    let mut cfg = a.sft_config(run);
    let model = flag_or_run(
        a.model.clone(),
        run.map(|s| s.inputs.teacher.clone()),
        "--model",
    )?;
    let (device, kind) = a.device.resolve_for(run)?;
    let run_dir = a.stage.run_dir(run)?;
    if crate::train::ranks::prepare_stage(
        &a.ranks,
        &mut cfg,
        &model,
        ("warm-up".into(), "warmup"),
        run_dir.warmup().root(),
        (device, kind),
    )? {
        return Ok(());
    }
    let prompts = a.data.prompts.over(run);
    let examples = a.data.load(run)?;
    let mut pairs = Vec::with_capacity(examples.len());
    let mut no_trace = 0;
    for (i, e) in examples.iter().enumerate() {
        match crate::data::teacher_chat(&prompts, e) {
            Ok(p) => pairs.push(p),
            Err(err) if a.data.skip_malformed => {
                no_trace += 1;
                tracing::warn!(row = i, "skipped: {err}");
            }
            Err(err) => anyhow::bail!(
                "dataset row {i}: {err} (the warm-up teaches explanations from reasoning traces)"
            ),
        }
    }
    if no_trace > 0 {
        tracing::warn!(skipped = no_trace, "rows without a reasoning trace skipped");
    }
    let local = a.ranks.local_rank.unwrap_or(0);
    let job = crate::train::sft::SftJob {
        name: "warmup".into(),
        stage: run_dir.warmup(),
        attempt: a.stage.attempt,
        init_model: model,
        device: a.ranks.device(device),
        kind,
        pairs,
        // One metrics server per pod: its first local rank's.
        published: if local == 0 { publish(&a.stage)? } else { None },
        progress_bar: std::io::stderr().is_terminal(),
    };
    let mut group = a.ranks.join(&a.stage.bind, a.stage.attempt, job.device)?;
    let out = crate::train::sft::run_sft_ranks(job, &cfg, &mut group)?;
    if group.rank != 0 {
        return Ok(());
    }
    tracing::info!(
        final_dir = %out.final_dir.display(),
        steps = out.total_steps,
        steps_run = out.steps_run,
        first_loss = out.first_losses,
        last_loss = out.last_losses,
        tokens_per_s = out.tokens_per_second as u64,
        peak_rss_mib = crate::train::memory::peak_rss_mib().unwrap_or(f64::NAN) as u64,
        "warm-up complete"
    );
    println!("{}", out.final_dir.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output directory: train.jsonl and heldout.jsonl (custom format).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub count: usize,
    #[arg(long, default_value_t = 2)]
    pub min_steps: usize,
    #[arg(long, default_value_t = 3)]
    pub max_steps: usize,
    #[arg(long, default_value_t = 9)]
    pub max_operand: i64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = SYNTHETIC_HELD_OUT)]
    pub held_out: f64,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    use crate::data::synthetic;
    let spec = synthetic::SyntheticSpec {
        count: a.count,
        min_steps: a.min_steps,
        max_steps: a.max_steps,
        max_operand: a.max_operand,
        seed: a.seed,
    };
    let (train, held) = synthetic::split(synthetic::generate(&spec), a.held_out, a.seed);
    crate::data::write_jsonl(&a.out.join("train.jsonl"), &train)?;
    crate::data::write_jsonl(&a.out.join("heldout.jsonl"), &held)?;
    tracing::info!(train = train.len(), held_out = held.len(), out = %a.out.display(), "wrote synthetic task");
    Ok(())
}
