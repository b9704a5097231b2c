//! `rlt-trainer score`: the RLT reward of explanations, term by term, for someone debugging a
//! reward. The explanations come from a file or are sampled from the teacher; either way they
//! go through the RL stage's own code: the teacher's prompt ([`GroupPrompt`]), its log-probs at
//! its sampling temperature, [`score_completions`] (closing tag, student chat, reward).
//!
//! Output: one JSON line per (row, explanation) with the solution term's reductions (the
//! student's log-probs of the solution: mean, min), the KL term's (mean, max), the format
//! penalty and the reward.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::reward::{RewardBreakdown, RewardConfig};
use super::rollout::{
    group_seed, score_completions, with_first_column, GroupPrompt, RolloutConfig, SpecialIds,
};
use crate::data::{self, Example, Prompts, PAD};
use crate::engine::logprobs::sequence_logprobs;
use crate::engine::sampling::{generate, right_pad, SamplingConfig};
use crate::model::checkpoint::{load_checkpoint, CausalLm};
use crate::model::tokenizer::{Tokenizer, END_OF_EXPLANATION, IM_END};
use crate::stage::cli::{DeviceArgs, PromptArgs};

use super::cli::RolloutArgs;

/// The teacher, the frozen student and the reward, as a learner holds them.
pub struct Scorer {
    pub teacher: CausalLm,
    pub student: CausalLm,
    pub tok: Tokenizer,
    pub ids: SpecialIds,
    pub reward: RewardConfig,
}

impl Scorer {
    pub fn load(
        teacher: &Path,
        student: &Path,
        reward: RewardConfig,
        device: Device,
    ) -> Result<Self> {
        let (teacher, tok) = load_checkpoint(teacher, device, Kind::Float)?;
        let (student, student_tok) = load_checkpoint(student, device, Kind::Float)?;
        if !tok.same_vocab(&student_tok) {
            bail!("the student's tokenizer differs from the teacher's; the RLT reward needs one tokenizer");
        }
        Ok(Scorer {
            ids: SpecialIds::of(&tok)?,
            teacher,
            student,
            tok,
            reward,
        })
    }

    /// `n` explanations of `prompt` sampled from the teacher, as a learner samples a group
    /// (the seed of group `row` of step 0).
    pub fn sample(
        &self,
        prompt: &GroupPrompt,
        n: usize,
        max_new_tokens: usize,
        seed: u64,
        row: usize,
    ) -> Result<Vec<Vec<i64>>> {
        let sampling = SamplingConfig {
            max_new_tokens,
            temperature: self.reward.teacher_temperature,
            top_p: 1.0,
            stop_tokens: self.ids.stop.clone(),
            seed: group_seed(seed, 0, row),
        };
        let gen = tch::no_grad(|| {
            generate(
                &self.teacher.model,
                &vec![prompt.teacher_prompt.clone(); n],
                self.ids.pad,
                &sampling,
            )
        })?;
        Ok(gen.token_lists())
    }

    /// A written explanation as the teacher's completion: the text, its closing tag and the
    /// end of turn, in the warm-up's layout (unless the text closes itself).
    pub fn completion_of(&self, explanation: &str) -> Result<Vec<i64>> {
        if explanation.contains(END_OF_EXPLANATION) {
            return self.tok.encode(explanation);
        }
        self.tok
            .encode(&format!("{explanation}{PAD}{END_OF_EXPLANATION}{IM_END}"))
    }

