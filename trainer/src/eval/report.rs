//! Scoring completions against gold answers and the JSON report `rlt-trainer eval` writes.
//! Pure: completions in, figures out, so the grading is tested without a model.
use super::bench::{Gold, Problem};
use super::extract::{choice_letter, last_boxed, solution_section};
use super::normalize::{answers_match, normalize};
use serde::{Deserialize, Serialize};

/// How the completions were drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Sampling {
    /// One greedy (argmax) completion per problem.
    Greedy,
    /// `k` completions per problem at `temperature` / `top_p`, seeded.
    Sampled {
        k: usize,
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

impl Sampling {
    pub fn samples_per_problem(&self) -> usize {
        match self {
            Sampling::Greedy => 1,
            Sampling::Sampled { k, .. } => *k,
        }
    }
}

/// One problem's completions, what was read out of each, and whether it was right.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemResult {
    pub id: String,
    pub gold: String,
    /// The extracted answer of each completion (`None`: nothing to extract, e.g. no box).
    pub extracted: Vec<Option<String>>,
    pub correct: Vec<bool>,
    /// The majority answer's correctness (majority over normalised extracted answers).
    pub majority_correct: bool,
    /// Mean log-prob per token of the reference solution after the model's own (first) thought,
    /// for sets that carry a solution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solution_logprob: Option<f64>,
    /// Raw completions, kept only when asked for (they can be large).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completions: Vec<String>,
}

/// The JSON report of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub benchmark: String,
    pub file: String,
    pub checkpoint: String,
    pub sampling: Sampling,
    pub problems: usize,
    pub samples_per_problem: usize,
    /// Mean correctness over every completion (pass@1 estimated from k samples).
    pub accuracy: f64,
    /// Share of problems with at least one correct completion.
    pub pass_at_k: f64,
    /// Share of problems whose most frequent extracted answer is correct.
    pub majority_at_k: f64,
    /// Completions from which no answer could be extracted.
    pub extraction_failures: usize,
    /// Mean over problems of [`ProblemResult::solution_logprob`], when scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_solution_logprob: Option<f64>,
    pub results: Vec<ProblemResult>,
}

/// The answer a completion gives for `problem`, if one can be read.
pub fn extract_answer(problem: &Problem, completion: &str) -> Option<String> {
    match problem.gold {
        // The last box; without one, the student format's solution section.
        Gold::Math(_) => last_boxed(completion).or_else(|| solution_section(completion)),
        Gold::Choice(_) => {
            let last = (b'A' + problem.choices.len().saturating_sub(1) as u8) as char;
            choice_letter(completion, last)
                .or_else(|| choice_letter(&solution_section(completion)?, last))
                .map(String::from)
        }
    }
}

fn is_correct(gold: &Gold, extracted: &str) -> bool {
    match gold {
        Gold::Math(answer) => answers_match(extracted, answer),
        Gold::Choice(letter) => extracted.chars().eq(std::iter::once(*letter)),
    }
}

/// Grades one problem's completions.
pub fn score(problem: &Problem, completions: &[String], keep_completions: bool) -> ProblemResult {
    let extracted: Vec<Option<String>> = completions
        .iter()
        .map(|c| extract_answer(problem, c))
        .collect();
    let correct: Vec<bool> = extracted
        .iter()
        .map(|e| e.as_deref().is_some_and(|e| is_correct(&problem.gold, e)))
        .collect();
    let majority_correct =
        majority(&extracted).is_some_and(|answer| is_correct(&problem.gold, answer));
    ProblemResult {
        id: problem.id.clone(),
        gold: problem.gold_text(),
        extracted,
        correct,
        majority_correct,
        solution_logprob: None,
        completions: if keep_completions {
            completions.to_vec()
        } else {
            Vec::new()
        },
    }
}

/// The most frequent extracted answer, equal answers counted together by their normal form;
/// ties go to the answer seen first.
fn majority(extracted: &[Option<String>]) -> Option<&str> {
    let mut counts: Vec<(String, usize, &str)> = Vec::new();
    for answer in extracted.iter().flatten() {
        let key = normalize(answer);
        match counts.iter_mut().find(|(k, _, _)| *k == key) {
            Some(entry) => entry.1 += 1,
            None => counts.push((key, 1, answer)),
        }
    }
    // `max_by_key` keeps the last of equal maxima; iterate reversed to prefer the first.
    counts
        .iter()
        .rev()
        .max_by_key(|(_, n, _)| *n)
        .map(|(_, _, answer)| *answer)
}

