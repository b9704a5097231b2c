//! `rlt-trainer param-server` and `rlt-trainer learner`: the run's RL settings (`spec.rl` of
//! `RLT_CONFIG`, or its defaults in a hand run) with the flags given over them; the per-pod
//! facts come from the stage contract's environment (`rlt_api::contract::env`).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::stage::runconfig::{flag_or_run, Staged};
use anyhow::{Context, Result};
use clap::Args;
use rlt_api::contract::{self, env};
use rlt_api::layout::RunDir;
use rlt_api::spec::{defaults, RlStage};

use super::grpo::GrpoConfig;
use super::learner::{run_learner, LearnerConfig, Models, Placement};
use super::param_server::{self, ServerConfig};
use super::reward::{RewardConfig, WeightedReductions};
use super::rollout::RolloutConfig;
use super::shard::RlOptimizer;
use crate::stage::cli::{DataArgs, DeviceArgs};
use crate::train::memory;
use crate::train::optim::AdamWConfig;

/// Where the run lives in the shared workspace.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[arg(long, env = env::WORKSPACE)]
    pub workspace: PathBuf,
    /// The run's directory under the workspace; default: the run configuration's
    /// (`spec.workspace.directory`, else its name).
    #[arg(long = "run")]
    pub run_name: Option<String>,
    /// Stage attempt; fences checkpoint writes.
    #[arg(long, env = env::ATTEMPT, default_value_t = 0)]
    pub attempt: u32,
}

impl RunArgs {
    pub fn run_dir(&self, run: Option<&Staged>) -> Result<RunDir> {
        crate::stage::runconfig::run_dir(&self.workspace, self.run_name.as_deref(), run)
    }
}

/// The run's RL stage, or the spec's default one in a hand run.
fn rl_of(run: Option<&Staged>) -> RlStage {
    run.map_or_else(defaults::rl, |s| s.spec().rl.clone())
}

/// Optimisation settings both roles must agree on (servers apply them; learners use the GRPO
/// ones in the loss): overrides of `spec.rl`.
#[derive(Args, Debug, Clone, Default)]
pub struct OptimArgs {
    /// Number of RL steps (optimizer updates).
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Largest norm of the whole step's gradient, over every shard (0 = no clipping).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// KL penalty to the reference model.
    #[arg(long)]
    pub beta: Option<f64>,
    /// GRPO's ratio clipping (not a spec field: the paper's 0.2).
    #[arg(long)]
    pub clip_eps: Option<f64>,
    /// Reference re-sync: ref <- alpha * policy + (1 - alpha) * ref ...
    #[arg(long)]
    pub ref_mix_alpha: Option<f64>,
    /// ... every this many steps (0 = never).
    #[arg(long)]
    pub ref_sync_every: Option<u64>,
}

impl OptimArgs {
    pub fn steps(&self, rl: &RlStage) -> u64 {
        self.steps.unwrap_or(rl.steps.into())
    }

    pub fn optimizer(&self, rl: &RlStage) -> RlOptimizer {
        let base = RlOptimizer::of_rl(rl);
        RlOptimizer {
            adamw: AdamWConfig {
                beta1: self.adam_beta1.unwrap_or(base.adamw.beta1),
                beta2: self.adam_beta2.unwrap_or(base.adamw.beta2),
                weight_decay: self.weight_decay.unwrap_or(base.adamw.weight_decay),
                ..base.adamw
            },
            lr: self.lr.unwrap_or(base.lr),
            max_grad_norm: self.max_grad_norm.unwrap_or(base.max_grad_norm),
        }
    }

    pub fn grpo(&self, rl: &RlStage) -> GrpoConfig {
        let base = GrpoConfig::default();
        GrpoConfig {
            clip_eps: self.clip_eps.unwrap_or(base.clip_eps),
            beta: self.beta.unwrap_or(rl.beta),
            ref_mix_alpha: self.ref_mix_alpha.unwrap_or(rl.reference_sync.mix),
            ref_sync_every: self
                .ref_sync_every
                .unwrap_or(rl.reference_sync.interval.into()),
        }
    }
}

#[derive(Args, Debug)]
pub struct ParamServerArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// This server's shard index.
    #[arg(long = "replica-index", env = env::REPLICA_INDEX)]
    pub shard: usize,
    /// Number of parameter servers.
    #[arg(long = "replicas", env = env::REPLICAS)]
    pub num_shards: usize,
    /// Number of learners that push each step (`rl.learners`).
    #[arg(long)]
    pub learners: Option<usize>,
    /// Initial teacher checkpoint (default: the run's RL starting point, else the warm-up
    /// stage's output).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Address the gRPC and metrics listeners bind (the e2e node agent gives each pod its own
    /// loopback IP, as its pods share the host network).
    #[arg(long, env = env::BIND_ADDRESS, default_value = "0.0.0.0")]
    pub bind: String,
    #[arg(long, env = env::RPC_PORT, default_value_t = contract::DEFAULT_RPC_PORT)]
    pub rpc_port: u16,
    /// Metrics/status port (served by server 0 only).
    #[arg(long, env = env::METRICS_PORT, default_value_t = contract::DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
    /// Checkpoint the shard every this many steps (`rl.checkpointInterval`).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// libtorch intra-op CPU threads for the optimizer (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    #[command(flatten)]
    pub optim: OptimArgs,
}