    /// The RLT reward of `completions` of `prompt`: the teacher's log-probs of its own tokens
    /// at its temperature (the KL term's), then the RL stage's scoring.
    pub fn score(
        &self,
        prompt: &GroupPrompt,
        completions: &[Vec<i64>],
    ) -> Result<(RewardBreakdown, Vec<bool>)> {
        let rows: Vec<Vec<i64>> = completions
            .iter()
            .map(|c| [&prompt.teacher_prompt[..], c].concat())
            .collect();
        let (t_ids, t_mask) = right_pad(&rows, self.ids.pad, self.teacher.device());
        let lp: Tensor = tch::no_grad(|| {
            with_first_column(sequence_logprobs(
                &self.teacher.model,
                &t_ids,
                Some(&t_mask),
                self.reward.teacher_temperature,
            ))
        });
        score_completions(
            &self.student,
            &self.tok,
            &lp,
            prompt.teacher_prompt.len(),
            prompt,
            completions,
            &self.ids,
            &self.reward,
            0,
        )
    }
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// The teacher checkpoint (its log-probs make the KL term; it samples when no
    /// `--explanations` are given).
    #[arg(long)]
    pub teacher: PathBuf,
    /// The frozen student that scores.
    #[arg(long)]
    pub student: PathBuf,
    /// Dataset rows (question, solution), any format the stages read.
    #[arg(long)]
    pub rows: PathBuf,
    /// JSONL of `{"row": <index into --rows>, "explanation": "<text>"}`; without it, the
    /// teacher samples `--group-size` explanations per row.
    #[arg(long)]
    pub explanations: Option<PathBuf>,
    /// Score only the first this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub prompts: PromptArgs,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// One line of `--explanations`.
#[derive(Debug, Deserialize)]
struct Given {
    row: usize,
    explanation: String,
}

/// One line of the output.
#[derive(Debug, Serialize)]
pub struct Scored {
    pub row: usize,
    pub explanation: usize,
    pub text: String,
    pub well_formed: bool,
    pub solution_mean: f64,
    pub solution_min: f64,
    pub solution_term: f64,
    pub kl_mean: f64,
    pub kl_max: f64,
    pub kl_term: f64,
    pub format_penalty: f64,
    pub reward: f64,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let (device, _) = a.device.resolve()?;
    let rl = rlt_api::spec::defaults::rl();
    let rollout = a.rollout.config(&rl, Default::default());
    let reward = rollout.reward.clone();
    let names = |r: &super::reward::WeightedReductions| {
        r.0.iter().map(|(r, _)| r.to_string()).collect::<Vec<_>>()
    };
    if names(&reward.solution) != ["mean", "min"] || names(&reward.kl) != ["mean", "max"] {
        bail!("score reports the spec's reductions: --solution-reductions mean:..,min:.. and --kl-reductions mean:..,max:..");
    }
    let scorer = Scorer::load(&a.teacher, &a.student, reward, device)?;
    let prompts = a.prompts.over(None);
    let mut rows = data::load_examples(&a.rows, false)?.examples;
    rows.truncate(a.limit.unwrap_or(rows.len()));
    let given = a.explanations.as_deref().map(read_given).transpose()?;
    for (i, e) in rows.iter().enumerate() {
        let texts: Vec<&str> = match &given {
            Some(g) => g
                .iter()
                .filter(|x| x.row == i)
                .map(|x| x.explanation.as_str())
                .collect(),
            None => Vec::new(),
        };
        if given.is_some() && texts.is_empty() {
            continue;
        }
        for line in score_row(&scorer, &prompts, e, i, &texts, &rollout)? {
            println!("{}", serde_json::to_string(&line)?);
        }
    }
    Ok(())
}

fn read_given(path: &Path) -> Result<Vec<Given>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}: line {}: expected {{\"row\": N, \"explanation\": \"...\"}}",
                    path.display(),
                    n + 1
                )
            })
        })
        .collect()
}

/// The scored explanations of one row: `given` ones, or sampled ones when none are given.
pub fn score_row(
    scorer: &Scorer,
    prompts: &Prompts,
    e: &Example,
    row: usize,
    given: &[&str],
    rollout: &RolloutConfig,
) -> Result<Vec<Scored>> {
    let prompt = GroupPrompt::new(&scorer.tok, prompts, e)?;
    let completions = if given.is_empty() {
        scorer.sample(
            &prompt,
            rollout.group_size,
            rollout.max_new_tokens,
            rollout.seed,
            row,
        )?
    } else {
        given
            .iter()
            .map(|t| scorer.completion_of(t))
            .collect::<Result<_>>()?
    };
    let (b, well_formed) = scorer.score(&prompt, &completions)?;
    let at = |t: &Tensor, k: usize| t.double_value(&[k as i64]);
    completions
        .iter()
        .enumerate()
        .map(|(k, c)| {
            Ok(Scored {
                row,
                explanation: k,
                text: scorer.tok.decode(c)?,
                well_formed: well_formed[k],
                solution_mean: at(&b.solution_reductions[0], k),
                solution_min: at(&b.solution_reductions[1], k),
                solution_term: at(&b.solution, k),
                kl_mean: at(&b.kl_reductions[0], k),
                kl_max: at(&b.kl_reductions[1], k),
                kl_term: at(&b.kl, k),
                format_penalty: at(&b.format, k),
                reward: at(&b.reward, k),
            })
        })
        .collect()
}
