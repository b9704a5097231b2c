//! `rlt-trainer bench`: the SFT training step and batched sampling, timed in rlt-trainer and in
//! Hugging Face transformers (trainer/bench/hf_bench.py) on the same checkpoint, the same batch
//! and the same torch build, at the model sizes asked for; prints both, the ratio, the model
//! TFLOP/s of each ([`crate::model::flops`]) and, where the device's bf16 peak is known (a GPU by
//! name, or `--peak-tflops`), the model FLOP utilisation (MFU). Also one AdamW
//! update over the model's parameters: the trainer's own ([`crate::train::optim::AdamW`], what every
//! stage runs) against libtorch's C++ `torch::optim::AdamW` (tch exposes neither the fused nor
//! the foreach kernels, so that is the libtorch implementation within reach).
use crate::device::{gpu_name, parse_device, parse_kind};
use crate::engine::sampling::{generate, right_pad, SamplingConfig, SplitMix64};
use crate::model::checkpoint::{load_checkpoint, save_checkpoint, CausalLm};
use crate::model::config::{Qwen2Config, TinySpec};
use crate::model::flops;
use crate::model::tokenizer::Tokenizer;
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::sft::completion_loss;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Sizes to run: tiny (~0.1M parameters), small (22.7M), medium (24M), 0.5b (Qwen2.5-0.5B:
    /// 494M); see [`TinySpec::bench_shape`].
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    pub sizes: Vec<String>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Training batch: rows x tokens (no padding; the first quarter of each row is prompt).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Sampling batch: prompts of 16..=prompt_len tokens (left padding), max_new_tokens each.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup_iters: usize,
    /// Rounds of (rlt-trainer, transformers), alternating; the best time of each side is
    /// reported, so a busy machine penalises neither side more than the other.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Intra-op threads for both sides (default: libtorch's default).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Where to write the checkpoints (default: a temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Python with torch + transformers.
    #[arg(long, env = "RLT_PYTHON", default_value = "python3")]
    pub python: String,
    /// Skip the transformers side.
    #[arg(long)]
    pub rust_only: bool,
    /// The device's peak in TFLOP/s for the dtype benchmarked, for MFU (default: a GPU's dense
    /// bf16 peak from its name; none on the CPU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub sft_seconds: f64,
    pub sft_tokens_per_second: f64,
    pub sample_seconds: f64,
    pub sample_tokens_per_second: f64,
}

struct Workload {
    rows: Vec<Vec<i64>>,
    starts: Vec<usize>,
    prompts: Vec<Vec<i64>>,
}

fn workload(a: &BenchArgs, seed: u64) -> Workload {
    let mut rng = SplitMix64::new(seed);
    let rows: Vec<Vec<i64>> = (0..a.batch)
        .map(|_| (0..a.seq_len).map(|_| rng.below(256) as i64).collect())
        .collect();
    let starts = vec![a.seq_len / 4; a.batch];
    let lo = 16.min(a.prompt_len);
    let prompts = (0..a.batch)
        .map(|_| {
            let n = lo + rng.below((a.prompt_len - lo + 1) as u64) as usize;
            (0..n).map(|_| rng.below(256) as i64).collect()
        })
        .collect();
    Workload {
        rows,
        starts,
        prompts,
    }
}

fn sync(device: Device) {
    if let Device::Cuda(_) = device {
        tch::Cuda::synchronize(0);
    }
}

