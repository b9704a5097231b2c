//! Who this process is among a data-parallel stage's ranks (warm-up, a student's
//! distillation), from the stage contract: `RLT_REPLICAS` pods, this one `RLT_REPLICA_INDEX`,
//! each running `RLT_RANKS_PER_POD` ranks (one per GPU), meeting as torchrun's ranks do
//! (`MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`).
//!
//! A pod with several ranks starts as one process, which runs one child process per local
//! rank (each on its own GPU, with its `RANK` and `LOCAL_RANK`, like `torchrun`) and ends as
//! they end: the first to fail stops the others, and its exit code and message become the
//! pod's.
use crate::exit;
use crate::train::c10d::{Backend, Rendezvous};
use crate::train::collective::Group;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rlt_api::contract::env;
use std::process::{Child, Command};
use std::time::Duration;
use tch::Device;

#[derive(Args, Debug, Clone, Default)]
pub struct RankArgs {
    /// This pod's index among the stage's pods.
    #[arg(long = "replica-index", env = env::REPLICA_INDEX, default_value_t = 0)]
    pub pod: usize,
    /// The stage's pods.
    #[arg(long = "replicas", env = env::REPLICAS, default_value_t = 1)]
    pub pods: usize,
    /// Ranks in this pod (one per GPU).
    #[arg(long, env = env::RANKS_PER_POD, default_value_t = 1)]
    pub ranks_per_pod: usize,
    /// This process's rank within its pod (set by the operator on a pod of one rank, and by a
    /// pod's first process on each local rank it starts).
    #[arg(long, env = env::LOCAL_RANK, hide = true)]
    pub local_rank: Option<usize>,
    /// How long a rank waits for the others to come up (pods are scheduled one by one).
    #[arg(long, default_value_t = 900)]
    pub rendezvous_timeout_s: u64,
}

impl RankArgs {
    pub fn world(&self) -> usize {
        self.pods.max(1) * self.ranks_per_pod.max(1)
    }

    /// Whether this process is a pod's first process that should start its local ranks.
    pub fn starts_local_ranks(&self) -> bool {
        self.ranks_per_pod > 1 && self.local_rank.is_none()
    }

    /// The device of this rank: a pod's local rank `l` uses `cuda:l` when the stage runs on
    /// CUDA.
    pub fn device(&self, device: Device) -> Device {
        match (device, self.local_rank) {
            (Device::Cuda(_), Some(l)) => Device::Cuda(l),
            (d, _) => d,
        }
    }

    /// Joins the stage's ranks (a group of one when there is a single rank) with c10d: NCCL
    /// where the model is on CUDA and this build has it, Gloo otherwise. `bind` is the address
    /// Gloo announces (`0.0.0.0`: this pod's hostname, as torchrun); `attempt` names the group,
    /// so ranks of different attempts never pair up.
    pub fn join(&self, bind: &str, attempt: u32, device: Device) -> Result<Group> {
        if self.world() == 1 {
            return Ok(Group::single());
        }
        let rdzv = Rendezvous::from_env()
            .map_err(exit::bad_config)?
            .ok_or_else(|| {
                exit::bad_config(anyhow!(
                    "{} ranks ({} pods x {} per pod) but no rendezvous: {}, {}, {} and {} are \
                     not set",
                    self.world(),
                    self.pods,
                    self.ranks_per_pod,
                    env::MASTER_ADDR,
                    env::MASTER_PORT,
                    env::WORLD_SIZE,
                    env::RANK
                ))
            })?;
        if rdzv.world != self.world() {
            return Err(exit::bad_config(anyhow!(
                "{}={} but the stage has {} ranks ({} pods x {} per pod)",
                env::WORLD_SIZE,
                rdzv.world,
                self.world(),
                self.pods,
                self.ranks_per_pod
            )));
        }
        let backend = match Backend::for_device(device) {
            Backend::Nccl if Backend::Nccl.available() => Backend::Nccl,
            _ => Backend::Gloo,
        };
        tracing::info!(
            rank = rdzv.rank,
            world = rdzv.world,
            master = format!("{}:{}", rdzv.master_addr, rdzv.master_port),
            ?backend,
            "joining the data-parallel ranks"
        );
        let bind = (!matches!(bind, "0.0.0.0" | "::")).then_some(bind);
        let group = Group::join(
            &rdzv,
            backend,
            &format!("attempt-{attempt}"),
            bind,
            Duration::from_secs(self.rendezvous_timeout_s),
        )?;
        tracing::info!(rank = group.rank, world = group.world, "ranks connected");
        Ok(group)
    }
}

