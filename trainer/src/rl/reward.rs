//! The RLT reward (Cetin, Zhao, Tang 2025, "Reinforcement Learning Teachers of Test Time
//! Scaling"), as pure functions on per-token log-prob tensors and masks.
//!
//! For each teacher completion (an explanation `t` of a question `q` with solution `s`):
//! - solution term `r_SS`: the frozen student's log-probs of the solution tokens in the
//!   student chat (q; t as the thought; s), logits divided by `student_temperature`, reduced
//!   by each configured reduction and weighted (paper: mean x 1 + min x 0.01);
//! - KL term `r_KL`: per explanation token, `log p_teacher(t_k) - log p_student(t_k)` of the
//!   sampled token, the teacher in its own context (q and s) at its sampling temperature, the
//!   student in its context (q only), reduced and weighted (paper: mean x 3 + max x 0.03);
//! - reward = r_SS - r_KL, plus `format_penalty` (-1) when the completion does not parse into
//!   the expected tags (the reference implementation adds it and still scores the repaired
//!   completion, so a truncated explanation is penalised but keeps a learning signal).
//!
//! Tensors are `[B, T]` (batch x token position); masks are `[B, T]` booleans (or 0/1) that
//! mark which positions count, so padding never enters a reduction.
use anyhow::{bail, Result};
use rlt_api::spec::{defaults, RlStage};
use tch::{Kind, Tensor};

/// How a per-token quantity is reduced to one number per sequence (over the masked tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    Mean,
    Min,
    Max,
    Sum,
}

impl std::str::FromStr for Reduction {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "mean" => Reduction::Mean,
            "min" => Reduction::Min,
            "max" => Reduction::Max,
            "sum" => Reduction::Sum,
            other => bail!("unknown reduction {other:?} (expected mean, min, max or sum)"),
        })
    }
}

impl std::fmt::Display for Reduction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reduction::Mean => "mean",
            Reduction::Min => "min",
            Reduction::Max => "max",
            Reduction::Sum => "sum",
        })
    }
}

/// A weighted sum of reductions, e.g. `mean:1,min:0.01`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedReductions(pub Vec<(Reduction, f64)>);

/// The flag's spelling, which [`WeightedReductions::from_str`] reads back.
impl std::fmt::Display for WeightedReductions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let terms: Vec<String> = self.0.iter().map(|(r, w)| format!("{r}:{w}")).collect();
        f.write_str(&terms.join(","))
    }
}

impl std::str::FromStr for WeightedReductions {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((r, w)) = part.split_once(':') else {
                bail!("reduction term {part:?} must be `reduction:weight`, e.g. `mean:1`");
            };
            let w: f64 = w
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("weight of reduction term {part:?}: {e}"))?;
            terms.push((r.trim().parse()?, w));
        }
        if terms.is_empty() {
            bail!("empty list of reductions {s:?}");
        }
        Ok(WeightedReductions(terms))
    }
}

/// Reward configuration; [`RewardConfig::default`] is the paper's.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardConfig {
    /// Temperature dividing the student's logits when scoring (paper: 0.7).
    pub student_temperature: f64,
    /// Temperature dividing the teacher's logits in the KL term: its sampling temperature.
    pub teacher_temperature: f64,
    /// Reductions of the solution log-probs (paper: mean x 1, min x alpha = 0.01).
    pub solution: WeightedReductions,
    /// Reductions of the per-token KL (paper: mean x lambda = 3, max x 0.03).
    pub kl: WeightedReductions,
    /// Added to the reward of a completion without the closing explanation tag.
    pub format_penalty: f64,
}

impl RewardConfig {
    /// The reward `spec.rl` describes: the teacher's temperature is its sampling temperature.
    pub fn of_rl(rl: &RlStage) -> Self {
        let r = &rl.reward;
        RewardConfig {
            student_temperature: r.student_temperature,
            teacher_temperature: rl.temperature,
            solution: WeightedReductions(vec![
                (Reduction::Mean, r.solution_mean_weight),
                (Reduction::Min, r.solution_min_weight),
            ]),
            kl: WeightedReductions(vec![
                (Reduction::Mean, r.kl_mean_weight),
                (Reduction::Max, r.kl_max_weight),
            ]),
            format_penalty: r.format_penalty,
        }
    }
}

impl Default for RewardConfig {
    /// The spec's default reward (the paper's).
    fn default() -> Self {
        RewardConfig::of_rl(&defaults::rl())
    }
}

