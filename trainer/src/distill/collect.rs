//! The teacher writes an explanation for every (question, solution) of the dataset.
//!
//! The teacher gets the RL prompt (question and solution, cut after the opening explanation
//! tag) and samples the explanation. What it writes is stored raw: no filtering, no cleanup.
//!
//! One explanation per row, as the method collects them: a student's training example is the
//! student chat (question, explanation as the thought, solution), which must fit the student's
//! context (`max_tokens_per_trace`), so each row's sample has the budget that keeps its chat
//! inside it, and a row whose sample does not close within that budget is sampled again, up
//! to `traces` samples in all; the first that closes and fits is the row's example. A row none
//! of whose samples fits keeps its first, cut to the budget and marked incomplete, so a short
//! context degrades the data rather than losing the row. (Every fitting sample of a row kept as
//! its own example would duplicate questions, over-weight short explanations and multiply the
//! fine-tune's steps.)
use super::traces::{TraceFile, TraceRow};
use crate::data::{self, Example, Prompts};
use crate::engine::sampling::{generate, SamplingConfig};
use crate::model::checkpoint::CausalLm;
use crate::model::tokenizer::{Tokenizer, END_OF_EXPLANATION};
use anyhow::{bail, Result};
use rlt_api::spec::DistillationStage;
use rlt_api::RltRunSpec;

#[derive(Debug, Clone, PartialEq)]
pub struct CollectConfig {
    /// The student's context: tokens of one student chat (question, trace, solution).
    pub max_tokens_per_trace: usize,
    /// Most traces per row.
    pub traces: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Rows per generation batch (and per write to the file).
    pub batch_size: usize,
    pub seed: u64,
}

impl CollectConfig {
    /// Collection as the run gives it: the teacher samples at its RL temperature, a batch of
    /// rows per generation as large as the student's fine-tuning batch.
    pub fn of_run(spec: &RltRunSpec) -> Self {
        Self::of(&spec.distillation, spec.rl.temperature)
    }

    /// Collection as `spec.distillation` gives it, the teacher sampling at `temperature`.
    pub fn of(d: &DistillationStage, temperature: f64) -> Self {
        CollectConfig {
            max_tokens_per_trace: d.trace_splitting.max_tokens_per_trace as usize,
            traces: d.trace_splitting.traces as usize,
            temperature,
            top_p: 1.0,
            batch_size: d.batch_size as usize,
            seed: 0,
        }
    }
}

/// Tokens left for the explanation in one student chat of `e`: the context minus the chat
/// with an empty thought.
pub fn trace_budget(
    student_tok: &Tokenizer,
    prompts: &Prompts,
    e: &Example,
    max_tokens: usize,
) -> Result<usize> {
    let chat = data::student_chat(prompts, e, "");
    let overhead =
        student_tok.encode(&chat.prompt)?.len() + student_tok.encode(&chat.completion)?.len();
    match max_tokens.checked_sub(overhead) {
        Some(budget) if budget > 0 => Ok(budget),
        _ => bail!(
            "the student chat of this row has {overhead} tokens without any explanation, which leaves \
             nothing of maxTokensPerTrace = {max_tokens}; raise distillation.traceSplitting.maxTokensPerTrace"
        ),
    }
}

/// Collects the traces of the rows `file` holds and has not written yet, `cfg.batch_size`
/// rows per generation pass, appending each pass to `file`. `on_rows` is told how many rows
/// each pass finished (for a progress bar).
#[allow(clippy::too_many_arguments)]
pub fn collect(
    teacher: &CausalLm,
    teacher_tok: &Tokenizer,
    student_tok: &Tokenizer,
    prompts: &Prompts,
    examples: &[Example],
    file: &mut TraceFile,
    cfg: &CollectConfig,
    mut on_rows: impl FnMut(usize),
) -> Result<()> {
    if cfg.traces == 0 {
        bail!("traces per row must be at least 1");
    }
    let end_tag = teacher_tok.encode(END_OF_EXPLANATION)?;
    loop {
        let rows: Vec<usize> = (0..cfg.batch_size.max(1))
            .map(|k| file.next_row(k))
            .take_while(|&i| i < examples.len())
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let out = collect_batch(
            teacher,
            teacher_tok,
            student_tok,
            prompts,
            examples,
            &rows,
            cfg,
            &end_tag,
        )?;
        file.append(&out)?;
        on_rows(out.len());
    }
}