/// What an SFT stage does before loading anything, in every process of the pod: refuses a
/// batch too small for the ranks, runs the memory preflight (which may raise
/// `cfg.grad_accum`: every local rank decides the same), then, in a pod's first process with
/// several ranks, runs them. `true`: this process ran its pod's local ranks and is done.
pub fn prepare_stage(
    ranks: &RankArgs,
    cfg: &mut crate::train::sft::SftConfig,
    model: &std::path::Path,
    (what, section): (String, &'static str),
    stage_dir: &std::path::Path,
    (device, kind): (Device, tch::Kind),
) -> Result<bool> {
    let world = ranks.world();
    check_batch(world, cfg.batch_size, &format!("{section}.batchSize"))
        .map_err(exit::bad_config)?;
    let stage =
        crate::train::memory::Stage::sft(what, section, cfg, kind, world, ranks.ranks_per_pod);
    let fit = crate::train::memory::check_stage(model, &stage, cfg.grad_accum, device)
        .map_err(exit::bad_config)?;
    (cfg.grad_accum, cfg.local_sums) = (fit.grad_accum, fit.local_sums);
    let disk = crate::train::memory::sft_disk_bytes(
        &crate::train::memory::shape_of(model)?,
        kind.elt_size_in_bytes() as u32,
        cfg.keep_checkpoints as u32,
    );
    crate::train::memory::check_disk(stage_dir, disk, &stage.what).map_err(exit::bad_config)?;
    if ranks.starts_local_ranks() {
        run_local_ranks(ranks.ranks_per_pod, ranks.pod)?;
        return Ok(true);
    }
    Ok(false)
}

/// Runs this very command once per local rank (`LOCAL_RANK` = 0..n, `RANK` = this pod's
/// first rank + that) and waits for all of them. The first failure stops the rest and is returned with its exit code kept (a bad
/// configuration stays one) and its message (the child's termination message).
pub fn run_local_ranks(n: usize, pod: usize) -> Result<()> {
    let exe = std::env::current_exe().context("locating the rlt-trainer binary")?;
    let scratch = std::env::temp_dir().join(format!("rlt-ranks-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let log = |l: usize| scratch.join(format!("rank-{l}.termination"));
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for l in 0..n {
        let child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(env::LOCAL_RANK, l.to_string())
            .env(env::RANK, (pod * n + l).to_string())
            .env(env::TERMINATION_LOG, log(l))
            .spawn()
            .with_context(|| format!("starting local rank {l}"));
        match child {
            Ok(c) => children.push((l, c)),
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        }
    }
    tracing::info!(ranks = n, "local ranks started");
    let outcome = loop {
        let mut running = false;
        let mut failed = None;
        for (l, c) in &mut children {
            match c.try_wait() {
                Ok(Some(status)) if !status.success() => {
                    failed = Some((*l, status.code().unwrap_or(exit::CRASH)));
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) => running = true,
                Err(e) => {
                    failed = Some((*l, exit::CRASH));
                    tracing::error!(rank = l, "waiting for local rank: {e}");
                    break;
                }
            }
        }
        if let Some(f) = failed {
            break Some(f);
        }
        if !running {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop(&mut children);
    let result = match outcome {
        None => Ok(()),
        Some((l, code)) => {
            let message = std::fs::read_to_string(log(l))
                .unwrap_or_else(|_| format!("exited with code {code}"));
            let e = anyhow!("local rank {l}: {}", message.trim());
            if code == exit::BAD_CONFIG {
                Err(exit::bad_config(e))
            } else {
                Err(e)
            }
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// Refuses a rank layout the stage cannot use.
pub fn check_batch(world: usize, batch_size: usize, field: &str) -> Result<()> {
    if world > batch_size {
        bail!(
            "{world} data-parallel ranks but {field} is {batch_size}: every rank needs at least \
             one example per step; raise {field} or use fewer ranks"
        );
    }
    Ok(())
}
