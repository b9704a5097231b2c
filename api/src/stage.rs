//! The stages of a run, in order, and how their progress reads. The operator (which reconciles
//! them into Jobs) and `rlt-trainer pipeline` (which runs them as local processes) both take
//! them from here, so `kubectl get rltruns` and a local run print the same words.
use crate::layout::RunDir;
use crate::spec::RltRunSpec;
use crate::status::{condition, Phase};
use std::path::PathBuf;

/// The three stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Warmup,
    Rl,
    Distillation,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Warmup, Stage::Rl, Stage::Distillation];

    /// The spec's name of the stage (labels, Events, log lines).
    pub fn label(self) -> &'static str {
        match self {
            Stage::Warmup => "warmup",
            Stage::Rl => "rl",
            Stage::Distillation => "distillation",
        }
    }

    pub fn from_label(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.label() == s)
    }

    /// The run's phase while this stage runs.
    pub fn phase(self) -> Phase {
        match self {
            Stage::Warmup => Phase::WarmUp,
            Stage::Rl => Phase::RL,
            Stage::Distillation => Phase::Distillation,
        }
    }

    /// The status condition that is true once the stage is done (or skipped).
    pub fn complete_condition(self) -> &'static str {
        match self {
            Stage::Warmup => condition::WARMUP_COMPLETE,
            Stage::Rl => condition::RL_COMPLETE,
            Stage::Distillation => condition::DISTILLATION_COMPLETE,
        }
    }

    /// RL is the point of a run and cannot be skipped; warm-up and distillation can.
    pub fn enabled(self, spec: &RltRunSpec) -> bool {
        match self {
            Stage::Warmup => spec.warmup.enabled,
            Stage::Rl => true,
            Stage::Distillation => spec.distillation.enabled,
        }
    }

    /// The directories whose COMPLETE marker means the stage (per student, for distillation)
    /// is done.
    pub fn outputs(self, spec: &RltRunSpec, run_dir: &RunDir) -> Vec<(Option<String>, PathBuf)> {
        match self {
            Stage::Warmup => vec![(None, run_dir.warmup().final_dir())],
            Stage::Rl => vec![(None, run_dir.rl().final_dir())],
            Stage::Distillation => spec
                .distillation
                .students
                .iter()
                .map(|s| (Some(s.name.clone()), run_dir.distill(&s.name).final_dir()))
                .collect(),
        }
    }
}

/// The enabled stages, in order.
pub fn enabled_stages(spec: &RltRunSpec) -> Vec<Stage> {
    Stage::ALL.into_iter().filter(|s| s.enabled(spec)).collect()
}

/// What the STAGE PROGRESS column says beyond `<n>/<count> <stage>`.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Running,
    /// RL steps from parameter server 0's figures.
    Steps {
        step: u64,
        total: u64,
    },
    /// Distillation students done.
    Students {
        done: usize,
        total: usize,
    },
    Suspended,
    /// Waiting for admission by Kueue.
    Queued,
    Failed,
}

/// The STAGE PROGRESS column: `1/3 warmup`, `2/3 rl 40/125`, `3/3 distill 1/2`,
/// `2/3 rl suspended`, `2/3 rl queued`, `2/3 rl failed`. `stage_no` counts enabled stages from 1.
pub fn progress(stage_no: usize, stage_count: usize, stage: Stage, detail: &Detail) -> String {
    let head = format!("{stage_no}/{stage_count}");
    match (stage, detail) {
        (_, Detail::Failed) => format!("{head} {} failed", stage.label()),
        (_, Detail::Suspended) => format!("{head} {} suspended", stage.label()),
        (_, Detail::Queued) => format!("{head} {} queued", stage.label()),
        (Stage::Rl, Detail::Steps { step, total }) => format!("{head} rl {step}/{total}"),
        (Stage::Distillation, Detail::Students { done, total }) => {
            format!("{head} distill {done}/{total}")
        }
        (Stage::Distillation, _) => format!("{head} distill"),
        (s, _) => format!("{head} {}", s.label()),
    }
}

/// The STAGE PROGRESS column once every stage is done.
pub fn progress_done(stage_count: usize) -> String {
    format!("{stage_count}/{stage_count} done")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_the_same_everywhere() {
        assert_eq!(
            progress(1, 3, Stage::Warmup, &Detail::Running),
            "1/3 warmup"
        );
        assert_eq!(
            progress(
                2,
                3,
                Stage::Rl,
                &Detail::Steps {
                    step: 4,
                    total: 125
                }
            ),
            "2/3 rl 4/125"
        );
        assert_eq!(progress(1, 2, Stage::Rl, &Detail::Running), "1/2 rl");
        assert_eq!(
            progress(
                3,
                3,
                Stage::Distillation,
                &Detail::Students { done: 1, total: 2 }
            ),
            "3/3 distill 1/2"
        );
        assert_eq!(progress(2, 3, Stage::Rl, &Detail::Failed), "2/3 rl failed");
        assert_eq!(
            progress(1, 3, Stage::Warmup, &Detail::Suspended),
            "1/3 warmup suspended"
        );
        assert_eq!(progress_done(3), "3/3 done");
        for s in Stage::ALL {
            assert_eq!(Stage::from_label(s.label()), Some(s));
        }
    }
}
