//! One learner's work for one RL step on its groups: sample G explanations per (question,
//! solution) from the teacher, build the student chats, score them with the frozen student,
//! compute RLT rewards and GRPO advantages, and accumulate the policy gradient.
//!
//! Everything is in token space: the teacher prompt, the student chat around the explanation,
//! and the solution are tokenized once as separate pieces, and the explanation's sampled ids
//! are spliced between them. The explanation is therefore the very same ids in the teacher's
//! and the student's chats, and its spans (and the solution's) are known exactly, with no
//! re-tokenisation to align (this needs one shared tokenizer; checked at start-up).
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::completion::parse_completion;
use super::grpo::{
    group_advantages, grpo_sequence_loss, grpo_token_loss, token_weights, GrpoConfig,
};
use super::reward::{rlt_reward, RewardBreakdown, RewardConfig, RewardInputs, Span};
use crate::data::{student_segments, teacher_rl_prompt, Example, Prompts};
use crate::engine::logprobs::{sequence_logprobs, sequence_logprobs_in_batches, token_logprobs};
use crate::engine::sampling::{generate_in_batches, left_pad, SamplingConfig};
use crate::model::checkpoint::CausalLm;
use crate::model::qwen2::{Qwen2, LOGIT_CHUNK};
use crate::model::tokenizer::Tokenizer;

/// One (question, solution): the teacher's prompt, and the student's chat around the place
/// where the explanation goes.
#[derive(Debug, Clone)]
pub struct GroupPrompt {
    /// The teacher's prompt, ending right after the opening explanation tag.
    pub teacher_prompt: Vec<i64>,
    /// The student chat up to where the thought begins (system; question; thought opening).
    pub student_prefix: Vec<i64>,
    /// The student chat after the thought (thought closing, solution, end of turn) as text:
    /// it is tokenized together with the explanation, as one string, the way the student saw
    /// such chats in training (a byte-level BPE glues an explanation's last `.` to the
    /// `\n\n` after it).
    pub student_tail: String,
    /// Where the solution text is in `student_tail` (bytes).
    pub solution: Range<usize>,
}

/// A student chat around one explanation: its ids, and which of them are the explanation's
/// and the solution's (token positions in `ids`).
#[derive(Debug, Clone, PartialEq)]
pub struct StudentRow {
    pub ids: Vec<i64>,
    /// Every token that holds a character of the explanation.
    pub explanation: Range<usize>,
    /// Every token that holds a character of the solution.
    pub solution: Range<usize>,
}

impl GroupPrompt {
    /// The pieces of `e` in the run's chat formats, with the shared tokenizer.
    pub fn new(tok: &Tokenizer, prompts: &Prompts, e: &Example) -> Result<Self> {
        let [prefix, _, middle, solution, suffix] = student_segments(prompts, e, "");
        Ok(GroupPrompt {
            teacher_prompt: tok.encode(&teacher_rl_prompt(prompts, e))?,
            student_prefix: tok.encode(&prefix)?,
            solution: middle.len()..middle.len() + solution.len(),
            student_tail: format!("{middle}{solution}{suffix}"),
        })
    }

