//! `rlt-trainer bench-generation`: an RL step's generation, a group of G samples of one prompt,
//! timed in rlt-trainer ([`crate::engine::sampling::generate`], as a rollout calls it) and in Hugging
//! Face transformers' `generate` (trainer/bench/hf_generate.py) on the same checkpoint, prompt
//! and torch build, alternating rounds; prints tokens/s of each and the ratio.
use crate::bench::versus_transformers::{bench_model, run_embedded_python};
use crate::device::{parse_device, parse_kind};
use crate::engine::sampling::{generate, SamplingConfig, SplitMix64};
use crate::model::checkpoint::save_checkpoint;
use crate::model::tokenizer::Tokenizer;
use anyhow::{anyhow, Result};
use clap::Args;
use serde_json::json;
use std::path::Path;
use std::time::Instant;
use tch::Kind;

#[derive(Args, Debug, Clone)]
pub struct BenchGenerationArgs {
    /// Model sizes ([`crate::model::config::TinySpec::bench_shape`]): tiny (~0.1M parameters), small (22.7M), ...
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    pub sizes: Vec<String>,
    /// Samples per prompt (the RL group size).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub groups: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// New tokens per sample at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Stop tokens (ids 100.. of the tiny vocabulary), as RL's explanations end: with random
    /// weights each is about as likely as any token, so 8 end a sample after ~40 tokens on
    /// average, and the group's samples end at different lengths. 0: every sample runs to
    /// `max_new_tokens`. Tokens/s counts the tokens up to each sample's stop, on both sides.
    #[arg(long, default_value_t = 0)]
    pub stops: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Timed runs per round (after one untimed); the best round of each side is reported.
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    #[arg(long)]
    pub threads: Option<i32>,
    /// Python with torch + transformers.
    #[arg(long, env = "RLT_PYTHON", default_value = "python3")]
    pub python: String,
    #[arg(long)]
    pub rust_only: bool,
}

pub fn bench_generation(a: BenchGenerationArgs) -> Result<()> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let threads = tch::get_num_threads();
    let root = std::env::temp_dir().join(format!("rlt-bench-gen-{}", std::process::id()));
    println!(
        "device {} dtype {} threads {threads}; a group of G samples of one {}-token prompt, {} new \
         tokens each at most, {} stop tokens (T={}, top-p={}); tokens/s, best of {} rounds x {} \
         iters",
        a.device,
        a.dtype,
        a.prompt_len,
        a.max_new_tokens,
        a.stops,
        a.temperature,
        a.top_p,
        a.rounds,
        a.iters
    );
    println!(
        "{:<6} {:>7} {:>5} {:>14} {:>14} {:>8}",
        "size", "params", "G", "rlt-trainer", "transformers", "ratio"
    );
    for size in &a.sizes {
        let dir = root.join(size);
        let (params, pad) = checkpoint(size, &dir)?;
        let mut rng = SplitMix64::new(7);
        let prompt: Vec<i64> = (0..a.prompt_len).map(|_| rng.below(256) as i64).collect();
        for &g in &a.groups {
            let (mut ours, mut theirs) = (0f64, 0f64);
            for _ in 0..a.rounds.max(1) {
                ours = ours.max(run_rust(&dir, &prompt, g, pad, &a)?);
                if !a.rust_only {
                    theirs = theirs.max(run_python(&dir, &prompt, g, pad, threads, &a)?);
                }
            }
            let (theirs_s, ratio) = if a.rust_only {
                ("-".to_string(), "-".to_string())
            } else {
                (format!("{theirs:.0}"), format!("{:.2}x", ours / theirs))
            };
            println!(
                "{size:<6} {:>6.1}M {g:>5} {ours:>14.0} {theirs_s:>14} {ratio:>8}",
                params as f64 / 1e6
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// The random model of `size` saved in `dir`: (parameters, pad id).
fn checkpoint(size: &str, dir: &Path) -> Result<(i64, i64)> {
    let tok = Tokenizer::tiny();
    let lm = bench_model(size, &tok)?;
    save_checkpoint(dir, &lm, &tok)?;
    Ok((lm.num_parameters(), tok.pad_id()))
}

fn stop_ids(n: usize) -> Vec<i64> {
    (100..100 + n as i64).collect()
}

/// Generated tokens per second of the best of `iters` runs.
fn run_rust(
    dir: &Path,
    prompt: &[i64],
    g: usize,
    pad: i64,
    a: &BenchGenerationArgs,
) -> Result<f64> {
    let device = parse_device(&a.device)?;
    let (lm, _) = crate::model::checkpoint::load_checkpoint(dir, device, parse_kind(&a.dtype)?)?;
    let prompts = vec![prompt.to_vec(); g];
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        stop_tokens: stop_ids(a.stops),
        seed: 0,
    };
    let mut best = 0f64;
    for i in 0..=a.iters {
        let t = Instant::now();
        let out = tch::no_grad(|| generate(&lm.model, &prompts, pad, &cfg))?;
        let n = out.mask.sum(Kind::Int64).int64_value(&[]) as f64;
        if i > 0 {
            best = best.max(n / t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

fn run_python(
    dir: &Path,
    prompt: &[i64],
    g: usize,
    pad: i64,
    threads: i32,
    a: &BenchGenerationArgs,
) -> Result<f64> {
    let spec = json!({
        "model": dir, "device": a.device, "dtype": a.dtype, "threads": threads,
        "prompt": prompt, "group": g, "pad_id": pad, "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature, "top_p": a.top_p, "iters": a.iters,
        "stops": stop_ids(a.stops),
    });
    let script = ("hf_generate.py", include_str!("../../bench/hf_generate.py"));
    let v = run_embedded_python(&a.python, dir, script, &spec)?;
    v["tokens_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no tokens_per_second in {v}"))
}