/// Per-token log-probs of `tokens` under `logits`, each position scored by the logits of the
/// position before it: `out[b, p] = log_softmax(logits[b, p-1] / temperature)[tokens[b, p]]`,
/// and `out[b, 0] = 0` (the first token has no prediction). Column p thus belongs to token p,
/// so spans of token positions index log-probs directly.
pub fn token_log_probs(logits: &Tensor, tokens: &Tensor, temperature: f64) -> Tensor {
    let (b, t, _) = logits.size3().expect("logits must be [B, T, V]");
    let pred = logits.narrow(1, 0, t - 1).to_kind(Kind::Float) / temperature;
    let lp = pred
        .log_softmax(-1, Kind::Float)
        .gather(2, &tokens.narrow(1, 1, t - 1).unsqueeze(-1), false)
        .squeeze_dim(-1);
    Tensor::cat(&[Tensor::zeros([b, 1], (Kind::Float, lp.device())), lp], 1)
}

/// Reduce `x` over the positions where `mask` is set, one value per row. Rows with an empty
/// mask reduce to 0 (nothing to reward or penalise) rather than NaN or infinity.
pub fn masked_reduce(x: &Tensor, mask: &Tensor, reduction: Reduction) -> Tensor {
    let mask = mask.to_kind(Kind::Bool);
    let x = x.to_kind(Kind::Float);
    let count = mask.sum_dim_intlist(1, false, Kind::Float);
    let empty = count.eq(0.0);
    let out = match reduction {
        Reduction::Sum => {
            x.masked_fill(&mask.logical_not(), 0.0)
                .sum_dim_intlist(1, false, Kind::Float)
        }
        Reduction::Mean => {
            x.masked_fill(&mask.logical_not(), 0.0)
                .sum_dim_intlist(1, false, Kind::Float)
                / count.clamp_min(1.0)
        }
        Reduction::Min => x
            .masked_fill(&mask.logical_not(), f64::INFINITY)
            .amin(1, false),
        Reduction::Max => x
            .masked_fill(&mask.logical_not(), f64::NEG_INFINITY)
            .amax(1, false),
    };
    out.masked_fill(&empty, 0.0)
}

/// The weighted sum of several reductions of `x`, one value per row, and each reduction
/// (unweighted, in the order of `terms`).
pub fn weighted_reduce(
    x: &Tensor,
    mask: &Tensor,
    terms: &WeightedReductions,
) -> (Tensor, Vec<Tensor>) {
    let mut total = Tensor::zeros([x.size()[0]], (Kind::Float, x.device()));
    let mut parts = Vec::with_capacity(terms.0.len());
    for &(r, w) in &terms.0 {
        let part = masked_reduce(x, mask, r);
        total += &part * w;
        parts.push(part);
    }
    (total, parts)
}

/// A run of token positions in one row: `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

