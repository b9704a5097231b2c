//! `rlt-trainer eval`: a checkpoint answers a benchmark file, greedily or with k samples per
//! problem, in the student chat format; the completions are graded (see [`super::report`])
//! into a JSON report. For sets that carry a reference solution (custom rows, e.g. the
//! synthetic task's held-out split) it also scores the solution's log-likelihood: the mean
//! log-prob per token of the gold solution after the model's own (first) thought.
use super::bench::{self, Benchmark, Problem};
use super::report::{self, Report, Sampling};
use crate::data::{self, Example, Prompts};
use crate::engine::logprobs::sequence_logprobs;
use crate::engine::sampling::{generate, SamplingConfig};
use crate::model::checkpoint::{load_checkpoint, CausalLm};
use crate::model::tokenizer::{Tokenizer, BEGIN_OF_SOLUTION, BEGIN_OF_THOUGHT, END_OF_THOUGHT};
use crate::stage::cli::{DeviceArgs, PromptStyle};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use tch::{Kind, Tensor};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Checkpoint directory (HF layout) to evaluate.
    #[arg(long)]
    pub model: PathBuf,
    /// math500, aime2024, gpqa-diamond or custom (question/solution rows).
    #[arg(long)]
    pub benchmark: Benchmark,
    /// The benchmark file (JSON, JSONL, or CSV for GPQA).
    #[arg(long)]
    pub file: PathBuf,
    /// Completions per problem; more than 1 needs --temperature > 0.
    #[arg(long, short = 'k', default_value_t = 1)]
    pub samples: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Prompts per generation batch (each with its k samples).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate only the first N problems.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value = "standard")]
    pub prompts: PromptStyle,
    /// Write the JSON report here (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep every raw completion in the report.
    #[arg(long)]
    pub keep_completions: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl EvalArgs {
    pub fn sampling(&self) -> Result<Sampling> {
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if self.temperature <= 0.0 {
            if self.samples > 1 {
                bail!(
                    "--samples {} needs --temperature > 0 (greedy decoding gives one answer)",
                    self.samples
                );
            }
            return Ok(Sampling::Greedy);
        }
        Ok(Sampling::Sampled {
            k: self.samples,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        })
    }
}

/// Runs the evaluation and writes the report (to `--out` or stdout).
pub fn eval(a: EvalArgs) -> Result<Report> {
    let sampling = a.sampling()?;
    let mut problems = bench::load(a.benchmark, &a.file)?;
    if let Some(n) = a.limit {
        problems.truncate(n);
    }
    let (device, kind) = a.device.resolve()?;
    let (lm, tok) = load_checkpoint(&a.model, device, kind)?;
    let prompts = a.prompts.prompts();
    let report = evaluate(&lm, &tok, &prompts, &problems, &a, sampling)?;
    let json = serde_json::to_string_pretty(&report)?;
    match &a.out {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        }
        None => println!("{json}"),
    }
    tracing::info!(
        benchmark = %a.benchmark,
        problems = report.problems,
        accuracy = report.accuracy,
        pass_at_k = report.pass_at_k,
        solution_logprob = ?report.mean_solution_logprob,
        "evaluation done"
    );
    Ok(report)
}

/// Generates, grades and (for problems with a reference solution) scores log-likelihood.
pub fn evaluate(
    lm: &CausalLm,
    tok: &Tokenizer,
    prompts: &Prompts,
    problems: &[Problem],
    a: &EvalArgs,
    sampling: Sampling,
) -> Result<Report> {
    let k = sampling.samples_per_problem();
    let (temperature, top_p, seed) = match sampling {
        Sampling::Greedy => (0.0, 1.0, a.seed),
        Sampling::Sampled {
            temperature,
            top_p,
            seed,
            ..
        } => (temperature, top_p, seed),
    };
    let bar = progress_bar(problems.len() as u64, "eval");
    let mut results = Vec::with_capacity(problems.len());
    for (b, chunk) in problems.chunks(a.batch_size.max(1)).enumerate() {
        let mut ids = Vec::with_capacity(chunk.len() * k);
        for p in chunk {
            let prompt = student_prompt(prompts, p);
            let encoded = tok.encode(&prompt)?;
            ids.extend(std::iter::repeat_n(encoded, k));
        }
        let cfg = SamplingConfig {
            max_new_tokens: a.max_new_tokens,
            temperature,
            top_p,
            stop_tokens: tok.eos_ids().to_vec(),
            // A different stream per batch, fixed by the seed.
            seed: seed.wrapping_add(b as u64),
        };
        let generation = tch::no_grad(|| generate(&lm.model, &ids, tok.pad_id(), &cfg))?;
        let texts = generation
            .token_lists()
            .iter()
            .map(|t| tok.decode(t))
            .collect::<Result<Vec<_>>>()?;
        for (p, completions) in chunk.iter().zip(texts.chunks(k)) {
            let mut r = report::score(p, completions, a.keep_completions);
            if let Some(solution) = &p.solution {
                let thought = thought_of(&completions[0]);
                r.solution_logprob = Some(solution_logprob(
                    lm,
                    tok,
                    prompts,
                    &p.question,
                    &thought,
                    solution,
                )?);
            }
            results.push(r);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(report::summarize(
        a.benchmark.to_string(),
        a.file.display().to_string(),
        a.model.display().to_string(),
        sampling,
        results,
    ))
}

/// The student-format prompt for a problem: system + user turn, the assistant turn opened.
pub fn student_prompt(prompts: &Prompts, p: &Problem) -> String {
    let e = Example {
        question: p.prompt(),
        solution: String::new(),
        reasoning: None,
        system: None,
    };
    data::student_chat(prompts, &e, "").prompt
}

/// The thought a completion wrote: between the thought tags, or everything after the opening
/// tag when the completion was cut before closing it.
pub fn thought_of(completion: &str) -> String {
    if let Some(t) = data::between(completion, BEGIN_OF_THOUGHT, END_OF_THOUGHT) {
        return t;
    }
    let after = completion
        .find(BEGIN_OF_THOUGHT)
        .map_or(completion, |i| &completion[i + BEGIN_OF_THOUGHT.len()..]);
    after
        .split(BEGIN_OF_SOLUTION)
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Mean log-prob per token of `solution` in the student chat after `thought`.
pub fn solution_logprob(
    lm: &CausalLm,
    tok: &Tokenizer,
    prompts: &Prompts,
    question: &str,
    thought: &str,
    solution: &str,
) -> Result<f64> {
    let e = Example {
        question: question.into(),
        solution: solution.into(),
        reasoning: None,
        system: None,
    };
    let [prefix, thought, middle, solution, suffix] = data::student_segments(prompts, &e, thought);
    let mut ids = tok.encode(&format!("{prefix}{thought}{middle}"))?;
    let start = ids.len();
    ids.extend(tok.encode(&solution)?);
    let end = ids.len();
    ids.extend(tok.encode(&suffix)?);
    if end == start {
        bail!("the solution {solution:?} has no tokens");
    }
    let input = Tensor::from_slice(&ids).unsqueeze(0).to(lm.model.device());
    // Entry t of the log-probs scores token t + 1.
    let lp = tch::no_grad(|| sequence_logprobs(&lm.model, &input, None, 1.0));
    let scored = lp.narrow(1, start as i64 - 1, (end - start) as i64);
    Ok(scored.mean(Kind::Float).double_value(&[]))
}

pub(crate) fn progress_bar(len: u64, prefix: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(prefix.to_string());
    bar
}