struct Pending {
    prompt: Vec<i64>,
    budget: usize,
    /// The first sample that closed and fits.
    kept: Option<Vec<i64>>,
    /// The first sample, cut to the budget: the row's trace when none is kept.
    first: Option<Vec<i64>>,
}

#[allow(clippy::too_many_arguments)]
fn collect_batch(
    teacher: &CausalLm,
    teacher_tok: &Tokenizer,
    student_tok: &Tokenizer,
    prompts: &Prompts,
    examples: &[Example],
    rows: &[usize],
    cfg: &CollectConfig,
    end_tag: &[i64],
) -> Result<Vec<TraceRow>> {
    let mut pending = Vec::with_capacity(rows.len());
    for &i in rows {
        let e = &examples[i];
        let budget = trace_budget(student_tok, prompts, e, cfg.max_tokens_per_trace)
            .map_err(|err| anyhow::anyhow!("dataset row {i}: {err}"))?;
        let prompt = teacher_tok.encode(&data::teacher_rl_prompt(prompts, e))?;
        pending.push(Pending {
            prompt,
            budget,
            kept: None,
            first: None,
        });
    }
    let mut stop_tokens = teacher_tok.eos_ids().to_vec();
    if let [single] = end_tag {
        stop_tokens.push(*single);
    }
    for round in 0..cfg.traces {
        // Only the rows still without an example are sampled (again).
        let open: Vec<usize> = (0..pending.len())
            .filter(|&k| pending[k].kept.is_none())
            .collect();
        if open.is_empty() {
            break;
        }
        let contexts: Vec<Vec<i64>> = open.iter().map(|&k| pending[k].prompt.clone()).collect();
        let sampling = SamplingConfig {
            max_new_tokens: open.iter().map(|&k| pending[k].budget).max().unwrap_or(1),
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            stop_tokens: stop_tokens.clone(),
            seed: cfg.seed ^ ((rows[0] as u64) << 8) ^ round as u64,
        };
        let generation =
            tch::no_grad(|| generate(&teacher.model, &contexts, teacher_tok.pad_id(), &sampling))?;
        for (&k, (mut tokens, stopped)) in open
            .iter()
            .zip(generation.token_lists().into_iter().zip(generation.stopped))
        {
            let p = &mut pending[k];
            // The budget is the student's: what it trains on is the decoded text in its own
            // tokens, which can be more than the teacher's (another tokenizer, or bytes that
            // are not valid UTF-8 on their own). Rows of the batch share one generation limit;
            // each keeps only what fits its own budget.
            let fits = |t: &[i64]| -> Result<bool> {
                Ok(t.len() <= p.budget
                    && student_tok.encode(&teacher_tok.decode(t)?)?.len() <= p.budget)
            };
            if stopped && fits(&tokens)? {
                p.kept = Some(tokens);
                continue;
            }
            if p.first.is_none() {
                tokens.truncate(p.budget);
                while !tokens.is_empty() && !fits(&tokens)? {
                    let n = student_tok.encode(&teacher_tok.decode(&tokens)?)?.len();
                    let keep = tokens.len().saturating_sub((n - p.budget).max(1));
                    tokens.truncate(keep);
                }
                p.first = Some(tokens);
            }
        }
    }
    rows.iter()
        .zip(pending)
        .map(|(&i, p)| {
            let e = &examples[i];
            let complete = p.kept.is_some();
            let trace = p.kept.or(p.first).unwrap_or_default();
            Ok(TraceRow {
                index: i,
                question: e.question.clone(),
                solution: e.solution.clone(),
                traces: vec![teacher_tok.decode(&trace)?],
                tokens: vec![trace.len()],
                complete,
            })
        })
        .collect()
}

/// The thought a trace gives the student: the explanation the teacher wrote
/// ([`data::explanation_of`]; the tag, its padding and the end of turn are format).
pub fn thought_of_trace(trace: &str) -> &str {
    data::explanation_of(trace).0
}

/// The student's fine-tuning pairs: one per kept trace (question -> trace + solution, in the
/// student's format).
pub fn student_pairs(
    prompts: &Prompts,
    rows: &[TraceRow],
    examples: &[Example],
) -> Vec<data::PromptCompletion> {
    rows.iter()
        .flat_map(|row| {
            let e = &examples[row.index];
            row.traces
                .iter()
                .map(move |t| data::student_chat(prompts, e, thought_of_trace(t)))
        })
        .collect()
}