impl Span {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// Gathers the positions of one span per row into a left-aligned `[B, L]` grid (L = longest
/// span) plus its mask, so the same explanation tokens at different positions in two chats
/// (teacher and student) line up column by column.
pub fn align_spans(x: &Tensor, spans: &[Span]) -> (Tensor, Tensor) {
    let (b, t) = x.size2().expect("[B, T]");
    assert_eq!(b as usize, spans.len(), "one span per row");
    let longest = spans.iter().map(|s| s.len).max().unwrap_or(0).max(1);
    let mut idx = Vec::with_capacity(spans.len() * longest);
    let mut mask = Vec::with_capacity(spans.len() * longest);
    for s in spans {
        assert!(s.end() as i64 <= t, "span {s:?} beyond sequence length {t}");
        for k in 0..longest {
            let inside = k < s.len;
            idx.push(if inside { (s.start + k) as i64 } else { 0 });
            mask.push(inside);
        }
    }
    let shape = [b, longest as i64];
    let idx = Tensor::from_slice(&idx).view(shape).to_device(x.device());
    let mask = Tensor::from_slice(&mask).view(shape).to_device(x.device());
    let gathered = x
        .gather(1, &idx, false)
        .masked_fill(&mask.logical_not(), 0.0);
    (gathered, mask)
}

/// Solution term r_SS per row: weighted reductions of the student's solution-token log-probs
/// (and each reduction).
pub fn solution_term(
    student_log_probs: &Tensor,
    solution_mask: &Tensor,
    cfg: &RewardConfig,
) -> (Tensor, Vec<Tensor>) {
    weighted_reduce(student_log_probs, solution_mask, &cfg.solution)
}

/// KL term r_KL per row from aligned `[B, L]` teacher and student log-probs of the same
/// explanation tokens: weighted reductions of `log p_teacher - log p_student` (and each
/// reduction).
pub fn kl_term(
    teacher_log_probs: &Tensor,
    student_log_probs: &Tensor,
    mask: &Tensor,
    cfg: &RewardConfig,
) -> (Tensor, Vec<Tensor>) {
    weighted_reduce(&(teacher_log_probs - student_log_probs), mask, &cfg.kl)
}

/// The reward of each row and its parts (all `[B]`, float, no grad).
#[derive(Debug)]
pub struct RewardBreakdown {
    pub reward: Tensor,
    pub solution: Tensor,
    pub kl: Tensor,
    pub format: Tensor,
    /// Each reduction of the solution log-probs, unweighted, in `RewardConfig::solution` order.
    pub solution_reductions: Vec<Tensor>,
    /// Each reduction of the per-token KL, unweighted, in `RewardConfig::kl` order.
    pub kl_reductions: Vec<Tensor>,
}

/// Inputs, all log-probs per token position (see [`token_log_probs`]):
/// - `student_log_probs` `[B, Ts]` over the student chats, at the student temperature;
/// - `student_explanation`, `student_solution`: the spans of the explanation and of the
///   solution tokens in each student chat;
/// - `teacher_log_probs` `[B, Tt]` over the teacher chats at the teacher temperature, and
///   `teacher_explanation` the explanation spans there (the same tokens, so same lengths);
/// - `well_formed`: whether each completion parsed into the expected tags.
pub struct RewardInputs<'a> {
    pub student_log_probs: &'a Tensor,
    pub student_explanation: &'a [Span],
    pub student_solution: &'a [Span],
    pub teacher_log_probs: &'a Tensor,
    pub teacher_explanation: &'a [Span],
    pub well_formed: &'a [bool],
}