    /// The student's chat with `explanation` as its thought.
    pub fn student_row(&self, tok: &Tokenizer, explanation: &str) -> Result<StudentRow> {
        let text = format!("{explanation}{}", self.student_tail);
        let (tail, offsets) = tok.encode_with_offsets(&text)?;
        let at = self.student_prefix.len();
        let expl_end = explanation.len();
        let sol = expl_end + self.solution.start..expl_end + self.solution.end;
        let explanation = at..at + offsets.iter().take_while(|o| o.0 < expl_end).count();
        let first = offsets.iter().position(|o| o.1 > sol.start);
        let last = offsets.iter().rposition(|o| o.0 < sol.end);
        let solution = match (first, last) {
            (Some(f), Some(l)) if f <= l => at + f..at + l + 1,
            _ => bail!("the solution has no tokens in the student's chat"),
        };
        let mut ids = self.student_prefix.clone();
        ids.extend(tail);
        Ok(StudentRow {
            ids,
            explanation,
            solution,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RolloutConfig {
    /// G: explanations sampled per (question, solution).
    pub group_size: usize,
    pub max_new_tokens: usize,
    /// Teacher sampling temperature (also the temperature of its KL-term log-probs).
    pub temperature: f64,
    pub top_p: f64,
    pub reward: RewardConfig,
    pub grpo: GrpoConfig,
    pub seed: u64,
    /// Rows per backward pass of the policy gradient (0: the whole group at once). Fewer rows
    /// bound the activations a learner holds; the gradient is the same.
    pub micro_batch: usize,
    /// Rows per sampling pass (0: the whole group): bounds the KV cache; the samples are the
    /// same.
    pub generation_batch: usize,
    /// Recompute each decoder layer in the policy's backward pass ([`Qwen2::backward_checkpointed`]).
    pub activation_checkpointing: bool,
}

impl RolloutConfig {
    /// Whether a group's policy gradient is one pass over all its rows, with the graph built
    /// while scoring (no second forward pass).
    fn whole_group_pass(&self) -> bool {
        !self.activation_checkpointing
            && (self.micro_batch == 0 || self.micro_batch >= self.group_size)
    }
}

/// Token ids the rollout needs from the tokenizer.
#[derive(Debug, Clone)]
pub struct SpecialIds {
    pub pad: i64,
    /// Generation stops at these (end of turn / text).
    pub stop: Vec<i64>,
}

impl SpecialIds {
    pub fn of(tok: &Tokenizer) -> Result<Self> {
        let stop = tok.eos_ids().to_vec();
        if stop.is_empty() {
            bail!("the tokenizer has no end-of-turn token (<|im_end|> or <|endoftext|>) to stop generation at");
        }
        Ok(SpecialIds {
            pad: tok.pad_id(),
            stop,
        })
    }
}

/// Seconds spent per phase, summed over a learner's groups.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    pub generation: f64,
    pub scoring: f64,
    pub backward: f64,
}

/// What one learner contributes to a step.
#[derive(Debug, Default)]
pub struct StepContribution {
    pub groups: usize,
    pub samples: usize,
    pub reward_sum: f64,
    pub solution_sum: f64,
    pub kl_sum: f64,
    pub loss_sum: f64,
    pub generated_tokens: usize,
    pub well_formed: usize,
    pub times: PhaseTimes,
}

/// The seed of one group's sampling: a function of (run seed, step, the group's index in the
/// whole step), so the samples do not depend on how groups are split across learners.
pub fn group_seed(seed: u64, step: u64, group: usize) -> u64 {
    let mut x = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (group as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 31)
}

/// The groups (indices into the step's list) a learner works on: a contiguous, balanced slice.
pub fn learner_slice(groups: usize, learner: usize, learners: usize) -> std::ops::Range<usize> {
    let base = groups / learners;
    let extra = groups % learners;
    let start = learner * base + learner.min(extra);
    start..start + base + usize::from(learner < extra)
}

/// A step's gradient of the teacher, summed in f32 over its backward passes. A bf16 model's
/// `.grad` is bf16, and a group's gradient is a small difference of large terms (its
/// advantages sum to zero) that bf16 sums lose; so after each backward pass [`GradSum::fold`]
/// adds the variables' gradients into f32 sums on their device and zeroes them. An f32
/// model's own `.grad` already sums in f32 and is used as it is.
pub struct GradSum {
    /// (name, variable, its f32 sum); empty for an f32 model.
    sums: Vec<(String, Tensor, Tensor)>,
}

impl GradSum {
    pub fn new(teacher: &CausalLm) -> Self {
        let sums = if teacher.kind() == Kind::Float {
            vec![]
        } else {
            teacher
                .vs
                .variables()
                .into_iter()
                .map(|(name, v)| {
                    let sum = Tensor::zeros(v.size(), (Kind::Float, v.device()));
                    (name, v, sum)
                })
                .collect()
        };
        GradSum { sums }
    }

    /// After a backward pass: adds the variables' gradients to the sums and zeroes them.
    pub fn fold(&self) {
        let _guard = tch::no_grad_guard();
        for (_, v, sum) in &self.sums {
            let mut g = v.grad();
            if g.defined() {
                let mut sum = sum.shallow_clone();
                sum += g.to_kind(Kind::Float);
                let _ = g.zero_();
            }
        }
    }

    /// The summed gradients by variable name, f32 on the CPU (as [`take_gradients`]).
    pub fn take(self, teacher: &CausalLm) -> BTreeMap<String, Tensor> {
        if self.sums.is_empty() {
            return take_gradients(teacher);
        }
        self.fold();
        self.sums
            .into_iter()
            .map(|(name, _, sum)| (name, sum.to_device(tch::Device::Cpu)))
            .collect()
    }
}

/// Runs one group and accumulates its gradient (of the group's mean sequence loss) into
/// `grads`. `global_group` is the group's index in the whole step (for its seed).
#[allow(clippy::too_many_arguments)]
pub fn run_group(
    teacher: &CausalLm,
    reference: &CausalLm,
    student: &CausalLm,
    tok: &Tokenizer,
    prompt: &GroupPrompt,
    ids: &SpecialIds,
    cfg: &RolloutConfig,
    step: u64,
    global_group: usize,
    grads: &GradSum,
    out: &mut StepContribution,
) -> Result<()> {
    let scored = sample_and_score(
        teacher,
        reference,
        student,
        tok,
        prompt,
        ids,
        cfg,
        group_seed(cfg.seed, step, global_group),
        out,
    )?;
    // 3. Policy gradient on the generated tokens (explanation, closing tag, end of turn).
    let t2 = Instant::now();
    let loss = policy_gradient(&teacher.model, &scored, cfg, grads);
    out.times.backward += t2.elapsed().as_secs_f64();
    out.loss_sum += loss;
    Ok(())
}

/// A group sampled and scored, ready for its policy gradient.
pub struct ScoredGroup {
    /// The teacher's sequences `[G, T]` (prompt and completion) and their attention mask.
    pub ids: Tensor,
    pub mask: Tensor,
    /// Which positions are generated tokens.
    pub generated: Tensor,
    /// The reference's log-probs of the sequences (column p scores token p).
    pub ref_lp: Tensor,
    pub advantages: Tensor,
    /// The teacher's log-probs with their graph, when the whole group is one backward pass
    /// (the scoring pass doubles as the policy's forward pass).
    pub policy_lp: Option<Tensor>,
}

/// Samples a group's explanations, scores them (the RLT reward), and computes the advantages
/// and the reference's log-probs. Adds the group's figures to `out`.
#[allow(clippy::too_many_arguments)]
pub fn sample_and_score(
    teacher: &CausalLm,
    reference: &CausalLm,
    student: &CausalLm,
    tok: &Tokenizer,
    prompt: &GroupPrompt,
    ids: &SpecialIds,
    cfg: &RolloutConfig,
    seed: u64,
    out: &mut StepContribution,
) -> Result<ScoredGroup> {
    let g = cfg.group_size;
    if g == 0 {
        bail!("group size must be at least 1");
    }

    // 1. Generation: G explanations from the teacher prompt.
    let t0 = Instant::now();
    let prompts = vec![prompt.teacher_prompt.clone(); g];
    let sampling = SamplingConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        stop_tokens: ids.stop.clone(),
        seed,
    };
    let gen = tch::no_grad(|| {
        generate_in_batches(
            &teacher.model,
            &prompts,
            ids.pad,
            &sampling,
            cfg.generation_batch,
        )
    })?;
    let completions = gen.token_lists();
    out.times.generation += t0.elapsed().as_secs_f64();

    // 2. Scoring: the teacher's log-probs of its own sequences at its sampling temperature
    // (the reward's KL term), then the reward. When the whole group is one backward pass,
    // this forward pass is that pass's too (its graph is kept); otherwise it runs without a
    // graph and the gradient comes from micro-batches after the reward, since a whole group's
    // graph at 16k tokens does not fit a GPU.
    let t1 = Instant::now();
    let (t_ids, t_mask) = gen.full_sequences();
    let p_len = gen.prompt_ids.size()[1] as usize;
    let policy_lp = cfg.whole_group_pass().then(|| {
        with_first_column(sequence_logprobs(
            &teacher.model,
            &t_ids,
            Some(&t_mask),
            cfg.temperature,
        ))
    });
    let teacher_lp = match &policy_lp {
        Some(lp) => lp.detach(),
        None => with_first_column(sequence_logprobs_in_batches(
            &teacher.model,
            &t_ids,
            Some(&t_mask),
            cfg.temperature,
            cfg.micro_batch,
        )),
    };
    let (breakdown, well_formed) = score_completions(
        student,
        tok,
        &teacher_lp,
        p_len,
        prompt,
        &completions,
        ids,
        &cfg.reward,
        cfg.micro_batch,
    )?;
    let advantages = group_advantages(&breakdown.reward, g as i64);
    out.times.scoring += t1.elapsed().as_secs_f64();

    // The reference's log-probs, on its own device (a learner with two GPUs keeps the
    // reference and the student on the second).
    let t2 = Instant::now();
    let on_ref = |x: &Tensor| x.to_device(reference.device());
    let ref_lp = with_first_column(sequence_logprobs_in_batches(
        &reference.model,
        &on_ref(&t_ids),
        Some(&on_ref(&t_mask)),
        cfg.temperature,
        cfg.micro_batch,
    ))
    .to_device(teacher.device());
    let generated = Tensor::cat(&[gen.prompt_mask.zeros_like(), gen.mask.shallow_clone()], 1);
    out.times.backward += t2.elapsed().as_secs_f64();

    out.groups += 1;
    out.samples += g;
    out.reward_sum += breakdown.reward.sum(Kind::Double).double_value(&[]);
    out.solution_sum += breakdown.solution.sum(Kind::Double).double_value(&[]);
    out.kl_sum += breakdown.kl.sum(Kind::Double).double_value(&[]);
    out.generated_tokens += completions.iter().map(Vec::len).sum::<usize>();
    out.well_formed += well_formed.iter().filter(|&&w| w).count();
    Ok(ScoredGroup {
        ids: t_ids,
        mask: t_mask,
        generated,
        ref_lp,
        advantages: advantages.to_device(teacher.device()),
        policy_lp,
    })
}

/// Accumulates the gradient of a scored group's GRPO loss (the mean over its rows of each
/// row's mean token loss) into `grads`; returns the loss. One update per batch, as the
/// method makes: the ratio is taken against the policy pass's own detached log-probs
/// (`exp(lp - lp.detach())`, exactly 1 with the gradient of `lp`), never against log-probs
/// of another pass, whose other shapes and kernels make bf16 ratios drift from 1 and the
/// clip zero some tokens' gradients.
pub fn policy_gradient(
    teacher: &Qwen2,
    group: &ScoredGroup,
    cfg: &RolloutConfig,
    grads: &GradSum,
) -> f64 {
    let rows = group.ids.size()[0];
    let loss = match &group.policy_lp {
        Some(lp) => {
            let loss = grpo_sequence_loss(
                lp,
                &lp.detach(),
                &group.ref_lp,
                &group.generated,
                &group.advantages,
                &cfg.grpo,
            )
            .mean(Kind::Float);
            loss.backward();
            loss.double_value(&[])
        }
        None => policy_backward(
            teacher,
            &PolicyBatch {
                ids: &group.ids,
                mask: &group.mask,
                ref_lp: &group.ref_lp,
                // Per-row means, averaged over the group.
                weights: &(token_weights(&group.generated) / rows as f64),
                advantages: &group.advantages,
            },
            cfg,
            grads,
        ),
    };
    grads.fold();
    loss
}

/// A scored group, as the policy gradient needs it: sequences `[G, T]` with their attention
/// mask, and per position (column p scores token p) the reference's log-probs and the loss
/// weight of the token (0 off the generated tokens).
pub struct PolicyBatch<'a> {
    pub ids: &'a Tensor,
    pub mask: &'a Tensor,
    pub ref_lp: &'a Tensor,
    pub weights: &'a Tensor,
    pub advantages: &'a Tensor,
}

/// Accumulates the gradient of the group's GRPO loss (the weighted sum of its per-token
/// terms) into `grads`, `cfg.micro_batch` rows at a time, with activation checkpointing if
/// the config says so. Returns the loss.
pub fn policy_backward(
    teacher: &Qwen2,
    batch: &PolicyBatch,
    cfg: &RolloutConfig,
    grads: &GradSum,
) -> f64 {
    let (rows, t) = batch.ids.size2().expect("ids must be [rows, seq]");
    let per = match cfg.micro_batch {
        0 => rows,
        n => (n as i64).min(rows),
    };
    let mut total = 0.0;
    for first in (0..rows).step_by(per as usize) {
        let n = per.min(rows - first);
        let pick = |x: &Tensor| x.narrow(0, first, n);
        let (ids, adv) = (pick(batch.ids), pick(batch.advantages));
        let (reference, weights) = (pick(batch.ref_lp), pick(batch.weights));
        // Hidden states of positions `from..` predict the tokens after them.
        let loss_of = |h: &Tensor, from: i64| {
            let len = h.size()[1].min(t - 1 - from);
            if len <= 0 {
                return Tensor::from(0.0);
            }
            let logits = teacher.lm_logits(&h.narrow(1, 0, len));
            let lp = token_logprobs(&logits, &ids.narrow(1, from + 1, len), cfg.temperature);
            let cols = |x: &Tensor| x.narrow(1, from + 1, len);
            (grpo_token_loss(&lp, &lp.detach(), &cols(&reference), &adv, &cfg.grpo)
                * cols(&weights))
            .sum(Kind::Float)
        };
        let mask = pick(batch.mask);
        total += if cfg.activation_checkpointing {
            teacher.backward_checkpointed(&ids, Some(&mask), (LOGIT_CHUNK / n).max(1), loss_of)
        } else {
            let loss = loss_of(&teacher.forward_hidden(&ids, Some(&mask), None), 0);
            loss.backward();
            loss.double_value(&[])
        };
        grads.fold();
    }
    total
}

/// The RLT reward of a group's completions. `teacher_lp` `[G, P + N]` holds the teacher's
/// log-probs of its sequences (prompt of length `prompt_len`, then the completion; column p
/// scores token p). Builds each student chat around the explanation's text
/// ([`GroupPrompt::student_row`]), scores it with the student (left-padded batch), and
/// returns the reward parts and which completions parsed. The KL term covers the leading
/// explanation tokens that are the very ids the teacher sampled (where the student's
/// tokenization of the text agrees with the teacher's sampling).
#[allow(clippy::too_many_arguments)]
pub fn score_completions(
    student: &CausalLm,
    tok: &Tokenizer,
    teacher_lp: &Tensor,
    prompt_len: usize,
    prompt: &GroupPrompt,
    completions: &[Vec<i64>],
    ids: &SpecialIds,
    cfg: &RewardConfig,
    rows_per_pass: usize,
) -> Result<(RewardBreakdown, Vec<bool>)> {
    let mut rows = Vec::with_capacity(completions.len());
    let mut shared = Vec::with_capacity(completions.len());
    let mut well_formed = Vec::with_capacity(completions.len());
    for c in completions {
        let p = parse_completion(c, tok, &ids.stop)?;
        let row = prompt.student_row(tok, &p.text)?;
        let mine = &row.ids[row.explanation.clone()];
        shared.push(mine.iter().zip(c).take_while(|(a, b)| a == b).count());
        well_formed.push(p.well_formed);
        rows.push(row);
    }
    let id_rows: Vec<Vec<i64>> = rows.iter().map(|r| r.ids.clone()).collect();
    let (s_ids, s_mask) = left_pad(&id_rows, ids.pad, student.device());
    let s_len = s_ids.size()[1] as usize;
    let (mut s_expl, mut s_sol) = (Vec::new(), Vec::new());
    for (row, &shared) in rows.iter().zip(&shared) {
        let pad = s_len - row.ids.len();
        s_expl.push(Span {
            start: pad + row.explanation.start,
            len: shared,
        });
        s_sol.push(Span {
            start: pad + row.solution.start,
            len: row.solution.len(),
        });
    }
    let student_lp = with_first_column(sequence_logprobs_in_batches(
        &student.model,
        &s_ids,
        Some(&s_mask),
        cfg.student_temperature,
        rows_per_pass,
    ));
    let t_expl: Vec<Span> = shared
        .iter()
        .map(|&len| Span {
            start: prompt_len,
            len,
        })
        .collect();
    let breakdown = rlt_reward(
        &RewardInputs {
            student_log_probs: &student_lp,
            student_explanation: &s_expl,
            student_solution: &s_sol,
            teacher_log_probs: &teacher_lp.to_device(student.device()),
            teacher_explanation: &t_expl,
            well_formed: &well_formed,
        },
        cfg,
    );
    Ok((breakdown, well_formed))
}

/// `[B, T-1]` log-probs (entry t scores token t+1) -> `[B, T]` with column p scoring token p.
pub fn with_first_column(lp: Tensor) -> Tensor {
    let b = lp.size()[0];
    Tensor::cat(&[Tensor::zeros([b, 1], (Kind::Float, lp.device())), lp], 1)
}

/// The teacher's gradients (as accumulated by [`run_group`]), by variable name, in f32 on the
/// CPU; zero for variables that got none.
pub fn take_gradients(teacher: &CausalLm) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (name, v) in teacher.vs.variables() {
        let g = v.grad();
        let g = if g.defined() {
            let f32_cpu = g.to_kind(Kind::Float).to_device(tch::Device::Cpu);
            // The variable's gradient is zeroed in place next: keep a copy, made once.
            if f32_cpu.data_ptr() == g.data_ptr() {
                f32_cpu.copy()
            } else {
                f32_cpu
            }
        } else {
            Tensor::zeros(v.size(), (Kind::Float, tch::Device::Cpu))
        };
        out.insert(name, g);
    }
    out
}

/// Clears the teacher's accumulated gradients.
pub fn zero_gradients(teacher: &CausalLm) {
    for (_, v) in teacher.vs.variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// Copies weights (by name) into a model's variables, converting dtype/device; every variable
/// must be present with its shape.
pub fn load_weights_into(lm: &CausalLm, weights: &BTreeMap<String, Tensor>) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let vars = lm.vs.variables();
    for (name, mut v) in vars {
        let Some(w) = weights.get(&name) else {
            bail!("the parameter servers hold no tensor for the model's {name:?}")
        };
        if w.size() != v.size() {
            bail!(
                "parameter {name:?} has shape {:?} on the parameter servers, the model needs {:?}",
                w.size(),
                v.size()
            );
        }
        v.copy_(&w.to_kind(v.kind()).to_device(v.device()));
    }
    Ok(())
}
