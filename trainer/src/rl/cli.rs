//! `rlt-trainer param-server` and `rlt-trainer learner`: flags, with the stage contract's
//! environment variables (`rlt_api::contract::env`) as fallbacks.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use rlt_api::contract::{self, env};
use rlt_api::layout::RunDir;
use rlt_api::spec::defaults;

use super::grpo::GrpoConfig;
use super::learner::{run_learner, LearnerConfig, Models};
use super::param_server::{self, ServerConfig};
use super::reward::{RewardConfig, WeightedReductions};
use super::rollout::RolloutConfig;
use super::shard::RlOptimizer;
use crate::cli::{DataArgs, DeviceArgs};
use crate::optim::AdamWConfig;

/// Where the run lives in the shared workspace.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[arg(long, env = env::WORKSPACE)]
    pub workspace: PathBuf,
    #[arg(long = "run", env = env::RUN_NAME)]
    pub run_name: String,
    /// Stage attempt; fences checkpoint writes.
    #[arg(long, env = env::ATTEMPT, default_value_t = 0)]
    pub attempt: u32,
}

impl RunArgs {
    pub fn run_dir(&self) -> RunDir {
        RunDir::new(&self.workspace, &self.run_name)
    }
}

/// Optimisation settings both roles must agree on (servers apply them; learners use the GRPO
/// ones in the loss). Defaults: `spec.rl`'s.
#[derive(Args, Debug, Clone)]
pub struct OptimArgs {
    /// Number of RL steps (optimizer updates).
    #[arg(long, default_value_t = defaults::rl_steps().into())]
    pub steps: u64,
    #[arg(long, default_value_t = defaults::rl_lr())]
    pub lr: f64,
    #[arg(long, default_value_t = defaults::rl_optimizer().beta1)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = defaults::rl_optimizer().beta2)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = defaults::rl_optimizer().weight_decay)]
    pub weight_decay: f64,
    /// Largest norm of the whole step's gradient, over every shard (0 = no clipping).
    #[arg(long, default_value_t = defaults::rl_optimizer().max_grad_norm)]
    pub max_grad_norm: f64,
    /// KL penalty to the reference model.
    #[arg(long, default_value_t = defaults::beta())]
    pub beta: f64,
    #[arg(long, default_value_t = GrpoConfig::default().clip_eps)]
    pub clip_eps: f64,
    /// Reference re-sync: ref <- alpha * policy + (1 - alpha) * ref ...
    #[arg(long, default_value_t = defaults::sync_mix())]
    pub ref_mix_alpha: f64,
    /// ... every this many steps (0 = never).
    #[arg(long, default_value_t = defaults::sync_interval().into())]
    pub ref_sync_every: u64,
}

impl OptimArgs {
    pub fn optimizer(&self) -> RlOptimizer {
        RlOptimizer {
            adamw: AdamWConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                weight_decay: self.weight_decay,
                ..AdamWConfig::rl()
            },
            lr: self.lr,
            max_grad_norm: self.max_grad_norm,
        }
    }
    pub fn grpo(&self) -> GrpoConfig {
        GrpoConfig {
            clip_eps: self.clip_eps,
            beta: self.beta,
            ref_mix_alpha: self.ref_mix_alpha,
            ref_sync_every: self.ref_sync_every,
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
    /// Number of learners that push each step.
    #[arg(long)]
    pub learners: usize,
    /// Initial teacher checkpoint (default: the warm-up stage's output).
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
    /// Checkpoint the shard every this many steps.
    #[arg(long, default_value_t = defaults::checkpoint_interval().into())]
    pub checkpoint_every: u64,
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
    let run_dir = a.run.run_dir();
    let init = a
        .init
        .clone()
        .unwrap_or_else(|| run_dir.warmup().final_dir());
    let cfg = ServerConfig {
        shard: a.shard,
        num_shards: a.num_shards,
        num_learners: a.learners,
        total_steps: a.optim.steps,
        optimizer: a.optim.optimizer(),
        grpo: a.optim.grpo(),
        checkpoint_every: a.checkpoint_every,
        stage_dir: run_dir.rl(),
        attempt: a.run.attempt,
    };
    let rpc: SocketAddr = format!("{}:{}", a.bind, a.rpc_port)
        .parse()
        .with_context(|| format!("--bind {:?}", a.bind))
        .map_err(crate::exit::bad_config)?;
    let metrics: SocketAddr = format!("{}:{}", a.bind, a.metrics_port)
        .parse()
        .with_context(|| format!("--bind {:?}", a.bind))
        .map_err(crate::exit::bad_config)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(param_server::run(
        cfg,
        &init,
        rpc,
        (a.shard == 0).then_some(metrics),
    ))
}

/// Sampling and reward settings of the learners. Defaults: `spec.rl`'s.
#[derive(Args, Debug, Clone)]
pub struct RolloutArgs {
    /// Groups, i.e. (question, solution) pairs, per step over all learners (`rl.batchSize`).
    #[arg(long, default_value_t = defaults::batch16() as usize)]
    pub groups_per_step: usize,
    /// G: explanations per group.
    #[arg(long, default_value_t = defaults::group_size() as usize)]
    pub group_size: usize,
    #[arg(long, default_value_t = defaults::max_new_tokens() as usize)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = defaults::temperature())]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = defaults::reward().student_temperature)]
    pub student_temperature: f64,
    /// Solution-term reductions and weights.
    #[arg(long, default_value_t = RewardConfig::default().solution)]
    pub solution_reductions: WeightedReductions,
    /// KL-term reductions and weights.
    #[arg(long, default_value_t = RewardConfig::default().kl)]
    pub kl_reductions: WeightedReductions,
    #[arg(long, default_value_t = defaults::format_penalty(), allow_hyphen_values = true)]
    pub format_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl RolloutArgs {
    pub fn config(&self, grpo: GrpoConfig) -> RolloutConfig {
        RolloutConfig {
            group_size: self.group_size,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            reward: RewardConfig {
                student_temperature: self.student_temperature,
                teacher_temperature: self.temperature,
                solution: self.solution_reductions.clone(),
                kl: self.kl_reductions.clone(),
                format_penalty: self.format_penalty,
            },
            grpo,
            seed: self.seed,
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
    /// Initial teacher checkpoint, for the architecture and tokenizer (default: warm-up output).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// The frozen student checkpoint that scores explanations.
    #[arg(long)]
    pub student: PathBuf,
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
    let run_dir = a.run.run_dir();
    let teacher = a
        .teacher
        .clone()
        .unwrap_or_else(|| run_dir.warmup().final_dir());
    let (device, kind) = a.device.resolve()?;
    let models = Models::load(&teacher, &a.student, device, kind)?;
    let examples = a.data.load()?;
    let prompts = a.data.system_prompts();
    let cfg = LearnerConfig {
        param_servers: a.param_servers.clone(),
        learner: a.learner,
        learners: a.learners,
        groups_per_step: a.rollout.groups_per_step,
        rollout: a.rollout.config(a.optim.grpo()),
        retry_for: Duration::from_secs(a.retry_secs),
        final_dir: Some(run_dir.rl().final_dir()),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_learner(&models, &examples, &prompts, &cfg, |_| {}))
}