pub fn rlt_reward(inp: &RewardInputs, cfg: &RewardConfig) -> RewardBreakdown {
    let _guard = tch::no_grad_guard();
    for (s, t) in inp.student_explanation.iter().zip(inp.teacher_explanation) {
        assert_eq!(
            s.len, t.len,
            "explanation spans must cover the same tokens in both chats"
        );
    }
    let (sol_lp, sol_mask) = align_spans(inp.student_log_probs, inp.student_solution);
    let (solution, solution_reductions) = solution_term(&sol_lp, &sol_mask, cfg);
    let (t_lp, mask) = align_spans(inp.teacher_log_probs, inp.teacher_explanation);
    let (s_lp, _) = align_spans(inp.student_log_probs, inp.student_explanation);
    let (kl, kl_reductions) = kl_term(&t_lp, &s_lp, &mask, cfg);
    let format: Vec<f32> = inp
        .well_formed
        .iter()
        .map(|&ok| if ok { 0.0 } else { cfg.format_penalty as f32 })
        .collect();
    let format = Tensor::from_slice(&format).to_device(solution.device());
    let reward = &solution - &kl + &format;
    RewardBreakdown {
        reward,
        solution,
        kl,
        format,
        solution_reductions,
        kl_reductions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(rows: &[&[f32]]) -> Tensor {
        let w = rows[0].len() as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, w])
    }
    fn m2(rows: &[&[bool]]) -> Tensor {
        let w = rows[0].len() as i64;
        let flat: Vec<bool> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, w])
    }
    fn v(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap()
    }
    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn reductions_ignore_padding_and_empty_rows_are_zero() {
        // Padding holds values that would win every reduction if it leaked in.
        let x = t2(&[
            &[-1.0, -3.0, 100.0],
            &[-2.0, -100.0, -4.0],
            &[5.0, 5.0, 5.0],
        ]);
        let m = m2(&[
            &[true, true, false],
            &[true, false, true],
            &[false, false, false],
        ]);
        close(
            &v(&masked_reduce(&x, &m, Reduction::Mean)),
            &[-2.0, -3.0, 0.0],
        );
        close(
            &v(&masked_reduce(&x, &m, Reduction::Min)),
            &[-3.0, -4.0, 0.0],
        );
        close(
            &v(&masked_reduce(&x, &m, Reduction::Max)),
            &[-1.0, -2.0, 0.0],
        );
        close(
            &v(&masked_reduce(&x, &m, Reduction::Sum)),
            &[-4.0, -6.0, 0.0],
        );
    }

    #[test]
    fn token_log_probs_match_direct_log_softmax() {
        tch::manual_seed(0);
        let logits = Tensor::randn([2, 4, 7], (Kind::Float, tch::Device::Cpu));
        let tokens = Tensor::from_slice(&[1i64, 3, 0, 6, 2, 2, 5, 4]).view([2, 4]);
        let lp = token_log_probs(&logits, &tokens, 0.7);
        for b in 0..2 {
            assert_eq!(lp.double_value(&[b, 0]), 0.0);
            for p in 1..4 {
                let row: Vec<f32> = Vec::try_from(logits.get(b).get(p - 1)).unwrap();
                let scaled: Vec<f64> = row.iter().map(|&z| z as f64 / 0.7).collect();
                let lse = scaled.iter().map(|z| z.exp()).sum::<f64>().ln();
                let tok = tokens.int64_value(&[b, p]) as usize;
                assert!((lp.double_value(&[b, p]) - (scaled[tok] - lse)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn reward_matches_direct_computation_with_padding_and_format_penalty() {
        let cfg = RewardConfig::default();
        // Student chats: row 0 explanation at 1..3, solution at 4..6; row 1 (left-padded by
        // two) explanation at 3..4, solution at 5..7. Padding positions hold junk.
        let s_lp = t2(&[
            &[0.0, -0.5, -1.5, -9.0, -0.2, -0.4, -7.0, -7.0],
            &[-50.0, -50.0, 0.0, -2.0, -9.0, -0.1, -0.3, -0.6],
        ]);
        let s_expl = [Span { start: 1, len: 2 }, Span { start: 3, len: 1 }];
        let s_sol = [Span { start: 4, len: 2 }, Span { start: 5, len: 3 }];
        let t_lp = t2(&[
            &[0.0, -9.0, -0.1, -0.2, -5.0],
            &[-50.0, 0.0, -9.0, -0.7, -5.0],
        ]);
        let t_expl = [Span { start: 2, len: 2 }, Span { start: 3, len: 1 }];
        let out = rlt_reward(
            &RewardInputs {
                student_log_probs: &s_lp,
                student_explanation: &s_expl,
                student_solution: &s_sol,
                teacher_log_probs: &t_lp,
                teacher_explanation: &t_expl,
                well_formed: &[true, false],
            },
            &cfg,
        );
        // Row 0: solution lps [-0.2, -0.4]; kl per token [-0.1 - -0.5, -0.2 - -1.5] = [0.4, 1.3].
        let sol0 = (-0.2 - 0.4) / 2.0 + 0.01 * -0.4;
        let kl0 = 3.0 * (0.4 + 1.3) / 2.0 + 0.03 * 1.3;
        // Row 1: solution lps [-0.1, -0.3, -0.6]; kl [-0.7 - -2.0] = [1.3]; malformed.
        let sol1 = (-0.1 - 0.3 - 0.6) / 3.0 + 0.01 * -0.6;
        let kl1 = 3.0 * 1.3 + 0.03 * 1.3;
        close(&v(&out.solution), &[sol0, sol1]);
        close(&v(&out.kl), &[kl0, kl1]);
        close(&v(&out.format), &[0.0, -1.0]);
        close(&v(&out.reward), &[sol0 - kl0, sol1 - kl1 - 1.0]);
    }

    #[test]
    fn weights_and_reductions_are_configurable() {
        let cfg = RewardConfig {
            solution: "max:2".parse().unwrap(),
            kl: "sum:1, min:0.5".parse().unwrap(),
            format_penalty: -3.0,
            ..RewardConfig::default()
        };
        let s_lp = t2(&[&[0.0, -1.0, -2.0, -3.0]]);
        let t_lp = t2(&[&[0.0, 0.0, 0.0, 0.0]]);
        let out = rlt_reward(
            &RewardInputs {
                student_log_probs: &s_lp,
                student_explanation: &[Span { start: 1, len: 2 }],
                student_solution: &[Span { start: 2, len: 2 }],
                teacher_log_probs: &t_lp,
                teacher_explanation: &[Span { start: 1, len: 2 }],
                well_formed: &[false],
            },
            &cfg,
        );
        // solution: 2 * max(-2, -3) = -4; kl tokens [1, 2]: sum 3 + 0.5 * min 1 = 3.5.
        close(&v(&out.reward), &[-4.0 - 3.5 - 3.0]);
        assert!("mean".parse::<WeightedReductions>().is_err());
        assert!("median:1".parse::<WeightedReductions>().is_err());
    }
}
