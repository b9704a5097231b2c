//! The teacher writes an explanation for every (question, solution) of the dataset.
//!
//! The teacher gets the RL prompt (question and solution, cut after the opening explanation
//! tag) and samples the explanation. What it writes is stored raw: no filtering, no cleanup.
//!
//! Multi-trace collection. A student's training example is the student chat (question,
//! explanation as the thought, solution), which must fit the student's context
//! (`max_tokens_per_trace`). Rather than truncating a long explanation, the teacher writes it
//! as up to `traces` consecutive traces: each trace gets the token budget that keeps its
//! student chat inside the context, and the next trace continues the teacher's own context
//! (prompt + the traces so far), so the explanation stays one coherent text while every
//! piece fits the student. Collection of a row stops when the teacher closes its explanation
//! (or ends its turn); a row whose explanation is still open after `traces` traces is kept
//! and marked incomplete.
use super::traces::{TraceFile, TraceRow};
use crate::checkpoint::CausalLm;
use crate::data::{self, Example, Prompts};
use crate::sampling::{generate, SamplingConfig};
use crate::tokenizer::{Tokenizer, END_OF_EXPLANATION};
use anyhow::{bail, Result};

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

/// Collects traces for rows `file.rows()..examples.len()`, appending each batch to `file`.
/// `on_rows` is told how many rows each batch finished (for a progress bar).
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
    while file.rows() < examples.len() {
        let first = file.rows();
        let last = (first + cfg.batch_size.max(1)).min(examples.len());
        let rows = collect_batch(
            teacher,
            teacher_tok,
            student_tok,
            prompts,
            examples,
            first..last,
            cfg,
            &end_tag,
        )?;
        file.append(&rows)?;
        on_rows(rows.len());
    }
    Ok(())
}

struct Pending {
    prompt: Vec<i64>,
    budget: usize,
    traces: Vec<Vec<i64>>,
    open: bool,
}

#[allow(clippy::too_many_arguments)]
fn collect_batch(
    teacher: &CausalLm,
    teacher_tok: &Tokenizer,
    student_tok: &Tokenizer,
    prompts: &Prompts,
    examples: &[Example],
    range: std::ops::Range<usize>,
    cfg: &CollectConfig,
    end_tag: &[i64],
) -> Result<Vec<TraceRow>> {
    let mut pending = Vec::with_capacity(range.len());
    for i in range.clone() {
        let e = &examples[i];
        let budget = trace_budget(student_tok, prompts, e, cfg.max_tokens_per_trace)
            .map_err(|err| anyhow::anyhow!("dataset row {i}: {err}"))?;
        let prompt = teacher_tok.encode(&data::teacher_rl_prompt(prompts, e))?;
        pending.push(Pending {
            prompt,
            budget,
            traces: Vec::new(),
            open: true,
        });
    }
    let mut stop_tokens = teacher_tok.eos_ids().to_vec();
    if let [single] = end_tag {
        stop_tokens.push(*single);
    }
    for round in 0..cfg.traces {
        let open: Vec<usize> = (0..pending.len()).filter(|&r| pending[r].open).collect();
        if open.is_empty() {
            break;
        }
        // The teacher continues its own context: prompt + every trace so far.
        let contexts: Vec<Vec<i64>> = open
            .iter()
            .map(|&r| {
                let p = &pending[r];
                p.prompt
                    .iter()
                    .chain(p.traces.iter().flatten())
                    .copied()
                    .collect()
            })
            .collect();
        let sampling = SamplingConfig {
            max_new_tokens: open.iter().map(|&r| pending[r].budget).max().unwrap_or(1),
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            stop_tokens: stop_tokens.clone(),
            seed: cfg.seed ^ ((range.start as u64) << 8) ^ round as u64,
        };
        let generation =
            tch::no_grad(|| generate(&teacher.model, &contexts, teacher_tok.pad_id(), &sampling))?;
        for (&r, (mut tokens, stopped)) in open
            .iter()
            .zip(generation.token_lists().into_iter().zip(generation.stopped))
        {
            let p = &mut pending[r];
            // Rows of the batch share one generation limit; each keeps only its own budget.
            let mut over_budget = tokens.len() > p.budget;
            tokens.truncate(p.budget);
            // The budget is the student's: what it trains on is the decoded text in its own
            // tokens, which can be more than the teacher's (another tokenizer, or bytes that
            // are not valid UTF-8 on their own). Cut until the text fits; the next trace
            // continues from the cut.
            loop {
                let n = student_tok.encode(&teacher_tok.decode(&tokens)?)?.len();
                if n <= p.budget {
                    break;
                }
                over_budget = true;
                let keep = tokens.len().saturating_sub((n - p.budget).max(1));
                tokens.truncate(keep);
            }
            let closed = (stopped && !over_budget) || contains(&tokens, end_tag);
            p.traces.push(tokens);
            p.open = !closed;
        }
    }
    range
        .zip(pending)
        .map(|(i, p)| {
            let e = &examples[i];
            Ok(TraceRow {
                index: i,
                question: e.question.clone(),
                solution: e.solution.clone(),
                traces: p
                    .traces
                    .iter()
                    .map(|t| teacher_tok.decode(t))
                    .collect::<Result<_>>()?,
                tokens: p.traces.iter().map(Vec::len).collect(),
                complete: !p.open,
            })
        })
        .collect()
}

fn contains(haystack: &[i64], needle: &[i64]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The thought a trace gives the student: the raw trace up to the closing explanation tag (the
/// tag and the teacher's end-of-turn are format, not explanation).
pub fn thought_of_trace(trace: &str) -> &str {
    let text = data::parse_explanation(trace).unwrap_or(trace);
    let mut text = text.trim_end();
    for tail in [crate::tokenizer::IM_END, crate::tokenizer::ENDOFTEXT] {
        text = text.strip_suffix(tail).unwrap_or(text).trim_end();
    }
    text
}

/// The student's fine-tuning pairs: one per trace (question -> trace + solution, in the
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
