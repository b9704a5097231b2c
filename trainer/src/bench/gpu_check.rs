//! `rlt-trainer gpu-check`: the trainer on one device, checked in one run with one JSON
//! report, the GPU kit's command (`scripts/dev gpu-kit`): the device and driver; the model's
//! logits and greedy continuations against transformers' for a random Qwen2 in bf16 and fp32;
//! an SFT step's time and MFU, and sampling tokens/s, against transformers on the same batch
//! ([`crate::bench::versus_transformers`]); one RL group of a learner, with the memory preflight's estimate beside
//! what the CUDA caching allocator really peaked at (`torch.cuda.max_memory_allocated`; on the
//! CPU, the process's peak resident memory). On a GPU it runs at Qwen2.5-0.5B's shape; CI runs
//! it on the CPU at the tiny shape so it cannot rot.
use crate::bench::versus_transformers::{self, BenchArgs};
use crate::device::{cuda_peak_allocated, cuda_reset_peak, gpu_name, nvidia_smi, parse_device};
use crate::engine::sampling::{generate, left_pad, SamplingConfig, SplitMix64};
use crate::model::checkpoint::{load_checkpoint, save_checkpoint, CausalLm};
use crate::model::config::{Qwen2Config, TinySpec};
use crate::model::tokenizer::Tokenizer;
use crate::rl::cli::RolloutArgs;
use crate::rl::learner::{Models, Placement};
use crate::rl::rollout::{
    policy_gradient, sample_and_score, zero_gradients, GradSum, RolloutConfig, StepContribution,
};
use crate::train::memory::{self, LearnerPlan, Shape, GIB};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rlt_api::spec::defaults;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Args, Debug, Clone)]
pub struct GpuCheckArgs {
    /// cuda (GPU 0), cuda:N or cpu.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Model shape (`rlt-trainer bench`'s sizes): default 0.5b on a GPU, tiny on the CPU.
    #[arg(long)]
    pub size: Option<String>,
    /// Where the JSON report goes (it is also printed).
    #[arg(long, default_value = "gpu-check-report.json")]
    pub out: PathBuf,
    /// Python with torch and transformers, for their side.
    #[arg(long, env = "RLT_PYTHON", default_value = "python3")]
    pub python: String,
    /// The RL group: explanations sampled, and new tokens each.
    #[arg(long, default_value_t = 16)]
    pub group_size: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Working directory for the checkpoints (default: a temporary one, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn gpu_check(a: GpuCheckArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let size = a
        .size
        .clone()
        .unwrap_or_else(|| if device.is_cuda() { "0.5b" } else { "tiny" }.to_string());
    let root = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("rlt-gpu-check-{}", std::process::id()))
    });
    std::fs::create_dir_all(&root)?;
    let started = Instant::now();
    let mut report = json!({"environment": environment(device, &a.python)});
    eprintln!("{}", report["environment"]);

    let model = root.join("model");
    let shape = random_model(&size, &model)?;
    // bf16 is the GPU's format; on the CPU it is ~30x slower and checked at a smaller batch.
    for dtype in ["bf16", "f32"] {
        let n = numerics(&a, device, &model, dtype, &root)?;
        eprintln!("numerics {dtype}: {n}");
        report["numerics"][dtype] = n;
    }
    let kind = if device.is_cuda() { "bf16" } else { "f32" };
    let b = bench_args(&a, &size, kind, &root);
    let peak = match device {
        Device::Cuda(i) => gpu_name(i).and_then(|g| crate::model::flops::bf16_peak_tflops(&g)),
        _ => None,
    };
    report["bench"] = versus_transformers::bench_size(
        &b,
        &size,
        &root.join("bench"),
        peak,
        tch::get_num_threads(),
    )?;
    let rl = rl_group(&a, device, &model, &shape)?;
    eprintln!("rl group: {rl}");
    report["rl_group"] = rl;
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    let failed = failures(&report, device.is_cuda());
    report["failed_checks"] = json!(failed);
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.out, &text).with_context(|| format!("writing {}", a.out.display()))?;
    println!("{text}");
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    if !failed.is_empty() {
        bail!("gpu-check: {}", failed.join("; "));
    }
    Ok(())
}