pub fn param_server(a: ParamServerArgs) -> Result<()> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t.max(1));
    }
    let run = Staged::from_env()?;
    let (run, rl) = (run.as_ref(), rl_of(run.as_ref()));
    let run_dir = a.run.run_dir(run)?;
    let init = a
        .init
        .clone()
        .or_else(|| run.map(|s| s.inputs.rl_init.clone()))
        .unwrap_or_else(|| run_dir.warmup().final_dir());
    let num_learners = flag_or_run(
        a.learners,
        run.map(|s| s.spec().rl.learners as usize),
        "--learners",
    )?;
    let cfg = ServerConfig {
        shard: a.shard,
        num_shards: a.num_shards,
        num_learners,
        total_steps: a.optim.steps(&rl),
        optimizer: a.optim.optimizer(&rl),
        grpo: a.optim.grpo(&rl),
        checkpoint_every: a.checkpoint_every.unwrap_or(rl.checkpoint_interval.into()),
        stage_dir: run_dir.rl(),
        attempt: a.run.attempt,
        reference_kind: match run {
            Some(s)
                if contract::computes_in_bf16(s.spec(), s.spec().rl.learner_resources.as_ref()) =>
            {
                tch::Kind::BFloat16
            }
            _ => tch::Kind::Float,
        },
    };
    let rpc: SocketAddr = format!("{}:{}", a.bind, a.rpc_port)
        .parse()
        .with_context(|| format!("--bind {:?}", a.bind))
        .map_err(crate::exit::bad_config)?;
    let metrics: SocketAddr = format!("{}:{}", a.bind, a.metrics_port)
        .parse()
        .with_context(|| format!("--bind {:?}", a.bind))
        .map_err(crate::exit::bad_config)?;
    let learner_bytes = cfg.reference_kind.elt_size_in_bytes() as u32;
    let disk = memory::rl_disk_bytes(&memory::shape_of(&init)?, learner_bytes);
    memory::check_disk(cfg.stage_dir.root(), disk, "the RL stage")
        .map_err(crate::exit::bad_config)?;
    memory::check_server(
        &init,
        a.num_shards as u32,
        num_learners as u32,
        learner_bytes,
    )
    .map_err(crate::exit::bad_config)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(param_server::run(
        cfg,
        &init,
        rpc,
        (a.shard == 0).then_some(metrics),
    ))
}

/// Sampling and reward settings of the learners: overrides of `spec.rl`.
#[derive(Args, Debug, Clone, Default)]
pub struct RolloutArgs {
    /// Groups, i.e. (question, solution) pairs, per step over all learners (`rl.batchSize`).
    #[arg(long)]
    pub groups_per_step: Option<usize>,
    /// G: explanations per group.
    #[arg(long)]
    pub group_size: Option<usize>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long)]
    pub student_temperature: Option<f64>,
    /// Solution-term reductions and weights, e.g. `mean:1,min:0.01`.
    #[arg(long)]
    pub solution_reductions: Option<WeightedReductions>,
    /// KL-term reductions and weights, e.g. `mean:3,max:0.03`.
    #[arg(long)]
    pub kl_reductions: Option<WeightedReductions>,
    #[arg(long, allow_hyphen_values = true)]
    pub format_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Rows of a group per forward/backward pass (default: the most the memory preflight
    /// finds room for).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Rows of a group per sampling pass (default: as `--micro-batch`).
    #[arg(long)]
    pub generation_batch: Option<usize>,
    /// Recompute decoder layers in the backward pass (`rl.activationCheckpointing`).
    #[arg(long)]
    pub activation_checkpointing: Option<bool>,
}

impl RolloutArgs {
    pub fn groups_per_step(&self, rl: &RlStage) -> usize {
        self.groups_per_step.unwrap_or(rl.batch_size as usize)
    }

    pub fn config(&self, rl: &RlStage, grpo: GrpoConfig) -> RolloutConfig {
        let base = RewardConfig::of_rl(rl);
        let temperature = self.temperature.unwrap_or(rl.temperature);
        let max_new_tokens = self.max_new_tokens.unwrap_or(rl.max_new_tokens as usize);
        RolloutConfig {
            group_size: self.group_size.unwrap_or(rl.group_size as usize),
            max_new_tokens,
            temperature,
            top_p: self.top_p,
            reward: RewardConfig {
                student_temperature: self.student_temperature.unwrap_or(base.student_temperature),
                teacher_temperature: temperature,
                solution: self.solution_reductions.clone().unwrap_or(base.solution),
                kl: self.kl_reductions.clone().unwrap_or(base.kl),
                format_penalty: self.format_penalty.unwrap_or(base.format_penalty),
            },
            grpo,
            seed: self.seed,
            micro_batch: self.micro_batch.unwrap_or(0),
            generation_batch: self.generation_batch.or(self.micro_batch).unwrap_or(0),
            activation_checkpointing: self.activation_checkpointing.unwrap_or_else(|| {
                rlt_api::spec::activation_checkpointing(
                    rl.activation_checkpointing,
                    max_new_tokens as u32,
                )
            }),
        }
    }
}

