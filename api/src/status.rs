//! `RltRun.status`, following the Kubernetes API conventions: `conditions` are the truth,
//! `phase` is derived from them for display (`kubectl get rltruns`).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Condition types. Per-stage completion, plus `Suspended`, `InvalidSpec` and the terminal
/// `Succeeded` / `Failed`.
pub mod condition {
    pub const WARMUP_COMPLETE: &str = "WarmupComplete";
    pub const RL_COMPLETE: &str = "RLComplete";
    pub const DISTILLATION_COMPLETE: &str = "DistillationComplete";
    pub const SUSPENDED: &str = "Suspended";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    /// A child write the API server refused, or a same-named object the run does not own.
    pub const DEGRADED: &str = "Degraded";
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Largest integer every JSON reader holds exactly (2^53 - 1): the bound of the u64 counters.
const MAX_JSON_INTEGER: u64 = (1 << 53) - 1;

/// What the operator observed of the run: conditions, per-stage attempts and artifacts, RL's
/// figures; written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RltRunStatus {
    /// Derived from the conditions, for display only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Why the run is where it is, when that is not plain progress: the reason of its
    /// `Failed`, `InvalidSpec`, `Degraded` or `Suspended` condition, else of the current
    /// stage's (`Unschedulable`, `ImagePullBackOff`, `WaitingForVolume`, ...). For display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// The generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The truth of the run's state: one `metav1.Condition` per type (`WarmupComplete`,
    /// `RLComplete`, `DistillationComplete`, `Suspended`, `InvalidSpec`, `Degraded`,
    /// `Succeeded`, `Failed`). A stage condition with reason `Queued` is a stage waiting for
    /// admission by Kueue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Stage progress for display, e.g. `rl 40/125`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Attempt of the current (or last) stage, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = u32::MAX))]
    pub attempt: Option<u32>,
    /// Per stage: times, attempts, failures and the artifact.
    #[serde(default, skip_serializing_if = "StagesStatus::is_empty")]
    pub stages: StagesStatus,
    /// RL's figures: read from parameter server 0 while the stage runs, and its last step's
    /// from the learners' termination messages once it completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingStatus>,
    /// GPU-hours the run's pods have held, every stage and attempt together (the sum of
    /// `stages.*.gpuHours`): what the run cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub gpu_hours: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Phase {
    Pending,
    /// The current stage waits for admission by Kueue: none of its pods exist.
    Queued,
    WarmUp,
    RL,
    Distillation,
    Succeeded,
    Failed,
    Suspended,
    /// The spec is refused (`InvalidSpec`): nothing runs until it is fixed.
    Invalid,
    /// A child write is refused by the API server or a same-named object is not the run's
    /// (`Degraded`): the run cannot go on until that changes.
    Blocked,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Queued => "Queued",
            Phase::WarmUp => "WarmUp",
            Phase::RL => "RL",
            Phase::Distillation => "Distillation",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Suspended => "Suspended",
            Phase::Invalid => "Invalid",
            Phase::Blocked => "Blocked",
        }
    }
    pub const ALL: [Phase; 10] = [
        Phase::Pending,
        Phase::Queued,
        Phase::WarmUp,
        Phase::RL,
        Phase::Distillation,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Suspended,
        Phase::Invalid,
        Phase::Blocked,
    ];
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StagesStatus {
    /// The warm-up stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<StageStatus>,
    /// The RL stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl: Option<StageStatus>,
    /// The distillation stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<StageStatus>,
}

impl StagesStatus {
    pub fn is_empty(&self) -> bool {
        *self == StagesStatus::default()
    }