/// The report's verdicts: what a user depends on, the rest being figures. f32 logits agree with
/// transformers' to f32 rounding and so do greedy continuations; bf16 logits to bf16's (8
/// mantissa bits over a few layers; greedy paths of a random model may part on near-ties);
/// on a GPU, the RL group's memory estimate covers what the allocator peaked at (on the CPU
/// the resident peak also holds everything loaded before, so it is only reported).
pub fn failures(report: &Value, gpu: bool) -> Vec<String> {
    let mut failed = Vec::new();
    for (dtype, tolerance) in [("f32", 1e-4), ("bf16", 3e-2)] {
        let n = &report["numerics"][dtype];
        let relative = n["relative"].as_f64().unwrap_or(f64::INFINITY);
        if relative > tolerance {
            failed.push(format!(
                "{dtype} logits differ from transformers' by {relative:.2e} of their scale (> {tolerance:.0e})"
            ));
        }
    }
    let f32 = &report["numerics"]["f32"];
    let want = f32["greedy_tokens"].as_u64().unwrap_or(0);
    let agree = f32["greedy_tokens_agreeing"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if agree.is_empty() || agree.iter().any(|n| n.as_u64() != Some(want)) {
        failed.push(format!(
            "f32 greedy continuations part from transformers' ({agree:?} of {want} tokens agree)"
        ));
    }
    let rl = &report["rl_group"];
    if let (true, Some(measured), Some(estimate)) = (
        gpu,
        rl["measured_gib"].as_f64(),
        rl["estimate_gib"].as_f64(),
    ) {
        if measured > estimate {
            failed.push(format!(
                "the RL group peaked at {measured:.2} GiB, above the preflight's {estimate:.2} GiB"
            ));
        }
    }
    failed
}

/// The device, its driver and the libraries on both sides.
fn environment(device: Device, python: &str) -> Value {
    let torch = std::process::Command::new(python)
        .args([
            "-c",
            "import torch, transformers; print(torch.__version__, transformers.__version__)",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let index = match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    json!({
        "device": format!("{device:?}"),
        "gpu": index.and_then(gpu_name),
        "driver": index.and_then(|i| nvidia_smi(i, "driver_version")),
        "memory_mib": index.and_then(|i| nvidia_smi(i, "memory.total")),
        "cuda_devices": tch::Cuda::device_count(),
        "cudnn": tch::Cuda::cudnn_is_available(),
        "allocator_stats": crate::device::CUDA_STATS,
        "python_torch_transformers": torch,
        "threads": tch::get_num_threads(),
    })
}

/// A random Qwen2 of `size`'s shape (its real vocabulary at 0.5b), saved in f32.
fn random_model(size: &str, dir: &Path) -> Result<Shape> {
    let tok = Tokenizer::tiny();
    let (spec, vocab): (TinySpec, Option<i64>) = TinySpec::bench_shape(size)?;
    let config = Qwen2Config::tiny(&spec, vocab.unwrap_or(272));
    let lm = CausalLm::random(&config, spec.seed, Device::Cpu, Kind::Float)?;
    save_checkpoint(dir, &lm, &tok)?;
    Ok(Shape::of(&config))
}

fn prompts(n: usize, vocab: i64) -> Vec<Vec<i64>> {
    let mut rng = SplitMix64::new(7);
    (0..n)
        .map(|i| {
            (0..8 + 5 * i)
                .map(|_| rng.below(vocab.min(256) as u64) as i64)
                .collect()
        })
        .collect()
}

/// Logits of a left-padded batch and greedy continuations, ours against transformers', in
/// `dtype` on the device: the largest logit difference (and the logits' scale), and how
/// many greedy tokens agree before the first difference, per row.
fn numerics(
    a: &GpuCheckArgs,
    device: Device,
    model: &Path,
    dtype: &str,
    root: &Path,
) -> Result<Value> {
    let kind = crate::device::parse_kind(dtype)?;
    let (lm, tok) = load_checkpoint(model, device, kind)?;
    let rows = prompts(4, lm.config.vocab_size);
    let max_new = 16;
    let (ids, mask) = left_pad(&rows, tok.pad_id(), device);
    let ours = tch::no_grad(|| lm.model.forward(&ids, Some(&mask), None)).to_kind(Kind::Float);
    let cfg = SamplingConfig {
        max_new_tokens: max_new,
        temperature: 0.0,
        top_p: 1.0,
        stop_tokens: vec![],
        seed: 0,
    };
    let greedy = tch::no_grad(|| generate(&lm.model, &rows, tok.pad_id(), &cfg))?.token_lists();
    drop(lm);

    let spec = json!({"model": model, "device": device_name(device), "dtype": dtype,
                      "prompts": rows, "pad_id": tok.pad_id(), "max_new_tokens": max_new});
    let (spec_path, out_path) = (root.join("numerics.json"), root.join("numerics.out.json"));
    std::fs::write(&spec_path, spec.to_string())?;
    let script = root.join("hf_numerics.py");
    std::fs::write(&script, include_str!("../../gpu/hf_numerics.py"))?;
    let out = std::process::Command::new(&a.python)
        .arg(&script)
        .args([&spec_path, &out_path])
        .output()
        .with_context(|| format!("running {}", a.python))?;
    if !out.status.success() {
        bail!(
            "transformers numerics failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let hf: Value = serde_json::from_str(&std::fs::read_to_string(&out_path)?)?;
    let theirs: Vec<Vec<Vec<f32>>> = serde_json::from_value(hf["logits"].clone())?;
    let theirs = Tensor::from_slice(&theirs.concat().concat())
        .view(ours.size().as_slice())
        .to_device(device);
    let real = mask.unsqueeze(-1).to_kind(Kind::Float);
    let diff = ((&ours - &theirs).abs() * &real).max().double_value(&[]);
    let scale = (theirs.abs() * &real).max().double_value(&[]);
    let generated: Vec<Vec<i64>> = serde_json::from_value(hf["generated"].clone())?;
    let agree: Vec<usize> = greedy
        .iter()
        .zip(&generated)
        .map(|(o, t)| o.iter().zip(t).take_while(|(x, y)| x == y).count())
        .collect();
    Ok(json!({
        "max_logit_difference": diff,
        "logit_scale": scale,
        "relative": diff / scale.max(1e-12),
        "greedy_tokens_agreeing": agree,
        "greedy_tokens": max_new,
    }))
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

fn bench_args(a: &GpuCheckArgs, size: &str, dtype: &str, root: &Path) -> BenchArgs {
    let gpu = a.device != "cpu";
    BenchArgs {
        sizes: vec![size.into()],
        device: a.device.clone(),
        dtype: dtype.into(),
        batch: if gpu { 8 } else { 4 },
        seq_len: if gpu { 1024 } else { 64 },
        prompt_len: if gpu { 256 } else { 16 },
        max_new_tokens: if gpu { 256 } else { 16 },
        temperature: 0.7,
        top_p: 0.95,
        iters: 3,
        warmup_iters: 1,
        rounds: 1,
        threads: None,
        dir: Some(root.join("bench")),
        python: a.python.clone(),
        rust_only: false,
        peak_tflops: None,
    }
}

/// One RL group of a learner (teacher, reference and student of the model's shape): sampled,
/// scored and backpropagated with the passes the preflight picks for the device, the
/// estimate beside the measured peak.
fn rl_group(a: &GpuCheckArgs, device: Device, model: &Path, shape: &Shape) -> Result<Value> {
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let placement = Placement::of(device);
    let examples = crate::data::synthetic::generate(&Default::default());
    let example = examples
        .first()
        .ok_or_else(|| anyhow!("no synthetic example"))?;
    let models = Models::load(model, model, placement, kind)?;
    let prompts = crate::data::Prompts::short();
    let prompt = models.group_prompt(&prompts, example)?;
    let plan = LearnerPlan {
        dtype_bytes: kind.elt_size_in_bytes() as u32,
        group_size: a.group_size as u32,
        prompt: prompt
            .teacher_prompt
            .len()
            .max(prompt.student_row(&models.tokenizer, "")?.ids.len()) as u32,
        max_new_tokens: a.max_new_tokens as u32,
        micro_batch: 0,
        generation_batch: 0,
        checkpointing: true,
        devices: placement.devices(),
    };
    let available = memory::available(device, 1).unwrap_or(16.0 * GIB);
    let plan = memory::learner_preflight(shape, shape, &plan, available).map_err(|m| anyhow!(m))?;
    let estimate = memory::learner_estimate(shape, shape, &plan);
    let cfg = RolloutConfig {
        group_size: a.group_size,
        max_new_tokens: a.max_new_tokens,
        micro_batch: plan.micro_batch as usize,
        generation_batch: plan.generation_batch as usize,
        activation_checkpointing: true,
        ..RolloutArgs::default().config(&defaults::rl(), Default::default())
    };
    let index = match placement.policy {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    if let Some(i) = index {
        tch::Cuda::synchronize(i as i64);
        cuda_reset_peak(i);
    }
    let t = Instant::now();
    let mut out = StepContribution::default();
    zero_gradients(&models.teacher);
    let sums = GradSum::new(&models.teacher);
    let ids = models.special_ids()?;
    let group = sample_and_score(
        &models.teacher,
        &models.reference,
        &models.student,
        &models.tokenizer,
        &prompt,
        &ids,
        &cfg,
        11,
        &mut out,
    )?;
    policy_gradient(&models.teacher.model, &group, &cfg, &sums);
    drop(sums.take(&models.teacher));
    if let Some(i) = index {
        tch::Cuda::synchronize(i as i64);
    }
    let seconds = t.elapsed().as_secs_f64();
    // On a GPU what the allocator held at most; on the CPU the process's peak resident
    // memory, which also holds everything the check loaded before.
    let measured = match index {
        Some(i) => cuda_peak_allocated(i).map(|b| b as f64),
        None => memory::peak_rss_mib().map(|m| m * (1u64 << 20) as f64),
    };
    Ok(json!({
        "group_size": a.group_size,
        "max_new_tokens": a.max_new_tokens,
        "rows_per_backward": plan.micro_batch,
        "rows_per_sampling": plan.generation_batch,
        "devices": plan.devices,
        "estimate_gib": estimate.total() / GIB,
        "measured_gib": measured.map(|b| b / GIB),
        "measured_is": if index.is_some() { "torch.cuda.max_memory_allocated" } else { "peak resident memory (VmHWM)" },
        "generated_tokens": out.generated_tokens,
        "seconds": seconds,
        "phases": {"generation": out.times.generation, "scoring": out.times.scoring,
                   "backward": out.times.backward},
        "generated_tokens_per_second": out.generated_tokens as f64 / out.times.generation.max(1e-9),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(f32_relative: f64, agree: u64, measured: f64) -> Value {
        json!({
            "numerics": {
                "f32": {"relative": f32_relative, "greedy_tokens": 16,
                        "greedy_tokens_agreeing": [16, agree]},
                "bf16": {"relative": 4e-3, "greedy_tokens": 16,
                         "greedy_tokens_agreeing": [3, 16]},
            },
            "rl_group": {"estimate_gib": 10.0, "measured_gib": measured},
        })
    }

    #[test]
    fn a_report_within_tolerance_passes_and_each_verdict_can_fail() {
        assert!(failures(&report(2e-6, 16, 9.5), true).is_empty());
        let logits = failures(&report(3e-3, 16, 9.5), true);
        assert!(logits[0].starts_with("f32 logits differ"), "{logits:?}");
        let greedy = failures(&report(2e-6, 15, 9.5), true);
        assert!(greedy[0].contains("greedy"), "{greedy:?}");
        let memory = failures(&report(2e-6, 16, 10.5), true);
        assert!(memory[0].contains("above the preflight"), "{memory:?}");
        // The CPU's resident peak is reported, not judged.
        assert!(failures(&report(2e-6, 16, 10.5), false).is_empty());
        // A missing section is a failure, not a pass.
        assert_eq!(failures(&json!({}), true).len(), 3);
    }
}
