//! `rlt-trainer rl-bench`: time per RL step split into generation, reward scoring, backward
//! and communication, for 1 vs 2 learners (same total groups per step) against parameter
//! servers on loopback, on a tiny and a ~24M-parameter model, with bytes moved per step.
//!
//! Everything runs in this process: servers as tokio tasks on 127.0.0.1, each learner on its
//! own thread with its own models (as separate pods would), over real gRPC.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use rlt_api::layout::RunDir;
use tch::{Device, Kind};

use super::grpo::GrpoConfig;
use super::learner::{run_learner, LearnerConfig, Models, StepReport};
use super::param_server::{read_checkpoint_tensors, ParamServer, ServeUntil, ServerConfig};
use super::reward::RewardConfig;
use super::rollout::RolloutConfig;
use super::shard::RlOptimizer;
use crate::data::synthetic::{generate, SyntheticSpec};
use crate::data::Prompts;
use crate::device::{parse_device, parse_kind};
use crate::model::checkpoint::{save_checkpoint, CausalLm};
use crate::model::config::TinySpec;
use crate::model::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct RlBenchArgs {
    /// Model sizes to run: `tiny`, `medium` (~24M parameters), `0.5b` (Qwen2.5-0.5B's decoder
    /// over the tiny tokenizer's vocabulary: ~0.36B parameters); see [`TinySpec::bench_shape`].
    #[arg(long, value_delimiter = ',', default_value = "tiny,medium")]
    pub sizes: Vec<String>,
    /// Learner counts to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub learners: Vec<usize>,
    #[arg(long, default_value_t = 2)]
    pub servers: usize,
    /// Timed steps (one more is run first as warm-up and not counted).
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    #[arg(long, default_value_t = 4)]
    pub groups_per_step: usize,
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Rows per forward/backward pass over a group (0: the whole group).
    #[arg(long, default_value_t = 0)]
    pub micro_batch: usize,
    /// Recompute decoder layers in the policy's backward pass.
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Scratch directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Averages of the timed steps over learners (phases: the slowest learner's; communication:
/// the least of the learners', i.e. without waiting for a slower peer).
#[derive(Debug, Default)]
struct Row {
    params: i64,
    step: f64,
    generation: f64,
    scoring: f64,
    backward: f64,
    communication: f64,
    bytes: f64,
}

pub fn rl_bench(a: RlBenchArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let kind = parse_kind(&a.dtype)?;
    let root = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("rlt-rl-bench-{}", std::process::id()))
    });
    println!(
        "RL step time on {device:?} ({} parameter servers on loopback gRPC; {} groups x {} samples per step, \
         up to {} new tokens; {} rows per pass{}; mean of {} steps after 1 warm-up)",
        a.servers,
        a.groups_per_step,
        a.group_size,
        a.max_new_tokens,
        if a.micro_batch == 0 { a.group_size } else { a.micro_batch },
        if a.activation_checkpointing { ", activation checkpointing" } else { "" },
        a.steps
    );
    println!(
        "{:<7} {:>7} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>6} {:>10}",
        "model",
        "params",
        "learners",
        "step s",
        "gen s",
        "score s",
        "bwd s",
        "comm s",
        "comm%",
        "MB/step"
    );
    for size in &a.sizes {
        let dir = root.join(size);
        let tok = Tokenizer::tiny();
        let teacher = dir.join("teacher");
        let student = dir.join("student");
        // Over the tiny tokenizer's vocabulary: rewards decode what the teacher samples.
        let (s, _) = TinySpec::bench_shape(size)?;
        save_checkpoint(
            &teacher,
            &CausalLm::tiny(&s, &tok, Device::Cpu, Kind::Float)?,
            &tok,
        )?;
        save_checkpoint(
            &student,
            &CausalLm::tiny(&TinySpec { seed: 2, ..s }, &tok, Device::Cpu, Kind::Float)?,
            &tok,
        )?;
        let (f32_rate, bf16_rate, mb) = transport(&teacher)?;
        println!(
            "{:<7} transport: one stream pulls {mb:.0} MB of weights at {:.2} GB/s as f32, {:.2} GB/s as bf16 (half the bytes)",
            size,
            f32_rate / 1e9,
            bf16_rate / 1e9
        );
        for &m in &a.learners {
            let r = run_one(
                &a,
                &dir.join(format!("run-{m}")),
                &teacher,
                &student,
                m,
                device,
                kind,
            )?;
            println!(
                "{:<7} {:>6.1}M {:>8} | {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} | {:>5.1}% {:>10.2}",
                size,
                r.params as f64 / 1e6,
                m,
                r.step,
                r.generation,
                r.scoring,
                r.backward,
                r.communication,
                100.0 * r.communication / r.step,
                r.bytes / 1e6
            );
        }
    }
    if let Some(mib) = crate::train::memory::peak_rss_mib() {
        println!("peak resident memory of this process (servers and learners): {mib:.0} MiB");
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// Bytes per second of one learner pulling every weight from one parameter server over
/// loopback gRPC (best of 3), in f32 and in bf16, and the f32 megabytes of one pull.
fn transport(teacher: &Path) -> Result<(f64, f64, f64)> {
    use super::client::ShardClients;
    let rt = tokio::runtime::Runtime::new()?;
    let initial = read_checkpoint_tensors(teacher)?;
    let ws = teacher.with_file_name("transport");
    let cfg = ServerConfig {
        shard: 0,
        num_shards: 1,
        num_learners: 1,
        total_steps: 1,
        optimizer: RlOptimizer::default(),
        grpo: GrpoConfig::default(),
        checkpoint_every: 1000,
        stage_dir: RunDir::new(&ws, "bench").rl(),
        attempt: 0,
        reference_kind: Kind::Float,
    };
    let server = ParamServer::new(cfg, &initial)?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let handle = rt.spawn(server.serve(listener, None, ServeUntil::AllLearnersDone));
    // The client's channel is created lazily on this runtime.
    let _runtime = rt.enter();
    let mut clients = ShardClients::new(&[addr], 0, 1, Duration::from_secs(30))?;
    rt.block_on(clients.hello())?;
    let mut rate = |kind: Kind| -> Result<(f64, f64)> {
        clients.weights_kind = kind;
        let mut best: f64 = 0.0;
        let mut bytes = 0.0;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let pulled = rt.block_on(clients.pull(0, false))?;
            bytes = pulled.bytes as f64;
            best = best.max(bytes / t.elapsed().as_secs_f64());
        }
        Ok((best, bytes))
    };
    let (f32_rate, f32_bytes) = rate(Kind::Float)?;
    let (bf16_rate, _) = rate(Kind::BFloat16)?;
    handle.abort();
    let _ = std::fs::remove_dir_all(&ws);
    Ok((f32_rate, bf16_rate, f32_bytes / 1e6))
}