fn run_rust(dir: &Path, w: &Workload, a: &BenchArgs, pad: i64) -> Result<Figures> {
    let device = parse_device(&a.device)?;
    let (lm, _) = load_checkpoint(dir, device, parse_kind(&a.dtype)?)?;
    let mut opt = AdamW::for_var_store(&lm.vs, AdamWConfig::default());
    let (ids, _) = right_pad(&w.rows, pad, device);
    let mask_rows: Vec<Vec<i64>> = w
        .rows
        .iter()
        .zip(&w.starts)
        .map(|(r, &s)| (0..r.len()).map(|i| (i >= s) as i64).collect())
        .collect();
    let (loss_mask, _) = right_pad(&mask_rows, 0, device);
    let targets: usize = w.rows.iter().zip(&w.starts).map(|(r, s)| r.len() - s).sum();
    let profile = std::env::var_os("RLT_BENCH_PROFILE").is_some();
    let mut step = || {
        let t = Instant::now();
        let loss = completion_loss(&lm.model, &ids, &loss_mask, targets);
        let l = loss.double_value(&[]);
        let t1 = t.elapsed();
        loss.backward();
        let t2 = t.elapsed();
        clip_grad_norm(&opt.params(), 1.0);
        let t3 = t.elapsed();
        opt.step(1e-5);
        opt.zero_grad();
        let t4 = t.elapsed();
        if profile {
            eprintln!(
                "forward {t1:?} backward {:?} clip {:?} adamw {:?}",
                t2 - t1,
                t3 - t2,
                t4 - t3
            );
        }
        l
    };
    for _ in 0..a.warmup_iters {
        step();
    }
    sync(device);
    let t = Instant::now();
    for _ in 0..a.iters {
        step();
    }
    sync(device);
    let sft = t.elapsed().as_secs_f64() / a.iters as f64;
    let n_tokens: usize = w.rows.iter().map(Vec::len).sum();

    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        stop_tokens: vec![],
        seed: 0,
    };
    for _ in 0..a.warmup_iters {
        generate(&lm.model, &w.prompts, pad, &cfg)?;
    }
    sync(device);
    let t = Instant::now();
    let mut generated = 0;
    for _ in 0..a.iters {
        let g = generate(&lm.model, &w.prompts, pad, &cfg)?;
        generated = g.tokens.numel();
    }
    sync(device);
    let samp = t.elapsed().as_secs_f64() / a.iters as f64;
    Ok(Figures {
        sft_seconds: sft,
        sft_tokens_per_second: n_tokens as f64 / sft,
        sample_seconds: samp,
        sample_tokens_per_second: generated as f64 / samp,
    })
}

fn run_python(dir: &Path, w: &Workload, a: &BenchArgs, pad: i64, threads: i32) -> Result<Figures> {
    let spec = json!({
        "model": dir, "device": a.device, "dtype": a.dtype, "threads": threads,
        "train_rows": w.rows, "completion_starts": w.starts, "pad_id": pad,
        "prompts": w.prompts, "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature, "top_p": a.top_p,
        "iters": a.iters, "warmup_iters": a.warmup_iters,
    });
    // Embedded, so the binary alone (the GPU kit) carries it.
    let script = ("hf_bench.py", include_str!("../../bench/hf_bench.py"));
    let v = run_embedded_python(&a.python, dir, script, &spec)?;
    let f = |a: &str, b: &str| {
        v[a][b]
            .as_f64()
            .ok_or_else(|| anyhow!("missing {a}.{b} in {v}"))
    };
    Ok(Figures {
        sft_seconds: f("sft", "seconds_per_step")?,
        sft_tokens_per_second: f("sft", "tokens_per_second")?,
        sample_seconds: f("sampling", "seconds_per_batch")?,
        sample_tokens_per_second: f("sampling", "tokens_per_second")?,
    })
}

