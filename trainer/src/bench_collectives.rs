//! `rlt-trainer bench-collectives`: the all-reduce of a model's f32 gradients across rank
//! processes on this machine, by libtorch's c10d (Gloo over loopback TCP) beside the trainer's
//! own TCP ring ([`crate::collective`]: a reduce-scatter then an all-gather, what its
//! data-parallel step does), in one run. Prints each one's time and bus bandwidth (as
//! nccl-tests counts it: 2(W-1)/W of the buffer crosses each rank's link) and their ratio.
use crate::c10d::{Backend, ProcessGroup, Rendezvous};
use crate::collective::{even_bounds, Group, Topology};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Args, Debug, Clone)]
pub struct BenchCollectivesArgs {
    /// Rank processes.
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Buffer sizes in f32 elements (parameters): 24M is the "medium" bench model, 494M
    /// Qwen2.5-0.5B.
    #[arg(long, value_delimiter = ',', default_value = "24000000")]
    pub params: Vec<i64>,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// First port; the ring takes `world` ports from it, c10d's store the next one.
    #[arg(long, default_value_t = 29600)]
    pub port: u16,
    /// Set on the rank processes this command starts.
    #[arg(long, hide = true)]
    pub rank: Option<usize>,
}

pub fn bench_collectives(a: BenchCollectivesArgs) -> Result<()> {
    match a.rank {
        Some(rank) => run_rank(&a, rank),
        None => run_all(&a),
    }
}

/// Starts the ranks, prints rank 0's figures.
fn run_all(a: &BenchCollectivesArgs) -> Result<()> {
    if a.world < 2 {
        bail!("--world {}: a collective needs at least 2 ranks", a.world);
    }
    let exe = std::env::current_exe()?;
    let mut ranks = Vec::new();
    for rank in 0..a.world {
        let mut cmd = Command::new(&exe);
        cmd.arg("bench-collectives")
            .args([
                "--world",
                &a.world.to_string(),
                "--iters",
                &a.iters.to_string(),
            ])
            .args(["--port", &a.port.to_string(), "--rank", &rank.to_string()])
            .arg(format!(
                "--params={}",
                a.params
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ))
            .stdout(if rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        ranks.push(cmd.spawn().context("starting a rank")?);
    }
    let mut rank0 = ranks.remove(0);
    let out = rank0.stdout.take().map(std::io::read_to_string).transpose();
    let mut failed = !rank0.wait()?.success();
    for mut r in ranks {
        failed |= !r.wait()?.success();
    }
    let out = out?.unwrap_or_default();
    if failed {
        bail!("a rank failed (its error is above)");
    }
    println!(
        "{:>12} {:>6} | {:>10} {:>12} | {:>10} {:>12} | {:>6}",
        "params", "ranks", "ring s", "ring GB/s", "c10d s", "c10d GB/s", "ratio"
    );
    for line in out.lines() {
        let f: Value = serde_json::from_str(line)?;
        let x = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>12} {:>6} | {:>10.3} {:>12.2} | {:>10.3} {:>12.2} | {:>5.2}x",
            x("params"),
            a.world,
            x("ring_seconds"),
            x("ring_busbw_gbps"),
            x("c10d_seconds"),
            x("c10d_busbw_gbps"),
            x("ring_seconds") / x("c10d_seconds"),
        );
    }
    Ok(())
}

/// Bus bandwidth of an all-reduce of `bytes` over `world` ranks in `seconds`, GB/s.
fn bus_bandwidth(bytes: f64, world: usize, seconds: f64) -> f64 {
    let w = world as f64;
    bytes * 2.0 * (w - 1.0) / w / seconds / 1e9
}

/// The best of `iters` timed runs of `f` (after one untimed one).
fn best(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn run_rank(a: &BenchCollectivesArgs, rank: usize) -> Result<()> {
    let addresses = (0..a.world)
        .map(|i| format!("127.0.0.1:{}", a.port + i as u16))
        .collect();
    let topo = Topology {
        rank,
        world: a.world,
        addresses,
    };
    let timeout = Duration::from_secs(120);
    let mut ring = Group::connect(&topo, "127.0.0.1", 0, timeout)?;
    let rdzv = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: a.port + a.world as u16,
        rank,
        world: a.world,
        local_rank: rank,
        local_world: a.world,
    };
    let mut pg = ProcessGroup::join(&rdzv, Backend::Gloo, "bench", Some("127.0.0.1"), timeout)?;
    for &n in &a.params {
        let n_usize = usize::try_from(n).context("--params")?;
        // The ring: what a data-parallel step does with its f32 gradient buffer.
        let bounds = even_bounds(n_usize, a.world);
        let byte_bounds: Vec<_> = bounds.iter().map(|b| b.start * 4..b.end * 4).collect();
        let mut buf = vec![1f32; n_usize];
        let ring_seconds = best(a.iters, || {
            ring.reduce_scatter(&mut buf, &bounds)?;
            // SAFETY: f32 has no invalid bit patterns; the view covers exactly `buf`.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 4)
            };
            ring.all_gather(bytes, &byte_bounds)
        })?;
        drop(buf);
        let mut t = Tensor::ones([n], (Kind::Float, Device::Cpu));
        let c10d_seconds = best(a.iters, || pg.all_reduce_sum(&mut t))?;
        drop(t);
        if rank == 0 {
            let bytes = n as f64 * 4.0;
            println!(
                "{}",
                json!({
                    "params": n,
                    "ring_seconds": ring_seconds,
                    "ring_busbw_gbps": bus_bandwidth(bytes, a.world, ring_seconds),
                    "c10d_seconds": c10d_seconds,
                    "c10d_busbw_gbps": bus_bandwidth(bytes, a.world, c10d_seconds),
                })
            );
        }
    }
    pg.barrier()
}
