//! A synthetic task tiny models learn on a CPU in minutes: multi-step integer arithmetic
//! with the worked steps as the reasoning trace, e.g.
//! question `Compute 7 + 5 - 3 * 2.` (left to right), reasoning `7 + 5 = 12. 12 - 3 = 9.
//! 9 * 2 = 18.`, solution `18`.
use super::Example;
use crate::engine::sampling::SplitMix64;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub count: usize,
    /// Operations per question (at least 1).
    pub min_steps: usize,
    pub max_steps: usize,
    /// Operands are drawn from 1..=max_operand.
    pub max_operand: i64,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            count: 2000,
            min_steps: 2,
            max_steps: 3,
            max_operand: 9,
            seed: 0,
        }
    }
}

/// Generates `spec.count` examples; the same spec gives the same examples. Operations are
/// applied left to right (stated in the question), so each step's result is the next step's
/// left operand.
pub fn generate(spec: &SyntheticSpec) -> Vec<Example> {
    let mut rng = SplitMix64::new(spec.seed ^ 0x5EED);
    let span = spec
        .max_steps
        .max(spec.min_steps)
        .saturating_sub(spec.min_steps) as u64
        + 1;
    let max = spec.max_operand.max(1) as u64;
    (0..spec.count)
        .map(|_| {
            let steps = spec.min_steps.max(1) + rng.below(span) as usize;
            let mut acc = 1 + rng.below(max) as i64;
            let mut question = format!("Compute {acc}");
            let mut steps_text = Vec::with_capacity(steps);
            for _ in 0..steps {
                let b = 1 + rng.below(max) as i64;
                let (op, value) = match rng.below(3) {
                    0 => ('+', acc + b),
                    1 => ('-', acc - b),
                    _ => ('*', acc * b),
                };
                question.push_str(&format!(" {op} {b}"));
                steps_text.push(format!("{acc} {op} {b} = {value}."));
                acc = value;
            }
            question.push_str(", left to right.");
            Example {
                question,
                solution: acc.to_string(),
                reasoning: Some(steps_text.join(" ")),
                system: None,
            }
        })
        .collect()
}

/// Splits off a held-out set by hashing each question, so a question (and any duplicate of
/// it) is either held out or trained on, never both. Returns (train, held_out).
pub fn split(
    examples: Vec<Example>,
    held_out_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let mut train = vec![];
    let mut held = vec![];
    for e in examples {
        // FNV-1a of the question, mixed with the seed.
        let h = e.question.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let u = SplitMix64::new(h ^ seed).next_f64();
        if u < held_out_fraction {
            held.push(e);
        } else {
            train.push(e);
        }
    }
    (train, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval_left_to_right(q: &str) -> i64 {
        let body = q
            .strip_prefix("Compute ")
            .unwrap()
            .strip_suffix(", left to right.")
            .unwrap();
        let mut it = body.split(' ');
        let mut acc: i64 = it.next().unwrap().parse().unwrap();
        while let (Some(op), Some(b)) = (it.next(), it.next()) {
            let b: i64 = b.parse().unwrap();
            acc = match op {
                "+" => acc + b,
                "-" => acc - b,
                "*" => acc * b,
                _ => panic!("op {op}"),
            };
        }
        acc
    }

    #[test]
    fn examples_are_correct_deterministic_and_split() {
        let spec = SyntheticSpec {
            count: 500,
            ..Default::default()
        };
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        assert_ne!(a, generate(&SyntheticSpec { seed: 1, ..spec }));
        for e in &a {
            assert_eq!(
                eval_left_to_right(&e.question).to_string(),
                e.solution,
                "{e:?}"
            );
            let r = e.reasoning.as_deref().unwrap();
            assert!(r.ends_with(&format!("= {}.", e.solution)), "{r}");
        }
        let (train, held) = split(a, 0.1, 0);
        assert_eq!(train.len() + held.len(), 500);
        assert!((30..80).contains(&held.len()), "{}", held.len());
        assert!(held
            .iter()
            .all(|h| train.iter().all(|t| t.question != h.question)));
    }
}