    pub fn get(&self, stage: crate::stage::Stage) -> Option<&StageStatus> {
        use crate::stage::Stage;
        match stage {
            Stage::Warmup => self.warmup.as_ref(),
            Stage::Rl => self.rl.as_ref(),
            Stage::Distillation => self.distillation.as_ref(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Times this stage's pods were (re)started, 0-based; stamped on the pods as
    /// `RLT_ATTEMPT` and used to fence checkpoints. Resuming after suspend is a new attempt.
    /// A distillation student retried alone goes on to attempts of its own (`students`).
    #[serde(default)]
    #[schemars(range(max = u32::MAX))]
    pub attempt: u32,
    /// Failed attempts; the run fails when this exceeds `failurePolicy.retries`. In
    /// distillation, every student's failures added up (the limit is per student: `students`).
    #[serde(default)]
    #[schemars(range(max = u32::MAX))]
    pub failures: u32,
    /// Attempts ended by Kueue evicting the stage (preempted, its queue stopped, ...): not
    /// failures; the stage resumes from its checkpoint once admitted again.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = u32::MAX))]
    pub evictions: u32,
    /// Attempts ended by a disruption, not counted as failures: a pod of the attempt was
    /// evicted, preempted or lost with its node (`DisruptionTarget`) and the others failed only
    /// because that peer was lost (the trainer's peer-lost exit code).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = u32::MAX))]
    pub disruptions: u32,
    /// Attempts torn down because their pods were not all running within
    /// `failurePolicy.schedulingTimeoutSeconds` (not failures).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = u32::MAX))]
    pub scheduling_timeouts: u32,
    /// After a scheduling timeout: the next attempt's pods are not created before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// When the last eviction counted in `evictions` happened (the Workload's `Evicted`
    /// condition's transition time): an eviction is counted once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_eviction_time: Option<Time>,
    /// Distillation: the students whose Job succeeded (kept across attempts, so a retry only
    /// reruns the students that did not finish).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed_students: Vec<String>,
    /// Distillation: the students that were retried on their own, by name. A failed student
    /// is retried alone while the others run on; one without an entry is on the stage's
    /// `attempt`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub students: BTreeMap<String, StudentStatus>,
    /// Workspace path of what the stage produced (distillation: the `distill/` directory,
    /// one `<student>/final` per student).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// GPU-hours the stage's pods have held over all its attempts: each pod's GPUs (a MIG
    /// slice counts as one) times the time from its start to its end. Exact for ended
    /// attempts; a running attempt's share is refreshed as it grows (by 0.1 GPU-hours or 1%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub gpu_hours: Option<f64>,
    /// The part of `gpuHours` of the attempts that ended (added as each one ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub ended_attempts_gpu_hours: Option<f64>,
}

/// One distillation student's own attempts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StudentStatus {
    /// The student's attempt (its Job's suffix and its pods' `RLT_ATTEMPT`): past the stage's
    /// by its own retries.
    #[serde(default)]
    #[schemars(range(max = u32::MAX))]
    pub attempt: u32,
    /// The student's failed attempts; the run fails when this exceeds
    /// `failurePolicy.retries`.
    #[serde(default)]
    #[schemars(range(max = u32::MAX))]
    pub failures: u32,
}

impl StageStatus {
    /// The attempt a unit of the stage is on: a student's own once it was retried alone, else
    /// the stage's.
    pub fn attempt_of(&self, student: Option<&str>) -> u32 {
        student
            .and_then(|s| self.students.get(s))
            .map_or(self.attempt, |s| s.attempt)
    }

    /// Starts the stage's next attempt (a retry, a resume, an eviction: every unit stops):
    /// the students retried alone, not done yet, move on with it. Returns the stage's attempt.
    pub fn next_attempt(&mut self) -> u32 {
        self.attempt += 1;
        for (name, student) in &mut self.students {
            if !self.completed_students.contains(name) {
                student.attempt += 1;
            }
        }
        self.attempt
    }

    /// A student's own entry, made on the stage's attempt when it has none.
    pub fn student_mut(&mut self, name: &str) -> &mut StudentStatus {
        let attempt = self.attempt;
        self.students
            .entry(name.to_string())
            .or_insert_with(|| StudentStatus {
                attempt,
                failures: 0,
            })
    }

    /// Moves one student alone on to its next attempt (it failed, or its pods were
    /// disrupted); the others run on. Returns its new attempt.
    pub fn next_student_attempt(&mut self, name: &str) -> u32 {
        let student = self.student_mut(name);
        student.attempt += 1;
        student.attempt
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingStatus {
    /// The last RL step whose figures were read.
    #[schemars(range(max = MAX_JSON_INTEGER))]
    pub step: u64,
    /// RL's steps in all (`spec.rl.steps`).
    #[schemars(range(max = MAX_JSON_INTEGER))]
    pub total_steps: u64,
    /// The step's mean reward: the solution term minus the KL term, as weighted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_reward: Option<f64>,
    /// The student's mean log-probability of the solution given the explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solution_term: Option<f64>,
    /// The mean KL term that keeps the explanation natural to the student.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_term: Option<f64>,
    /// When `step` last moved (what `spec.rl.progressDeadlineSeconds` is measured from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_time: Option<Time>,
}

impl From<&crate::contract::TrainingFigures> for TrainingStatus {
    fn from(f: &crate::contract::TrainingFigures) -> Self {
        TrainingStatus {
            step: f.step,
            total_steps: f.total_steps,
            mean_reward: f.mean_reward,
            solution_term: f.solution_term,
            kl_term: f.kl_term,
            last_step_time: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_student_retried_alone_keeps_its_own_attempts_through_the_stages_next() {
        let mut st = StageStatus::default();
        assert_eq!(st.attempt_of(Some("a")), 0);
        assert_eq!(st.next_student_attempt("b"), 1);
        assert_eq!((st.attempt, st.attempt_of(Some("a"))), (0, 0), "a runs on");
        assert_eq!(st.attempt_of(Some("b")), 1);
        // A stage-wide new attempt (an eviction, a resume): every student not done moves on,
        // each to an attempt it never ran.
        st.completed_students.push("c".into());
        st.next_student_attempt("c");
        assert_eq!(st.next_attempt(), 1);
        assert_eq!(st.attempt_of(Some("a")), 1);
        assert_eq!(st.attempt_of(Some("b")), 2);
        assert_eq!(
            st.attempt_of(Some("c")),
            1,
            "a finished student stays where it finished"
        );
        assert_eq!(st.attempt_of(None), 1);
    }
}