/// Writes `spec` and the embedded script `(name, text)` into `dir`, runs the script on the
/// spec with `python`, and returns the JSON of its last line of output.
pub fn run_embedded_python(
    python: &str,
    dir: &Path,
    (name, text): (&str, &str),
    spec: &Value,
) -> Result<Value> {
    let spec_path = dir.join(format!("{}.spec.json", name.trim_end_matches(".py")));
    std::fs::write(&spec_path, spec.to_string())?;
    let script = dir.join(name);
    std::fs::write(&script, text)?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&spec_path)
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    if !out.status.success() {
        bail!("{name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .map_err(|e| anyhow!("parsing the output of {name}: {e}\n{stdout}"))
}

/// The random model of a bench size ([`TinySpec::bench_shape`]), on the CPU in f32.
pub fn bench_model(size: &str, tok: &Tokenizer) -> Result<CausalLm> {
    let (spec, vocab) = TinySpec::bench_shape(size)?;
    match vocab {
        Some(v) => CausalLm::random(
            &Qwen2Config::tiny(&spec, v),
            spec.seed,
            Device::Cpu,
            Kind::Float,
        ),
        None => CausalLm::tiny(&spec, tok, Device::Cpu, Kind::Float),
    }
}

/// Seconds per AdamW update over `lm`'s parameters with fixed random gradients, best of
/// `rounds` x `iters`: the trainer's own and libtorch's C++ AdamW (same betas, eps, decay).
fn time_adamw(lm: &CausalLm, iters: usize, rounds: usize) -> Result<(f64, f64)> {
    use tch::nn::OptimizerConfig;
    let cfg = AdamWConfig::default();
    tch::manual_seed(3);
    for (_, v) in lm.vs.variables() {
        let mut g = v.grad();
        if !g.defined() {
            // A gradient exists once a backward ran; one tiny backward defines them all.
            (&v * 0.0).sum(Kind::Float).backward();
            g = v.grad();
        }
        g.copy_(&(v.randn_like() * 1e-3));
    }
    let mut ours = AdamW::for_var_store(&lm.vs, cfg);
    let mut theirs = tch::nn::AdamW {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        wd: cfg.weight_decay,
        eps: cfg.eps,
        amsgrad: false,
    }
    .build(&lm.vs, 1e-5)?;
    let device = lm.device();
    let (mut best_ours, mut best_theirs) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        for _ in 0..iters.max(1) {
            ours.step(1e-5);
        }
        sync(device);
        best_ours = best_ours.min(t.elapsed().as_secs_f64() / iters.max(1) as f64);
        let t = Instant::now();
        for _ in 0..iters.max(1) {
            theirs.step();
        }
        sync(device);
        best_theirs = best_theirs.min(t.elapsed().as_secs_f64() / iters.max(1) as f64);
    }
    Ok((best_ours, best_theirs))
}

/// Per workload, the faster of two measurements.
fn best(a: Option<Figures>, b: Figures) -> Figures {
    let Some(a) = a else { return b };
    let sft = if a.sft_seconds <= b.sft_seconds { a } else { b };
    let samp = if a.sample_seconds <= b.sample_seconds {
        a
    } else {
        b
    };
    Figures {
        sft_seconds: sft.sft_seconds,
        sft_tokens_per_second: sft.sft_tokens_per_second,
        sample_seconds: samp.sample_seconds,
        sample_tokens_per_second: samp.sample_tokens_per_second,
    }
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let threads = tch::get_num_threads();
    let root = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("rlt-bench-{}", std::process::id())));
    let device = parse_device(&a.device)?;
    let gpu = match device {
        Device::Cuda(i) => gpu_name(i),
        _ => None,
    };
    // The peaks known by name are bf16 tensor-core peaks; other dtypes need --peak-tflops.
    let bf16 = parse_kind(&a.dtype)? == Kind::BFloat16;
    let peak = a.peak_tflops.or_else(|| {
        gpu.as_deref()
            .filter(|_| bf16)
            .and_then(flops::bf16_peak_tflops)
    });
    println!(
        "device {}{} dtype {} threads {threads}; SFT batch {}x{} tokens; sampling {} prompts <= {} tokens + {} new \
         (T={}, top-p={}); best of {} rounds x {} iters",
        a.device,
        gpu.as_deref().map(|g| format!(" ({g})")).unwrap_or_default(),
        a.dtype, a.batch, a.seq_len, a.batch, a.prompt_len, a.max_new_tokens, a.temperature, a.top_p, a.rounds, a.iters
    );
    match peak {
        Some(p) => println!("MFU against a peak of {p} TFLOP/s (model FLOPs: crate::model::flops)"),
        None => println!("MFU: no peak known for this device (pass --peak-tflops)"),
    }
    println!(
        "{:<6} {:>7}  {:<9} {:>34} {:>34} {:>8}",
        "size", "params", "workload", "rlt-trainer", "transformers", "speed-up"
    );
    for size in &a.sizes {
        bench_size(&a, size, &root.join(size), peak, threads)?;
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}