/// Folds graded problems into a report.
pub fn summarize(
    benchmark: String,
    file: String,
    checkpoint: String,
    sampling: Sampling,
    results: Vec<ProblemResult>,
) -> Report {
    let n = results.len();
    let samples: usize = results.iter().map(|r| r.correct.len()).sum();
    let correct: usize = results
        .iter()
        .map(|r| r.correct.iter().filter(|c| **c).count())
        .sum();
    let share = |count: usize, of: usize| {
        if of == 0 {
            0.0
        } else {
            count as f64 / of as f64
        }
    };
    Report {
        benchmark,
        file,
        checkpoint,
        samples_per_problem: sampling.samples_per_problem(),
        sampling,
        problems: n,
        accuracy: share(correct, samples),
        pass_at_k: share(
            results
                .iter()
                .filter(|r| r.correct.iter().any(|c| *c))
                .count(),
            n,
        ),
        majority_at_k: share(results.iter().filter(|r| r.majority_correct).count(), n),
        extraction_failures: results
            .iter()
            .flat_map(|r| &r.extracted)
            .filter(|e| e.is_none())
            .count(),
        mean_solution_logprob: mean(results.iter().filter_map(|r| r.solution_logprob)),
        results,
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn math(answer: &str) -> Problem {
        Problem {
            id: "p".into(),
            question: "q".into(),
            choices: vec![],
            gold: Gold::Math(answer.into()),
            solution: None,
            boxed_instruction: true,
        }
    }

    fn choice(letter: char) -> Problem {
        Problem {
            id: "c".into(),
            question: "q".into(),
            choices: vec!["w".into(), "x".into(), "y".into(), "z".into()],
            gold: Gold::Choice(letter),
            solution: None,
            boxed_instruction: true,
        }
    }

    fn owned(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scores_math_completions_by_their_last_box() {
        let r = score(
            &math("\\frac{1}{2}"),
            &owned(&[
                "so \\boxed{0.5}",
                "\\boxed{1} no wait \\boxed{2}",
                "no box",
                "\\boxed{1/2}",
            ]),
            false,
        );
        assert_eq!(r.correct, vec![true, false, false, true]);
        assert_eq!(r.extracted[2], None);
        assert_eq!(r.extracted[1].as_deref(), Some("2"));
        // Without a box, the student format's solution section is the answer.
        let r = score(
            &math("18"),
            &owned(&["<|begin_of_solution|>\n\n18\n\n<|end_of_solution|>"]),
            false,
        );
        assert_eq!(r.correct, vec![true]);
        assert!(r.majority_correct);
        assert!(r.completions.is_empty());
    }

    #[test]
    fn scores_choice_completions_by_letter() {
        let r = score(
            &choice('C'),
            &owned(&["\\boxed{C}", "The answer is (B)", "\\boxed{c}"]),
            true,
        );
        assert_eq!(r.correct, vec![true, false, true]);
        assert_eq!(r.gold, "C");
        assert_eq!(r.completions.len(), 3);
    }

    #[test]
    fn majority_counts_equivalent_answers_together() {
        // 0.5 and \frac12 are one answer (2 votes) against 3 (1 vote) and two failures.
        let r = score(
            &math("3"),
            &owned(&[
                "\\boxed{0.5}",
                "\\boxed{3}",
                "\\boxed{\\frac12}",
                "none",
                "none",
            ]),
            false,
        );
        assert!(!r.majority_correct);
        // A tie goes to the answer seen first.
        let r = score(&math("3"), &owned(&["\\boxed{3}", "\\boxed{4}"]), false);
        assert!(r.majority_correct);
        let r = score(&math("3"), &owned(&["\\boxed{4}", "\\boxed{3}"]), false);
        assert!(!r.majority_correct);
        let r = score(&math("3"), &owned(&["none"]), false);
        assert!(!r.majority_correct);
    }

    #[test]
    fn summary_figures() {
        let results = vec![
            score(&math("1"), &owned(&["\\boxed{1}", "\\boxed{2}"]), false),
            score(&math("5"), &owned(&["\\boxed{6}", "nothing"]), false),
        ];
        let sampling = Sampling::Sampled {
            k: 2,
            temperature: 0.7,
            top_p: 1.0,
            seed: 0,
        };
        let report = summarize(
            "math500".into(),
            "f".into(),
            "ckpt".into(),
            sampling,
            results,
        );
        assert_eq!(report.problems, 2);
        assert_eq!(report.samples_per_problem, 2);
        assert!((report.accuracy - 0.25).abs() < 1e-12);
        assert!((report.pass_at_k - 0.5).abs() < 1e-12);
        assert!((report.majority_at_k - 0.5).abs() < 1e-12);
        assert_eq!(report.extraction_failures, 1);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["sampling"]["mode"], "sampled");
        assert_eq!(json["sampling"]["k"], 2);
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }
}