fn run_one(
    a: &RlBenchArgs,
    ws: &Path,
    teacher: &Path,
    student: &Path,
    learners: usize,
    device: Device,
    kind: Kind,
) -> Result<Row> {
    let _ = std::fs::remove_dir_all(ws);
    let total = a.steps + 1;
    let grpo = GrpoConfig::default();
    let optimizer = RlOptimizer {
        lr: 1e-5,
        ..RlOptimizer::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    let initial = read_checkpoint_tensors(teacher)?;
    let params: i64 = initial.values().map(|t| t.numel() as i64).sum();
    let mut addrs = Vec::new();
    let mut handles = Vec::new();
    for shard in 0..a.servers {
        let cfg = ServerConfig {
            shard,
            num_shards: a.servers,
            num_learners: learners,
            total_steps: total,
            optimizer,
            grpo: grpo.clone(),
            checkpoint_every: 1000,
            stage_dir: RunDir::new(ws, "bench").rl(),
            attempt: 0,
            reference_kind: kind,
        };
        let server = ParamServer::new(cfg, &initial)?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        addrs.push(listener.local_addr()?.to_string());
        handles.push(rt.spawn(server.serve(listener, None, ServeUntil::AllLearnersDone)));
    }
    // The servers hold their copies; at the 0.5B shape this one is 1.4 GB.
    drop(initial);
    let reports: Arc<Mutex<Vec<Vec<StepReport>>>> =
        Arc::new(Mutex::new(vec![Vec::new(); learners]));
    let examples = generate(&SyntheticSpec {
        count: 64,
        seed: 0,
        ..Default::default()
    });
    let threads: Vec<_> = (0..learners)
        .map(|rank| {
            let (teacher, student, addrs, reports, examples) = (
                teacher.to_path_buf(),
                student.to_path_buf(),
                addrs.clone(),
                reports.clone(),
                examples.clone(),
            );
            let rollout = RolloutConfig {
                group_size: a.group_size,
                max_new_tokens: a.max_new_tokens,
                temperature: 0.7,
                top_p: 1.0,
                reward: RewardConfig::default(),
                grpo: grpo.clone(),
                seed: 0,
                micro_batch: a.micro_batch,
                generation_batch: a.micro_batch,
                activation_checkpointing: a.activation_checkpointing,
            };
            let cfg = LearnerConfig {
                param_servers: addrs,
                learner: rank,
                learners,
                groups_per_step: a.groups_per_step,
                rollout,
                retry_for: Duration::from_secs(30),
                final_dir: None,
                prune_after_final: None,
            };
            std::thread::spawn(move || -> Result<()> {
                let models = Models::load(&teacher, &student, device, kind)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(run_learner(
                    &models,
                    &examples,
                    &Prompts::short(),
                    &cfg,
                    |r| {
                        reports.lock().unwrap()[rank].push(r.clone());
                    },
                ))
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a learner thread panicked"))??;
    }
    for h in handles {
        rt.block_on(h).context("server task")??;
    }
    let reports = reports.lock().unwrap();
    let mut row = Row {
        params,
        ..Row::default()
    };
    let n = a.steps as f64;
    for step in 1..total as usize {
        let at: Vec<&StepReport> = reports.iter().map(|r| &r[step]).collect();
        let max = |f: &dyn Fn(&StepReport) -> f64| at.iter().map(|r| f(r)).fold(0.0, f64::max);
        row.step += max(&|r| r.total) / n;
        row.generation += max(&|r| r.times.generation) / n;
        row.scoring += max(&|r| r.times.scoring) / n;
        row.backward += max(&|r| r.times.backward) / n;
        row.communication += at
            .iter()
            .map(|r| r.communication)
            .fold(f64::INFINITY, f64::min)
            / n;
        row.bytes += at
            .iter()
            .map(|r| (r.bytes_pushed + r.bytes_pulled) as f64)
            .sum::<f64>()
            / n;
    }
    Ok(row)
}