/// One size: the SFT step and sampling timed on both sides (best of `a.rounds`), printed as
/// table rows, and returned as JSON (seconds, tokens/s, model TFLOP/s and MFU of each side).
pub fn bench_size(
    a: &BenchArgs,
    size: &str,
    dir: &Path,
    peak: Option<f64>,
    threads: i32,
) -> Result<Value> {
    let tok = Tokenizer::tiny();
    let lm = bench_model(size, &tok)?;
    let config = lm.config.clone();
    let params = lm.num_parameters();
    save_checkpoint(dir, &lm, &tok)?;
    drop(lm);
    let (adamw_ours, adamw_libtorch) = {
        let (lm, _) = load_checkpoint(dir, parse_device(&a.device)?, parse_kind(&a.dtype)?)?;
        time_adamw(&lm, a.iters * 10, a.rounds)?
    };
    let w = workload(a, 42);
    let (mut ours, mut theirs): (Option<Figures>, Option<Figures>) = (None, None);
    for _ in 0..a.rounds.max(1) {
        ours = Some(best(ours, run_rust(dir, &w, a, tok.pad_id())?));
        if !a.rust_only {
            theirs = Some(best(theirs, run_python(dir, &w, a, tok.pad_id(), threads)?));
        }
    }
    let ours = ours.expect("at least one round");
    let p = format!("{:.1}M", params as f64 / 1e6);
    let prompt = w.prompts.iter().map(Vec::len).max().unwrap_or(0);
    let work = [
        flops::train_step(&config, a.batch, a.seq_len),
        flops::generation(&config, a.batch, prompt, a.max_new_tokens),
    ];
    let cell = |s: f64, tps: f64, work: f64| {
        let tflops = work / s / 1e12;
        let mfu = peak.map_or(String::new(), |p| format!(" {:>5.1}%", 100.0 * tflops / p));
        format!(
            "{:>9.1} ms {:>7.0} tok/s {:>6.2} TF/s{mfu}",
            s * 1e3,
            tps,
            tflops
        )
    };
    let rows = [
        (
            "sft step",
            ours.sft_seconds,
            ours.sft_tokens_per_second,
            theirs.map(|t| (t.sft_seconds, t.sft_tokens_per_second)),
            work[0],
        ),
        (
            "sampling",
            ours.sample_seconds,
            ours.sample_tokens_per_second,
            theirs.map(|t| (t.sample_seconds, t.sample_tokens_per_second)),
            work[1],
        ),
    ];
    let side = |s: f64, tps: f64, work: f64| {
        let tflops = work / s / 1e12;
        json!({"seconds": s, "tokens_per_second": tps, "tflops": tflops,
               "mfu": peak.map(|p| tflops / p)})
    };
    let mut report = json!({"size": size, "parameters": params,
                            "adamw_ms": {"ours": adamw_ours * 1e3, "libtorch": adamw_libtorch * 1e3}});
    for (name, s, tps, other, work) in rows {
        report[name.replace(' ', "_")] = json!({
            "rlt_trainer": side(s, tps, work),
            "transformers": other.map(|(ts, ttps)| side(ts, ttps, work)),
        });
        let (theirs_cell, ratio) = match other {
            Some((ts, ttps)) => (cell(ts, ttps, work), format!("{:.2}x", ts / s)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{size:<6} {p:>7}  {name:<9} {:>34} {theirs_cell:>34} {ratio:>8}",
            cell(s, tps, work)
        );
    }
    println!(
        "{size:<6} {p:>7}  {:<9} {:>9.3} ms (ours) {:>13.3} ms (libtorch C++ AdamW) {:>6.2}x",
        "adamw",
        adamw_ours * 1e3,
        adamw_libtorch * 1e3,
        adamw_libtorch / adamw_ours
    );
    Ok(report)
}
