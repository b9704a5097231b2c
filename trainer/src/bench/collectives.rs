//! `rlt-trainer bench-collectives`: what a data-parallel update moves, across rank processes
//! on this machine over libtorch's c10d (Gloo over loopback TCP): a reduce-scatter of a model of
//! `params` parameters' gradients and an all-gather of its weights, by c10d's own two
//! collectives in f32, and as the update runs them on Gloo ([`Group`]: as all-reduces) in f32
//! and with bf16 on the wire, in one run. Prints each one's time and bus bandwidth of the f32
//! bytes (as nccl-tests counts an all-reduce: 2(W-1)/W of the buffer crosses each rank's link)
//! and the speed-up of the update's bf16 over c10d's f32 pair.
use crate::train::c10d::{Backend, ProcessGroup, Rendezvous};
use crate::train::collective::Group;
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
    /// Port of rank 0's c10d TCPStores (this one and the next).
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
        "{:>12} {:>6} | {:>14} | {:>14} | {:>14} | {:>7}",
        "params", "ranks", "c10d RS+AG f32", "update f32", "update bf16", "bf16 vs c10d"
    );
    println!(
        "{:>21} | {:>14} | {:>14} | {:>14} |",
        "", "s  GB/s", "s  GB/s", "s  GB/s"
    );
    for line in out.lines() {
        let f: Value = serde_json::from_str(line)?;
        let x = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
        let col = |k: &str| {
            format!(
                "{:.3} {:>5.2}",
                x(&format!("{k}_seconds")),
                x(&format!("{k}_busbw_gbps"))
            )
        };
        println!(
            "{:>12} {:>6} | {:>14} | {:>14} | {:>14} | {:>6.2}x",
            x("params"),
            a.world,
            col("c10d"),
            col("f32"),
            col("bf16"),
            x("c10d_seconds") / x("bf16_seconds"),
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
    let timeout = Duration::from_secs(120);
    let rdzv = Rendezvous {
        master_addr: "127.0.0.1".into(),
        master_port: a.port,
        rank,
        world: a.world,
        local_rank: rank,
        local_world: a.world,
    };
    let bind = Some("127.0.0.1");
    let mut pg = ProcessGroup::join(&rdzv, Backend::Gloo, "bench", bind, timeout, timeout)?;
    // Its own store, on the next port.
    let second = Rendezvous {
        master_port: a.port + 1,
        ..rdzv.clone()
    };
    let mut group = Group::join(&second, Backend::Gloo, "bench-group", bind, timeout)?;
    for &n in &a.params {
        // Padded to equal shards, as the data-parallel update lays out its buffer.
        let shard = (n + a.world as i64 - 1) / a.world as i64;
        let whole = |kind| Tensor::ones([shard * a.world as i64], (kind, Device::Cpu));
        // c10d's own reduce-scatter and all-gather, as NCCL would run them.
        let (input, mut gathered) = (whole(Kind::Float), whole(Kind::Float));
        let mut mine = Tensor::empty([shard], (Kind::Float, Device::Cpu));
        let c10d_seconds = best(a.iters, || {
            pg.reduce_scatter_sum(&mut mine, &input)?;
            pg.all_gather(&mut gathered, &mine)
        })?;
        // What the update runs on Gloo (`Group`: both as all-reduces), in f32 and in bf16.
        let mut seconds = |kind: Kind| {
            let (mut input, mut gathered) = (whole(kind), whole(kind));
            let mut mine = Tensor::empty([shard], (kind, Device::Cpu));
            best(a.iters, || {
                group.reduce_scatter_sum(&mut mine, &mut input)?;
                group.all_gather(&mut gathered, &mine)
            })
        };
        let f32_seconds = seconds(Kind::Float)?;
        let bf16_seconds = seconds(Kind::BFloat16)?;
        drop((input, gathered));
        if rank == 0 {
            // Bandwidth of the gradients' bytes in f32 either way: what an update achieves.
            let bytes = n as f64 * 4.0;
            let bw = |s: f64| bus_bandwidth(bytes, a.world, s);
            println!(
                "{}",
                json!({
                    "params": n,
                    "c10d_seconds": c10d_seconds,
                    "c10d_busbw_gbps": bw(c10d_seconds),
                    "f32_seconds": f32_seconds,
                    "f32_busbw_gbps": bw(f32_seconds),
                    "bf16_seconds": bf16_seconds,
                    "bf16_busbw_gbps": bw(bf16_seconds),
                })
            );
        }
    }
    pg.barrier(None)
}