#[derive(Args, Debug)]
pub struct LearnerArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Comma-separated host:port of every parameter server, in shard order.
    #[arg(long, env = env::PARAM_SERVERS, value_delimiter = ',')]
    pub param_servers: Vec<String>,
    /// This learner's rank.
    #[arg(long = "replica-index", env = env::REPLICA_INDEX)]
    pub learner: usize,
    /// Number of learners.
    #[arg(long = "replicas", env = env::REPLICAS)]
    pub learners: usize,
    /// Initial teacher checkpoint, for the architecture and tokenizer (default: the run's RL
    /// starting point, else the warm-up output).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// The frozen student checkpoint that scores explanations (default: `rl.student`).
    #[arg(long)]
    pub student: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Keep reconnecting to a parameter server that is down for this long.
    #[arg(long, default_value_t = 300)]
    pub retry_secs: u64,
}

pub fn learner(a: LearnerArgs) -> Result<()> {
    let run = Staged::from_env()?;
    let (run, rl) = (run.as_ref(), rl_of(run.as_ref()));
    let run_dir = a.run.run_dir(run)?;
    let teacher = a
        .teacher
        .clone()
        .or_else(|| run.map(|s| s.inputs.rl_init.clone()))
        .unwrap_or_else(|| run_dir.warmup().final_dir());
    let student = flag_or_run(
        a.student.clone(),
        run.map(|s| s.inputs.rl_student.clone()),
        "--student",
    )?;
    let (device, kind) = a.device.resolve_for(run)?;
    let placement = Placement::of(device);
    let examples = a.data.load(run)?;
    let prompts = a.data.prompts.over(run);
    let mut rollout = a.rollout.config(&rl, a.optim.grpo(&rl));
    // Before loading the models: the passes a group is split into, or a refusal.
    let plan = memory::LearnerPlan {
        dtype_bytes: kind.elt_size_in_bytes() as u32,
        group_size: rollout.group_size as u32,
        prompt: longest_prompt(&teacher, &prompts, &examples)?,
        max_new_tokens: rollout.max_new_tokens as u32,
        // Rows given by flags are kept; 0: the preflight picks.
        micro_batch: rollout.micro_batch as u32,
        generation_batch: rollout.generation_batch as u32,
        checkpointing: rollout.activation_checkpointing,
        devices: placement.devices(),
    };
    (rollout.micro_batch, rollout.generation_batch) =
        memory::check_learner(&teacher, &student, &plan, rl.checkpoint_interval, device)
            .map_err(crate::exit::bad_config)?;
    let models = Models::load(&teacher, &student, placement, kind)?;
    let cfg = LearnerConfig {
        param_servers: a.param_servers.clone(),
        learner: a.learner,
        learners: a.learners,
        groups_per_step: a.rollout.groups_per_step(&rl),
        rollout,
        retry_for: Duration::from_secs(a.retry_secs),
        final_dir: Some(run_dir.rl().final_dir()),
        prune_after_final: Some((run_dir.rl(), crate::stage::cli::keep_after_final(run))),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_learner(&models, &examples, &prompts, &cfg, |_| {}))?;
    report_final_figures(&run_dir.rl().metrics());
    Ok(())
}

/// Hands the stage's last figures (parameter server 0 wrote them before the last step was
/// acknowledged) to the operator in the termination message.
fn report_final_figures(path: &std::path::Path) {
    let figures = std::fs::read(path)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice::<contract::TrainingFigures>(&b)?));
    match figures {
        Ok(f) => crate::exit::write_termination_log(&contract::final_figures_message(&f)),
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "no final figures to report"),
    }
}

/// The longest teacher prompt or student chat (without the explanation) of the dataset, in
/// tokens of the teacher's tokenizer.
fn longest_prompt(
    teacher: &std::path::Path,
    prompts: &crate::data::Prompts,
    examples: &[crate::data::Example],
) -> Result<u32> {
    let tok = crate::model::tokenizer::Tokenizer::from_dir(teacher)
        .with_context(|| format!("teacher tokenizer in {}", teacher.display()))?;
    let mut longest = 0;
    for e in examples {
        let p = super::rollout::GroupPrompt::new(&tok, prompts, e)?;
        let student = p.student_row(&tok, "")?.ids.len();
        longest = longest.max(p.teacher_prompt.len()).max(student);
    }
    Ok(longest as u32)
}
