//! The decision logic: (run, observed children, now) -> (children to apply and delete, new
//! status, events). Pure: no I/O, no clock, so every phase transition is a unit test and the
//! controller is idempotent (the same inputs give the same plan; a reconcile that finds
//! nothing to change returns an empty plan and the controller writes nothing).
//!
//! The stage machine, per run:
//! - the workspace PVC always exists; each stage attempt gets its own immutable configuration
//!   snapshot (a ConfigMap, kept as long as that attempt's Jobs) and one parameter-server set,
//!   both created once: an edit reaches the next attempt only (the CRD's transition rules
//!   allow edits that matter to pods only while suspended, and suspending ends the attempt);
//! - the current stage is the first whose `<Stage>Complete` condition is not True (a
//!   disabled stage is completed with reason `Skipped`);
//! - its workload is applied for the stage's current attempt; a failed workload is a failed
//!   attempt: retried as attempt+1 up to `failurePolicy.retries`, then the run is `Failed`
//!   (at once when the trainer exited with its bad-configuration code). The retry is recorded
//!   in the status first (the controller writes status before children); the failed Job is
//!   kept for its logs (owner references delete it with the run), and the next attempt's
//!   workload starts only once the previous attempt's pods are gone;
//! - `suspend` deletes the current workload; resuming starts it again as attempt+1 (the
//!   trainer resumes from the last checkpoint at or below its attempt);
//! - a queued run (Kueue, [`crate::kueue`]) creates a stage unit's children only once its
//!   Workload is admitted, placed by the admission; an eviction ends the attempt;
//! - attempts ended by the cluster rather than the run (an eviction, a disrupted pod whose
//!   peers only lost it, a parameter server not Ready for too long, a scheduling timeout)
//!   start the next attempt without counting a failure; deadlines (`activeDeadlineSeconds`,
//!   RL's progress deadline: `Stalled`) fail it like any failure;
//! - `Succeeded` / `Failed` are sticky: a finished run never recreates children.
//!
//! Every Event carries an `action` naming its transition (stage and attempt, target phase):
//! Event series are keyed on (reason, action), so two failures with one reason stay two Events.
use crate::activity::Activity;
use crate::children::{self, names, Child, Ctx, Kind, Stage};
use crate::gpu_hours;
use crate::kueue::{self, Placement, State};

use crate::observe::{self, JobState, Observed};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use rlt_api::contract::TrainingFigures;
use rlt_api::layout::RunDir;
use rlt_api::spec::RltRun;
use rlt_api::stage::{self, Detail};
use rlt_api::status::{
    condition as cond, Phase, RltRunStatus, StageStatus, StagesStatus, TrainingStatus,
};
use rlt_api::{contract, validate};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// A Kubernetes Event to publish on the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub type_: EventType,
    pub reason: String,
    /// The transition (e.g. `WarmUpAttempt1`, `ToRL`): with `reason`, the Event series key.
    pub action: String,
    /// At most [`NOTE_MAX`] bytes.
    pub note: String,
}

/// The API server rejects Event notes longer than this (bytes).
pub const NOTE_MAX: usize = 1024;
/// ... and actions and reasons longer than this.
pub const ACTION_MAX: usize = 128;

pub use rlt_api::status::condition::DEGRADED;
/// `Degraded` reasons.
pub const CHILD_REJECTED: &str = "ChildRejected";
pub const CHILD_CONFLICT: &str = "ChildConflict";
/// The stage condition's reason while the stage waits for admission by Kueue.
pub const QUEUED: &str = "Queued";
/// Reasons of an attempt ended without counting a failure, and of a stalled one.
pub const DISRUPTED: &str = "Disrupted";
pub const SCHEDULING_TIMEOUT: &str = "SchedulingTimeout";
pub const STALLED: &str = "Stalled";
pub const PARAM_SERVER_NOT_READY: &str = "ParamServerNotReady";

/// What the controller must do. Empty when nothing changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Children to server-side apply (absent, or their content hash changed).
    pub apply: Vec<Child>,
    /// Children to delete (background propagation).
    pub delete: Vec<(Kind, String)>,
    /// The new status, only when it differs from the current one.
    pub status: Option<RltRunStatus>,
    pub events: Vec<Event>,
    /// Status changes to the run's Kueue Workloads (after the children are applied).
    pub workload_writes: Vec<kueue::StatusWrite>,
    /// RL is running: the controller should poll parameter server 0 for training figures.
    pub poll_figures: bool,
    /// Look at the run again after this long at the latest (a deadline of its own, such as
    /// `ttlSecondsAfterFinished`, falls due then).
    pub requeue_after: Option<std::time::Duration>,
}

impl Plan {
    /// Nothing to write (polling is a read).
    pub fn is_noop(&self) -> bool {
        self.apply.is_empty()
            && self.delete.is_empty()
            && self.status.is_none()
            && self.events.is_empty()
            && self.workload_writes.is_empty()
    }
}

/// Condition bookkeeping that never churns: an unchanged condition is left byte-for-byte
/// alone, and `lastTransitionTime` moves only when the status flips.
struct Conditions<'a> {
    list: &'a mut Vec<Condition>,
    generation: Option<i64>,
    now: &'a Time,
}

impl Conditions<'_> {
    fn get(&self, type_: &str) -> Option<&Condition> {
        self.list.iter().find(|c| c.type_ == type_)
    }
    fn is_true(&self, type_: &str) -> bool {
        self.get(type_).is_some_and(|c| c.status == "True")
    }
    /// Sets a condition; returns true when its status or reason changed.
    fn set(&mut self, type_: &str, status: bool, reason: &str, message: &str) -> bool {
        let status = if status { "True" } else { "False" };
        let new = |ltt: Time| Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: self.generation,
            last_transition_time: ltt,
        };
        match self.list.iter_mut().find(|c| c.type_ == type_) {
            None => {
                self.list.push(new(self.now.clone()));
                true
            }
            Some(c) => {
                let changed = c.status != status || c.reason != reason;
                let ltt = if c.status != status {
                    self.now.clone()
                } else {
                    c.last_transition_time.clone()
                };
                let updated = new(ltt);
                if *c != updated {
                    *c = updated;
                }
                changed
            }
        }
    }
}

/// `phase` is derived from the conditions (and whether the current stage has started).
pub fn derive_phase(status: &RltRunStatus) -> Phase {
    let is_true = |t: &str| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    if is_true(cond::FAILED) {
        return Phase::Failed;
    }
    if is_true(cond::SUCCEEDED) {
        return Phase::Succeeded;
    }
    if is_true(cond::INVALID_SPEC) {
        return Phase::Invalid;
    }
    if is_true(DEGRADED) {
        return Phase::Blocked;
    }
    if is_true(cond::SUSPENDED) {
        return Phase::Suspended;
    }
    let queued = |s: Stage| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == s.complete_condition() && c.status == "False" && c.reason == QUEUED)
    };
    match Stage::ALL
        .into_iter()
        .find(|s| !is_true(s.complete_condition()))
    {
        None => Phase::Succeeded,
        Some(s) if queued(s) => Phase::Queued,
        Some(s)
            if status
                .stages
                .get(s)
                .and_then(|st| st.start_time.as_ref())
                .is_some() =>
        {
            s.phase()
        }
        Some(_) => Phase::Pending,
    }
}

/// `reason` for display: the reason of the first true of `Failed`, `InvalidSpec`,
/// `Degraded`, `Suspended`; else of the current stage's condition unless it is plain
/// progress (`Running`).
pub fn derive_reason(status: &RltRunStatus) -> Option<String> {
    let true_reason = |t: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
            .map(|c| c.reason.clone())
    };
    if let Some(r) = [cond::FAILED, cond::INVALID_SPEC, DEGRADED, cond::SUSPENDED]
        .into_iter()
        .find_map(true_reason)
    {
        return Some(r);
    }
    if true_reason(cond::SUCCEEDED).is_some() {
        return None;
    }
    let stage = Stage::ALL
        .into_iter()
        .find(|s| true_reason(s.complete_condition()).is_none())?;
    status
        .conditions
        .iter()
        .find(|c| c.type_ == stage.complete_condition())
        .map(|c| c.reason.clone())
        .filter(|r| r != "Running")
}

fn current_attempt(stages: &StagesStatus, stage: Stage) -> u32 {
    let slot = match stage {
        Stage::Warmup => &stages.warmup,
        Stage::Rl => &stages.rl,
        Stage::Distillation => &stages.distillation,
    };
    slot.as_ref().map_or(0, |st| st.attempt)
}

fn stage_status_mut(stages: &mut StagesStatus, stage: Stage) -> &mut StageStatus {
    let slot = match stage {
        Stage::Warmup => &mut stages.warmup,
        Stage::Rl => &mut stages.rl,
        Stage::Distillation => &mut stages.distillation,
    };
    slot.get_or_insert_with(StageStatus::default)
}

/// Artifact paths as the pods see them (`/workspace/<run directory>/...`).
fn artifact(run: &RltRun, stage: Stage) -> String {
    let name = rlt_api::layout::run_directory(run).unwrap_or_default();
    let dir = RunDir::new(contract::WORKSPACE_MOUNT_DIR, &name);
    let path = match stage {
        Stage::Warmup => dir.warmup().final_dir(),
        Stage::Rl => dir.rl().final_dir(),
        Stage::Distillation => dir.root().join("distill"),
    };
    path.display().to_string()
}

/// Cuts `s` to at most `max` bytes on a char boundary, ending in an ellipsis when cut.
pub fn truncate(s: &str, max: usize) -> String {
    const ELLIPSIS: &str = "\u{2026}";
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &s[..end])
}

/// Keeps condition messages readable in `kubectl describe` and fit for an Event note.
fn clip(message: String) -> String {
    truncate(&message, NOTE_MAX)
}

/// The action of a stage transition: `<Phase>Attempt<n>`.
fn stage_action(stage: Stage, attempt: u32) -> String {
    format!("{}Attempt{attempt}", stage.phase().as_str())
}

/// The attempt a stage Job belongs to (its name ends in `-<attempt>`).
fn job_attempt(name: &str) -> Option<u32> {
    name.rsplit('-').next()?.parse().ok()
}

struct Planner<'a> {
    run: &'a RltRun,
    obs: &'a Observed,
    ctx: Ctx<'a>,
    plan: Plan,
}

impl Planner<'_> {
    fn event(&mut self, type_: EventType, reason: &str, action: &str, note: String) {
        self.plan.events.push(Event {
            type_,
            reason: truncate(reason, ACTION_MAX),
            action: truncate(action, ACTION_MAX),
            note: truncate(&note, NOTE_MAX),
        });
    }

    /// Applies a child unless the observed one already has the same content hash.
    fn ensure(&mut self, child: Child) {
        match self.obs.child(child.kind(), child.name()) {
            Some(o) if o.deleting => {}
            Some(o) if o.hash.as_deref() == child.hash() => {}
            _ => self.plan.apply.push(child),
        }
    }

    /// Creates a child that is never updated (a Job's pod template is immutable: a new
    /// attempt is a new Job; a PVC's size is the storage's business). Built only if absent.
    fn create(&mut self, kind: Kind, name: &str, build: impl FnOnce(&Ctx) -> Child) {
        if self.obs.child(kind, name).is_none() {
            self.plan.apply.push(build(&self.ctx));
        }
    }

    fn delete(&mut self, kind: Kind, name: &str) {
        if self.obs.child(kind, name).is_some_and(|o| !o.deleting)
            && !self
                .plan
                .delete
                .iter()
                .any(|(k, n)| *k == kind && n == name)
        {
            self.plan.delete.push((kind, name.to_string()));
        }
    }

    /// Deletes every parameter-server set and their Service (RL is over or never ran).
    fn delete_param_servers(&mut self) {
        self.delete_param_server_sets(None);
        self.delete(Kind::Service, &names::param_servers(&self.ctx.name));
    }

    /// Deletes the parameter-server sets of attempts other than `keep`.
    fn delete_param_server_sets(&mut self, keep: Option<u32>) {
        for name in children::stale_param_server_sets(&self.ctx.name, self.obs, keep) {
            self.delete(Kind::StatefulSet, &name);
        }
    }

    /// Deletes the configuration snapshots of earlier attempts once their workload is gone: a
    /// snapshot lives as long as its attempt's Jobs (a failed Job kept for its logs keeps the
    /// configuration it ran with). A snapshot older than this operator's naming is left to
    /// the run's owner reference.
    fn delete_stale_configs(&mut self, stage: Stage, st: &StageStatus) {
        let current: Vec<u32> = self
            .stage_jobs(stage, st)
            .iter()
            .map(|j| j.attempt)
            .collect();
        let run = self.ctx.name.clone();
        let has_workload = |(s, a): (Stage, u32)| {
            self.obs.jobs.iter().any(|j| {
                names::stage_of_job(&j.name, &run) == Some(s) && job_attempt(&j.name) == Some(a)
            }) || self.obs.children.iter().any(|c| {
                c.kind == Kind::StatefulSet
                    && s == Stage::Rl
                    && names::param_server_set_attempt(&c.name, &run) == Some(a)
            })
        };
        let stale: Vec<String> = self
            .obs
            .children
            .iter()
            .filter(|c| c.kind == Kind::ConfigMap)
            .filter(|c| {
                names::config_map_attempt(&c.name, &run).is_some_and(|(s, a)| {
                    !(s == stage && (a == st.attempt || current.contains(&a)))
                        && !has_workload((s, a))
                })
            })
            .map(|c| c.name.clone())
            .collect();
        for name in stale {
            self.delete(Kind::ConfigMap, &name);
        }
    }

    /// Deletes the stage's Jobs: all of them, or only those still running.
    fn delete_stage_jobs(&mut self, stage: Stage, only_running: bool) {
        let run = self.ctx.name.clone();
        let doomed: Vec<String> = self
            .obs
            .jobs
            .iter()
            .filter(|j| names::stage_of_job(&j.name, &run) == Some(stage))
            .filter(|j| !only_running || j.state == JobState::Running)
            .map(|j| j.name.clone())
            .collect();
        for name in doomed {
            self.delete(Kind::Job, &name);
        }
    }

    /// Stops the stage's Jobs of earlier attempts that still run (superseded, e.g. the
    /// students' Jobs of an evicted distillation attempt). Finished Jobs are kept for their
    /// logs; later attempts' Jobs are never touched (a stale status must not delete them).
    fn delete_superseded_jobs(&mut self, stage: Stage, st: &StageStatus) {
        let run = self.ctx.name.clone();
        let superseded: Vec<String> = self
            .obs
            .jobs
            .iter()
            .filter(|j| names::stage_of_job(&j.name, &run) == Some(stage))
            .filter(|j| j.state == JobState::Running)
            .filter(|j| {
                job_attempt(&j.name).is_some_and(|a| a < st.attempt_of(self.student_of(&j.name)))
            })
            .map(|j| j.name.clone())
            .collect();
        for name in superseded {
            self.delete(Kind::Job, &name);
        }
    }

    /// The stage's Jobs of its current attempt: one per student not done yet, each on its own
    /// attempt, in distillation.
    fn stage_jobs(&self, stage: Stage, st: &StageStatus) -> Vec<StageJob> {
        let (run, attempt) = (&self.ctx.name, st.attempt);
        match stage {
            Stage::Warmup => vec![StageJob::of_stage(names::warmup_job(run, attempt), attempt)],
            Stage::Rl => vec![StageJob::of_stage(
                names::learner_job(run, attempt),
                attempt,
            )],
            Stage::Distillation => self
                .run
                .spec
                .distillation
                .students
                .iter()
                .filter(|s| !st.completed_students.contains(&s.name))
                .map(|s| {
                    let attempt = st.attempt_of(Some(&s.name));
                    StageJob {
                        name: names::distill_job(run, &s.name, attempt),
                        student: Some(s.name.clone()),
                        attempt,
                    }
                })
                .collect(),
        }
    }

    /// The student a distillation Job of the run is for, from its name (None for the other
    /// stages' Jobs).
    fn student_of(&self, job: &str) -> Option<&str> {
        let attempt = job_attempt(job)?;
        let students = &self.run.spec.distillation.students;
        students
            .iter()
            .map(|s| s.name.as_str())
            .find(|s| names::distill_job(&self.ctx.name, s, attempt) == job)
    }

    fn create_job(
        &mut self,
        stage: Stage,
        attempt: u32,
        student: Option<&str>,
        name: &str,
        placements: Option<&Placements>,
    ) {
        let run = self.run;
        self.create(Kind::Job, name, |ctx| {
            let job = match stage {
                Stage::Warmup => children::warmup_job(ctx, attempt),
                Stage::Rl => children::learner_job(ctx, attempt),
                Stage::Distillation => {
                    let s = run
                        .spec
                        .distillation
                        .students
                        .iter()
                        .find(|s| Some(s.name.as_str()) == student);
                    children::distill_job(ctx, s.expect("job of a listed student"), attempt)
                }
            };
            placed(job, placements)
        });
    }

    /// Whether every Job of the stage's attempt (the students not done yet) has completed.
    fn attempt_complete(&self, stage: Stage, st: &StageStatus) -> bool {
        let jobs = self.stage_jobs(stage, st);
        !jobs.is_empty()
            && jobs.iter().all(|j| {
                self.obs
                    .job(&j.name)
                    .is_some_and(|j| j.state == JobState::Complete)
            })
    }

    /// What earlier attempts of the stage left running (Jobs, parameter servers) goes, and
    /// the configuration snapshots no Job needs any more.
    fn clear_earlier_attempts(&mut self, stage: Stage, st: &StageStatus) {
        self.delete_superseded_jobs(stage, st);
        self.delete_stale_configs(stage, st);
        if stage == Stage::Rl {
            self.delete_param_server_sets(Some(st.attempt));
        }
    }

    /// Marks the stage's Workloads `Finished` (their quota is freed).
    fn finish_workloads(&mut self, stage: Stage, succeeded: bool, message: &str) {
        for unit in children::queue_units(&self.ctx, stage) {
            self.finish_workload(&unit.workload, succeeded, message);
        }
    }

    fn finish_workload(&mut self, name: &str, succeeded: bool, message: &str) {
        let finished = |w: &kueue::ObservedWorkload| w.state == State::Finished;
        if self.obs.workload(name).is_some_and(|w| !finished(w)) {
            self.plan.workload_writes.push(kueue::StatusWrite::Finish {
                name: name.into(),
                succeeded,
                message: message.into(),
            });
        }
    }
}

/// One Job of a stage attempt.
struct StageJob {
    name: String,
    /// The distillation student it trains.
    student: Option<String>,
    /// Its attempt: the stage's, or its student's own.
    attempt: u32,
}

impl StageJob {
    fn of_stage(name: String, attempt: u32) -> StageJob {
        StageJob {
            name,
            student: None,
            attempt,
        }
    }
}

/// The outcome of looking at the current stage's workload.
enum Outcome {
    Running {
        problem: Option<(String, String)>,
    },
    Complete,
    Failed {
        message: String,
        /// The distillation student whose Job failed (only it is retried), and that Job's
        /// attempt.
        student: Option<(String, u32)>,
        /// The trainer exited with its bad-configuration code: retrying cannot help.
        bad_config: bool,
        /// A pod the cluster took away, when that is why it failed ([`Activity::disruption`]).
        disruption: Option<String>,
        /// RL made no step within its progress deadline (the attempt's Jobs still run).
        stalled: bool,
    },
}

/// After a stage's turn: look at the next stage (this one just completed), or stop here.
enum Next {
    Stage,
    Stop,
}

/// An admission's placement of each pod set of a unit, by pod-set name.
type Placements = std::collections::BTreeMap<String, Placement>;

/// A unit's Job or StatefulSet, with its pod set's placement when the run is queued.
fn placed(child: Child, placements: Option<&Placements>) -> Child {
    match placements {
        None => child,
        Some(p) => {
            let set = children::pod_set_of(&child);
            children::place(child, &p.get(set).cloned().unwrap_or_default())
        }
    }
}

/// Decides what to do for a run given what exists. See the module docs for the stage machine.
pub fn reconcile(run: &RltRun, obs: &Observed, now: &Time) -> Plan {
    reconcile_with(run, obs, &Activity::default(), now)
}

/// [`reconcile`], also knowing which Job pods are alive, which exited with a bad
/// configuration, and why a Job has no pods.
pub fn reconcile_with(run: &RltRun, obs: &Observed, activity: &Activity, now: &Time) -> Plan {
    let old = run.status.clone().unwrap_or_default();
    let mut r = Reconciler {
        p: Planner {
            run,
            obs,
            ctx: Ctx::new(run),
            plan: Plan::default(),
        },
        status: old.clone(),
        activity,
        now,
        queue: queue_of(run, &obs.fleet),
    };
    r.status.observed_generation = run.metadata.generation;
    if r.is_finished() {
        r.stop_everything();
    } else if !r.refuse_invalid_spec() {
        r.ensure_run_children();
        r.skip_disabled_stages();
        // At most one stage completes and the next starts per turn; loop so a reconcile that
        // sees a stage finish starts the next one right away.
        while let Next::Stage = r.advance() {}
    }
    // Also in the reconcile that finishes the run: its deadline starts now.
    if r.is_finished() {
        r.collect_after_ttl();
    }
    r.record_final_figures();
    finish(r.p, old, r.status)
}

/// One reconcile in progress: the plan being built and the status being written.
struct Reconciler<'a> {
    p: Planner<'a>,
    status: RltRunStatus,
    activity: &'a Activity,
    now: &'a Time,
    /// The LocalQueue the run's stages are admitted through, when it is queued.
    queue: Option<String>,
}

/// The LocalQueue of a run: its `kueue.x-k8s.io/queue-name` label, else its namespace's
/// `default` LocalQueue (as Kueue defaults every top-level job), else none: not queued.
fn queue_of(run: &RltRun, fleet: &kueue::Fleet) -> Option<String> {
    match run.labels().get(kueue::QUEUE_LABEL) {
        Some(q) if !q.is_empty() => Some(q.clone()),
        _ if fleet.installed && fleet.default_queue => Some(kueue::DEFAULT_QUEUE.into()),
        _ => None,
    }
}

impl Reconciler<'_> {
    fn conds(&mut self) -> Conditions<'_> {
        Conditions {
            list: &mut self.status.conditions,
            generation: self.p.run.metadata.generation,
            now: self.now,
        }
    }

    fn stage(&mut self, stage: Stage) -> &mut StageStatus {
        stage_status_mut(&mut self.status.stages, stage)
    }

    /// Records the GPU-hours of the stage's current attempt: exactly when it `ended` (added to
    /// the stage's ended attempts), else its share so far when it has grown enough to be worth
    /// a write. The run's total follows.
    fn account_gpu_hours(&mut self, stage: Stage, ended: bool) {
        let st = self.stage(stage).clone();
        let live = gpu_hours::of_attempt(&self.p.obs.pods, stage, &st, None, self.now);
        let st = self.stage(stage);
        let before = st.ended_attempts_gpu_hours.unwrap_or(0.0);
        let total = gpu_hours::round(before + live);
        if ended {
            st.ended_attempts_gpu_hours = Some(total);
            st.gpu_hours = Some(total);
        } else if st
            .gpu_hours
            .is_none_or(|shown| gpu_hours::worth_writing(shown, total))
        {
            st.gpu_hours = Some(total);
        }
        let stages = Stage::ALL.map(|s| self.status.stages.get(s).and_then(|st| st.gpu_hours));
        if stages.iter().any(Option::is_some) {
            let sum = stages.iter().flatten().sum();
            self.status.gpu_hours = Some(gpu_hours::round(sum));
        }
    }

    /// A student's attempt ended (it is retried alone): its GPU-hours join the ended attempts'.
    fn account_student_gpu_hours(&mut self, stage: Stage, student: &str) {
        let st = self.stage(stage).clone();
        let ended = gpu_hours::of_attempt(&self.p.obs.pods, stage, &st, Some(student), self.now);
        let st = self.stage(stage);
        let before = st.ended_attempts_gpu_hours.unwrap_or(0.0);
        st.ended_attempts_gpu_hours = Some(gpu_hours::round(before + ended));
    }

    fn set_progress(&mut self, stage: Stage, detail: &Detail) {
        let spec = &self.p.run.spec;
        let stage_no = Stage::ALL
            .iter()
            .filter(|s| s.enabled(spec) && **s <= stage)
            .count();
        let count = stage::enabled_stages(spec).len();
        self.status.progress = Some(stage::progress(stage_no, count, stage, detail));
    }

    fn is_finished(&mut self) -> bool {
        let c = self.conds();
        c.is_true(cond::SUCCEEDED) || c.is_true(cond::FAILED)
    }

    /// Sticky terminal states: nothing is (re)created; what still runs is stopped.
    fn stop_everything(&mut self) {
        self.p.delete_param_servers();
        for stage in Stage::ALL {
            self.p.delete_stage_jobs(stage, true);
        }
    }

    /// `ttlSecondsAfterFinished`: once it has passed since the run finished, every child but
    /// the workspace claim (which follows its retain policy) is deleted; before, the
    /// controller is asked to come back when it falls due.
    fn collect_after_ttl(&mut self) {
        let Some(ttl) = self.p.run.spec.ttl_seconds_after_finished else {
            return;
        };
        let finished = self
            .status
            .conditions
            .iter()
            .filter(|c| {
                (c.type_ == cond::SUCCEEDED || c.type_ == cond::FAILED) && c.status == "True"
            })
            .map(|c| c.last_transition_time.0)
            .max();
        let Some(finished) = finished else { return };
        let waited = self.now.0.duration_since(finished).as_secs();
        if waited < i64::from(ttl) {
            let left = (i64::from(ttl) - waited).max(1) as u64;
            self.p.plan.requeue_after = Some(std::time::Duration::from_secs(left));
            return;
        }
        let doomed: Vec<(Kind, String)> = self
            .p
            .obs
            .children
            .iter()
            .filter(|c| c.kind != Kind::PersistentVolumeClaim && !c.deleting)
            .map(|c| (c.kind, c.name.clone()))
            .collect();
        if doomed.is_empty() {
            return;
        }
        self.p.event(
            EventType::Normal,
            "ChildrenDeleted",
            "TTLExpired",
            format!(
                "ttlSecondsAfterFinished ({ttl} s) passed: {} children deleted, the workspace claim stays",
                doomed.len()
            ),
        );
        for (kind, name) in doomed {
            self.p.delete(kind, &name);
        }
    }

    /// What the schema cannot catch: report, create nothing, do not crash-loop. Returns true
    /// when the spec is refused.
    fn refuse_invalid_spec(&mut self) -> bool {
        let errors = validate::semantic_errors(self.p.run);
        if !errors.is_empty() {
            let message = clip(validate::render(&errors).replace('\n', "; "));
            if self
                .conds()
                .set(cond::INVALID_SPEC, true, "InvalidSpec", &message)
            {
                let generation = self.p.run.metadata.generation.unwrap_or(0);
                let action = format!("ValidateGeneration{generation}");
                self.p
                    .event(EventType::Warning, "InvalidSpec", &action, message);
            }
            return true;
        }
        if self.conds().get(cond::INVALID_SPEC).is_some() {
            self.conds().set(cond::INVALID_SPEC, false, "Valid", "");
        }
        false
    }

    /// The child every run has whatever its stage: the workspace.
    fn ensure_run_children(&mut self) {
        let p = &mut self.p;
        if p.run.spec.workspace.claim_name.is_none() {
            let pvc = names::workspace(&p.ctx.name);
            p.create(Kind::PersistentVolumeClaim, &pvc, |ctx| {
                children::workspace_pvc(ctx).expect("no existing claim")
            });
        }
    }

    fn skip_disabled_stages(&mut self) {
        for stage in Stage::ALL {
            if !stage.enabled(&self.p.run.spec) && !self.conds().is_true(stage.complete_condition())
            {
                let message = format!("spec.{}.enabled is false", stage.label());
                self.conds()
                    .set(stage.complete_condition(), true, "Skipped", &message);
            }
        }
    }

    /// One turn of the stage machine for the first stage not yet complete.
    fn advance(&mut self) -> Next {
        let current = Stage::ALL
            .into_iter()
            .find(|s| !self.conds().is_true(s.complete_condition()));
        let Some(stage) = current else {
            self.all_stages_done();
            return Next::Stop;
        };
        if stage != Stage::Rl {
            self.p.delete_param_servers();
        }
        if self.p.run.spec.suspend {
            self.suspend(stage);
            return Next::Stop;
        }
        self.resume_if_suspended(stage);
        if let Some(queue) = self.queue.clone() {
            if !self.admitted(stage, &queue) {
                return Next::Stop;
            }
        }
        self.start_if_new(stage);

        let st = self.stage(stage).clone();
        let (attempt, mut done) = (st.attempt, st.completed_students.clone());
        let outcome = self.look(stage, &st, &mut done);
        self.stage(stage).completed_students = done.clone();
        if self.queue.is_some() && stage == Stage::Distillation {
            // A student that completed frees its quota now, whatever the others do.
            for student in &done {
                let name = names::queue_workload(&self.p.ctx.name, stage, Some(student));
                let message = format!("student {student} succeeded");
                self.p.finish_workload(&name, true, &message);
            }
        }
        match outcome {
            Outcome::Complete => {
                self.account_gpu_hours(stage, true);
                self.complete(stage, attempt);
                return Next::Stage;
            }
            Outcome::Failed {
                message,
                student,
                bad_config,
                disruption,
                stalled,
            } => {
                // A distillation student's failure is its own: only it is retried.
                let (unit, failed) = match &student {
                    Some((s, a)) => (Some(s.as_str()), *a),
                    None => (None, attempt),
                };
                match disruption {
                    Some(pod) => {
                        let message = format!(
                            "{message}; attempt {failed}'s pod {pod} was disrupted (evicted, \
                             preempted or its node lost) and the others only lost it"
                        );
                        self.end_uncounted(stage, failed, unit, DISRUPTED, message);
                    }
                    None => {
                        if !self.fail(stage, failed, unit, message, bad_config, stalled) {
                            return Next::Stop;
                        }
                    }
                }
            }
            Outcome::Running { problem } => {
                if let Some(message) = self.scheduling_timed_out(stage) {
                    self.scheduling_timeout(stage, attempt, message);
                } else if let Some(message) = self.param_server_not_ready(stage, attempt) {
                    self.end_uncounted(stage, attempt, None, PARAM_SERVER_NOT_READY, message);
                } else {
                    self.account_gpu_hours(stage, false);
                    self.report_running(stage, attempt, problem);
                    self.check_again_at_deadlines(stage, attempt);
                }
            }
        }
        self.ensure_workload(stage);
        self.show_progress(stage, &done);
        Next::Stop
    }

    fn all_stages_done(&mut self) {
        if self.conds().set(
            cond::SUCCEEDED,
            true,
            "AllStagesComplete",
            "every stage succeeded",
        ) {
            self.p.event(
                EventType::Normal,
                "Succeeded",
                "Complete",
                "every stage succeeded".into(),
            );
        }
        self.p.delete_param_servers();
        let count = stage::enabled_stages(&self.p.run.spec).len();
        self.status.progress = Some(stage::progress_done(count));
    }

    fn suspend(&mut self, stage: Stage) {
        let attempt = current_attempt(&self.status.stages, stage);
        let message = format!(
            "spec.suspend is true: the {} pods are stopped",
            stage.label()
        );
        if self
            .conds()
            .set(cond::SUSPENDED, true, "Suspended", &message)
        {
            // A started attempt ends here: its pods are stopped now.
            if self.stage(stage).start_time.is_some() {
                self.account_gpu_hours(stage, true);
            }
            self.p.event(
                EventType::Normal,
                "Suspended",
                &stage_action(stage, attempt),
                format!("{} pods stopped", stage.label()),
            );
        }
        self.p.delete_stage_jobs(stage, true);
        if stage == Stage::Rl {
            self.p.delete_param_server_sets(None);
        }
        // A suspended run holds no quota: resuming queues it again.
        for unit in children::queue_units(&self.p.ctx, stage) {
            self.p.delete(Kind::Workload, &unit.workload);
        }
        self.set_progress(stage, &Detail::Suspended);
    }

    /// Resuming a started stage is a new attempt (it continues from the last checkpoint).
    fn resume_if_suspended(&mut self, stage: Stage) {
        if !self.conds().is_true(cond::SUSPENDED) {
            return;
        }
        self.conds()
            .set(cond::SUSPENDED, false, "Resumed", "spec.suspend is false");
        let st = self.stage(stage);
        if st.start_time.is_some() {
            st.next_attempt();
        }
        let attempt = st.attempt;
        self.p.event(
            EventType::Normal,
            "Resumed",
            &stage_action(stage, attempt),
            format!(
                "{} resumes from its last checkpoint as attempt {attempt}",
                stage.label()
            ),
        );
    }

    fn start_if_new(&mut self, stage: Stage) {
        let now = self.now.clone();
        let st = self.stage(stage);
        if st.start_time.is_some() {
            return;
        }
        st.start_time = Some(now);
        let attempt = st.attempt;
        self.p.event(
            EventType::Normal,
            "StageStarted",
            &stage_action(stage, attempt),
            format!("{} started", stage.label()),
        );
    }

    /// A queued run's admission of the stage ([`crate::kueue`]): its units' Workloads exist,
    /// an eviction ends the attempt (counted in `evictions`, never in `failures`), an evicted
    /// unit gives its quota back once its pods are gone, a finished student's Workload is
    /// `Finished`. True when at least one unit is admitted (its pods may run); else the stage
    /// condition says `Queued` and why, and none of the stage's pods are left.
    fn admitted(&mut self, stage: Stage, queue: &str) -> bool {
        if !self.p.obs.fleet.installed {
            let message = format!(
                "the run is queued in LocalQueue {queue} ({}), but Kueue's Workload API \
                 (kueue.x-k8s.io/v1beta2) is not served: install Kueue and restart the \
                 operator, or remove the label",
                kueue::QUEUE_LABEL
            );
            self.wait_in_queue(stage, message);
            return false;
        }
        let priority = match self.p.run.labels().get(kueue::PRIORITY_LABEL) {
            None => None,
            Some(name) => match self.p.obs.fleet.priorities.get(name) {
                Some(value) => Some((name.clone(), *value)),
                None => {
                    let message = format!(
                        "WorkloadPriorityClass {name} ({}) does not exist",
                        kueue::PRIORITY_LABEL
                    );
                    self.wait_in_queue(stage, message);
                    return false;
                }
            },
        };
        let units = children::queue_units(&self.p.ctx, stage);
        let st = self.stage(stage).clone();
        if self.p.attempt_complete(stage, &st) {
            // Its Jobs completed before an eviction was seen: the stage is done, not evicted
            // (its Workloads are finished as it completes).
            return true;
        }
        self.count_eviction(stage, &units);
        let st = self.stage(stage).clone();
        let (attempt, done) = (st.attempt, &st.completed_students);
        let (mut admitted, mut waiting) = (false, None);
        for unit in &units {
            let pods_gone = !self
                .activity
                .earlier_attempts_alive(stage, &st)
                .any(|p| p.student == unit.student);
            let finished = unit.student.as_ref().is_some_and(|s| done.contains(s));
            let state = self.p.obs.workload(&unit.workload).map(|w| w.state.clone());
            match state {
                None if finished => {}
                None => {
                    let priority = priority.as_ref().map(|(n, v)| (n.as_str(), *v));
                    self.p.create(Kind::Workload, &unit.workload, |ctx| {
                        children::queue_workload(ctx, unit, attempt, queue, priority)
                    });
                    waiting.get_or_insert(format!("waiting for admission in LocalQueue {queue}"));
                }
                Some(State::Finished) => {}
                // A student done: its Workload was finished when it completed.
                Some(_) if finished => {}
                Some(State::Admitted { .. }) => admitted = true,
                Some(State::Pending { message }) => {
                    waiting.get_or_insert(format!(
                        "waiting for admission in LocalQueue {queue}: {message}"
                    ));
                }
                Some(State::Evicted {
                    reason,
                    message,
                    holds_quota,
                    ..
                }) => {
                    if holds_quota && pods_gone {
                        self.p
                            .plan
                            .workload_writes
                            .push(kueue::StatusWrite::Requeue {
                                name: unit.workload.clone(),
                                reason: reason.clone(),
                                message: message.clone(),
                            });
                    }
                    waiting.get_or_insert(format!(
                        "evicted by Kueue ({reason}: {message}); waiting for admission in LocalQueue {queue}"
                    ));
                }
            }
        }
        if admitted {
            return true;
        }
        self.p.clear_earlier_attempts(stage, &st);
        let message =
            waiting.unwrap_or_else(|| format!("waiting for admission in LocalQueue {queue}"));
        self.wait_in_queue(stage, message);
        false
    }

    /// An eviction of one of the stage's Workloads not counted yet ends the running attempt:
    /// its pods stop, and the next admission starts the next attempt from the last checkpoint.
    fn count_eviction(&mut self, stage: Stage, units: &[children::Unit]) {
        let newest = units
            .iter()
            .filter_map(|u| match &self.p.obs.workload(&u.workload)?.state {
                State::Evicted {
                    since,
                    reason,
                    message,
                    ..
                } => Some((since.clone(), reason.clone(), message.clone())),
                _ => None,
            })
            .max_by_key(|(since, ..)| since.0);
        let Some((since, reason, message)) = newest else {
            return;
        };
        let st = self.stage(stage);
        if st
            .last_eviction_time
            .as_ref()
            .is_some_and(|t| t.0 >= since.0)
        {
            return;
        }
        let (started, attempt) = (st.start_time.is_some(), st.attempt);
        if started {
            self.account_gpu_hours(stage, true);
        }
        let st = self.stage(stage);
        st.evictions += 1;
        st.last_eviction_time = Some(since);
        let next = st.next_attempt();
        self.p.event(
            EventType::Normal,
            "Evicted",
            &stage_action(stage, attempt),
            clip(format!(
                "{} attempt {attempt} evicted by Kueue ({reason}: {message}): its pods stop; it \
                 resumes from its last checkpoint as attempt {next} once admitted again (not a failure)",
                stage.label()
            )),
        );
    }

    /// The stage waits for Kueue: its condition says `Queued` and why.
    fn wait_in_queue(&mut self, stage: Stage, message: String) {
        let attempt = self.stage(stage).attempt;
        let message = clip(message);
        if self
            .conds()
            .set(stage.complete_condition(), false, QUEUED, &message)
        {
            self.p.event(
                EventType::Normal,
                QUEUED,
                &stage_action(stage, attempt),
                message,
            );
        }
        self.set_progress(stage, &Detail::Queued);
    }

    /// Looks at the stage's current Jobs; the students whose Jobs completed are added to
    /// `done`.
    fn look(&self, stage: Stage, st: &StageStatus, done: &mut Vec<String>) -> Outcome {
        let (obs, activity) = (self.p.obs, self.activity);
        let jobs = self.p.stage_jobs(stage, st);
        let mut all_complete = true;
        for StageJob {
            name: job,
            student,
            attempt,
        } in &jobs
        {
            match obs.job(job).map(|j| &j.state) {
                Some(JobState::Complete) => {
                    if let Some(s) = student {
                        done.push(s.clone());
                    }
                }
                Some(JobState::Failed { reason, message }) => {
                    let pod = obs.job_problem(job).map(|pr| pr.message.clone());
                    let detail = pod.unwrap_or_else(|| format!("{reason}: {message}"));
                    let student = student.as_deref();
                    return Outcome::Failed {
                        message: format!("job {job} failed: {detail}"),
                        student: student.map(|s| (s.to_string(), *attempt)),
                        bad_config: activity.bad_config(stage, student, *attempt),
                        disruption: activity
                            .disruption(stage, student, *attempt)
                            .map(|p| p.name.clone()),
                        stalled: false,
                    };
                }
                _ => all_complete = false,
            }
        }
        if all_complete {
            return Outcome::Complete;
        }
        if let Some((idle, limit)) = self
            .progress_idle(stage, st.attempt)
            .filter(|(i, l)| *i > i64::from(*l))
        {
            let step = self.status.training.as_ref().map_or(0, |t| t.step);
            return Outcome::Failed {
                message: format!(
                    "Stalled: no RL step for {idle} s (progressDeadlineSeconds {limit}; last step {step})"
                ),
                student: None,
                bad_config: false,
                disruption: None,
                stalled: true,
            };
        }
        let problem = obs
            .problem(stage, st)
            .map(|pr| (pr.reason.clone(), pr.message.clone()))
            .or_else(|| {
                jobs.iter().find_map(|StageJob { name: job, .. }| {
                    activity.failed_create(job).map(|m| {
                        (
                            "FailedCreate".to_string(),
                            format!("job {job} cannot create its pods: {m}"),
                        )
                    })
                })
            });
        Outcome::Running { problem }
    }

    fn complete(&mut self, stage: Stage, attempt: u32) {
        let (now, artifact) = (self.now.clone(), artifact(self.p.run, stage));
        let st = self.stage(stage);
        st.completion_time = Some(now);
        st.artifact = Some(artifact);
        self.conds().set(
            stage.complete_condition(),
            true,
            "Succeeded",
            &format!("{} succeeded in attempt {attempt}", stage.label()),
        );
        self.p.event(
            EventType::Normal,
            "StageSucceeded",
            &stage_action(stage, attempt),
            format!("{} succeeded", stage.label()),
        );
        if stage == Stage::Rl {
            self.p.delete_param_servers();
        }
        self.p
            .finish_workloads(stage, true, &format!("{} succeeded", stage.label()));
    }

    /// Counts a failed attempt (of one student, in distillation: `student`): true when it is
    /// retried (a student alone, as its own next attempt), false when the run fails.
    fn fail(
        &mut self,
        stage: Stage,
        attempt: u32,
        student: Option<&str>,
        message: String,
        bad_config: bool,
        stalled: bool,
    ) -> bool {
        let retries = self.p.run.spec.failure_policy.retries;
        let st = self.stage(stage);
        st.failures += 1;
        let failures = match student {
            Some(s) => {
                let s = st.student_mut(s);
                s.failures += 1;
                s.failures
            }
            None => st.failures,
        };
        let of = student.map_or_else(String::new, |s| format!("student {s}: "));
        let message = format!("{of}{message}");
        if bad_config || failures > retries {
            let why = if bad_config {
                "the trainer reported a bad configuration: not retried".to_string()
            } else {
                format!("{of}{failures} failures, retries {retries}")
            };
            self.account_gpu_hours(stage, true);
            self.fail_run(stage, clip(format!("{message} (attempt {attempt}; {why})")));
            return false;
        }
        let next = self.next_attempt_of(stage, student);
        let alone = match student {
            Some(s) => format!(" student {s} alone (the others run on)"),
            None => String::new(),
        };
        let message = clip(format!(
            "{message}; retrying{alone} as attempt {next} ({failures} of {retries} retries used)"
        ));
        let reason = if stalled { STALLED } else { "Retrying" };
        self.conds()
            .set(stage.complete_condition(), false, reason, &message);
        self.p.event(
            EventType::Warning,
            reason,
            &stage_action(stage, next),
            message,
        );
        true
    }

    /// The run fails in `stage`: everything of it stops, its Workloads free their quota.
    fn fail_run(&mut self, stage: Stage, message: String) {
        let attempt = self.stage(stage).attempt;
        let reason = format!("{}Failed", stage.phase().as_str());
        self.conds()
            .set(stage.complete_condition(), false, &reason, &message);
        self.conds().set(cond::FAILED, true, &reason, &message);
        self.p.finish_workloads(stage, false, &message);
        self.p.event(
            EventType::Warning,
            &reason,
            &stage_action(stage, attempt),
            message,
        );
        self.p.delete_stage_jobs(stage, true);
        self.p.delete_param_servers();
        self.set_progress(stage, &Detail::Failed);
    }

    /// Ends the current attempt of the stage, or of one student alone, and returns the one
    /// that follows (the student's own). The ended attempt's GPU-hours are final.
    fn next_attempt_of(&mut self, stage: Stage, student: Option<&str>) -> u32 {
        match student {
            Some(s) => {
                self.account_student_gpu_hours(stage, s);
                self.stage(stage).next_student_attempt(s)
            }
            None => {
                self.account_gpu_hours(stage, true);
                self.stage(stage).next_attempt()
            }
        }
    }

    /// An attempt (of the stage, or of one student) ended by what happened to its pods rather
    /// than by the run (a disruption, [`Activity::disruption`]; a parameter server not Ready
    /// for too long): retried as the next attempt (from the last checkpoint, with fresh pods),
    /// counted in `disruptions`, never in `failures`.
    fn end_uncounted(
        &mut self,
        stage: Stage,
        attempt: u32,
        student: Option<&str>,
        reason: &str,
        message: String,
    ) {
        self.stage(stage).disruptions += 1;
        let next = self.next_attempt_of(stage, student);
        let (of, alone) = match student {
            Some(s) => (format!("student {s}: "), format!(" student {s} alone")),
            None => (String::new(), String::new()),
        };
        let message = clip(format!(
            "{of}{message}: retrying{alone} as attempt {next}, not counted as a failure"
        ));
        self.conds()
            .set(stage.complete_condition(), false, reason, &message);
        self.p.event(
            EventType::Warning,
            reason,
            &stage_action(stage, attempt),
            message,
        );
    }

    /// `rl.paramServerNotReadySeconds`: a message when a running parameter server of the
    /// attempt has not been Ready for longer.
    fn param_server_not_ready(&mut self, stage: Stage, attempt: u32) -> Option<String> {
        if stage != Stage::Rl {
            return None;
        }
        let limit = self.p.run.spec.rl.param_server_not_ready_seconds?;
        let (pod, since) = self
            .p
            .obs
            .pods
            .iter()
            .filter(|p| p.param_server && p.attempt == Some(attempt) && !p.deleting)
            .filter_map(|p| Some((p.name.clone(), p.not_ready_since.as_ref()?.0)))
            .min_by_key(|(_, since)| *since)?;
        let waited = self.now.0.duration_since(since).as_secs();
        if waited <= i64::from(limit) {
            self.requeue_within(i64::from(limit) - waited + 1);
            return None;
        }
        Some(format!(
            "parameter server {pod} not Ready for {waited} s (paramServerNotReadySeconds {limit})"
        ))
    }

    /// `failurePolicy.schedulingTimeoutSeconds`: a message when the attempt's pods have not all
    /// been running within it since its Jobs were created.
    fn scheduling_timed_out(&mut self, stage: Stage) -> Option<String> {
        let limit = self.p.run.spec.failure_policy.scheduling_timeout_seconds?;
        let st = self.stage(stage).clone();
        let created = self
            .p
            .stage_jobs(stage, &st)
            .iter()
            .filter_map(|j| self.p.obs.job(&j.name))
            .filter(|j| j.state == JobState::Running)
            .filter_map(|j| j.created.as_ref())
            .map(|t| t.0)
            .min()?;
        let expected = expected_pods(self.p.run, stage, &st.completed_students);
        let running = self
            .p
            .obs
            .pods
            .iter()
            .filter(|p| p.stage == Some(stage) && !p.deleting && p.started.is_some())
            .filter(|p| p.attempt == Some(st.attempt_of(p.student.as_deref())))
            .count();
        if running >= expected {
            return None;
        }
        let waited = self.now.0.duration_since(created).as_secs();
        if waited <= i64::from(limit) {
            self.requeue_within(i64::from(limit) - waited + 1);
            return None;
        }
        Some(format!(
            "{running} of {expected} pods running {waited} s after the attempt started \
             (schedulingTimeoutSeconds {limit})"
        ))
    }

    /// Tears down an attempt that could not get all its pods running: the GPUs its running
    /// pods hold are freed, and the next attempt starts after as long again (not a failure).
    fn scheduling_timeout(&mut self, stage: Stage, attempt: u32, message: String) {
        self.account_gpu_hours(stage, true);
        let limit = self
            .p
            .run
            .spec
            .failure_policy
            .scheduling_timeout_seconds
            .unwrap_or(0);
        let later = self.now.0 + std::time::Duration::from_secs(u64::from(limit));
        let st = self.stage(stage);
        st.scheduling_timeouts += 1;
        st.next_attempt_time = Some(Time(later));
        let next = st.next_attempt();
        let message = clip(format!(
            "{message}: its pods are stopped and attempt {next} starts in {limit} s (not a failure)"
        ));
        self.conds().set(
            stage.complete_condition(),
            false,
            SCHEDULING_TIMEOUT,
            &message,
        );
        self.p.event(
            EventType::Warning,
            SCHEDULING_TIMEOUT,
            &stage_action(stage, attempt),
            message,
        );
    }

    /// RL's progress deadline: (seconds without a new step, the limit), once the attempt's
    /// pods run. Measured from the later of the last step and the attempt's last pod start.
    fn progress_idle(&self, stage: Stage, attempt: u32) -> Option<(i64, u32)> {
        if stage != Stage::Rl {
            return None;
        }
        let limit = self.p.run.spec.rl.progress_deadline_seconds?;
        let started = self
            .p
            .obs
            .pods
            .iter()
            .filter(|p| p.stage == Some(stage) && p.attempt == Some(attempt))
            .filter_map(|p| p.started.as_ref())
            .map(|t| t.0)
            .max()?;
        let moved = self
            .status
            .training
            .as_ref()
            .and_then(|t| t.last_step_time.as_ref())
            .map(|t| t.0);
        let since = moved.map_or(started, |m| m.max(started));
        Some((self.now.0.duration_since(since).as_secs(), limit))
    }

    /// Comes back when a running attempt's progress deadline falls due, even if nothing
    /// changes meanwhile.
    fn check_again_at_deadlines(&mut self, stage: Stage, attempt: u32) {
        if let Some((idle, limit)) = self.progress_idle(stage, attempt) {
            self.requeue_within(i64::from(limit) - idle + 1);
        }
    }

    fn requeue_within(&mut self, secs: i64) {
        let due = std::time::Duration::from_secs(secs.max(1) as u64);
        let plan = &mut self.p.plan;
        plan.requeue_after = Some(plan.requeue_after.map_or(due, |d| d.min(due)));
    }

    /// The stage condition says what the running attempt is doing (or what troubles its pods).
    fn report_running(&mut self, stage: Stage, attempt: u32, problem: Option<(String, String)>) {
        // While an earlier attempt's pods linger, the condition keeps saying why.
        let st = self.stage(stage).clone();
        if self
            .activity
            .earlier_attempts_alive(stage, &st)
            .next()
            .is_some()
        {
            return;
        }
        let alone: Vec<String> = st
            .students
            .iter()
            .filter(|(name, _)| !st.completed_students.contains(name))
            .map(|(name, s)| format!("{name} on attempt {}", s.attempt))
            .collect();
        let running = match alone.is_empty() {
            true => format!("attempt {attempt} running"),
            false => format!("attempt {attempt} running ({})", alone.join(", ")),
        };
        let (reason, message) = problem.unwrap_or_else(|| ("Running".into(), running));
        let message = clip(message);
        if self
            .conds()
            .set(stage.complete_condition(), false, &reason, &message)
            && reason != "Running"
        {
            // A claim being bound is a wait, not a fault: no Warning on a healthy run.
            let kind = if reason == observe::WAITING_FOR_VOLUME {
                EventType::Normal
            } else {
                EventType::Warning
            };
            self.p
                .event(kind, &reason, &stage_action(stage, attempt), message);
        }
    }

    /// The workload of the (possibly new) attempt: each unit's (the stage's, or a student's
    /// own) once its earlier attempts' pods are gone; of a queued run, only the units Kueue
    /// admitted, placed as their admission says.
    fn ensure_workload(&mut self, stage: Stage) {
        let st = self.stage(stage).clone();
        self.p.clear_earlier_attempts(stage, &st);
        if let Some(t) = st.next_attempt_time.as_ref().filter(|t| t.0 > self.now.0) {
            // After a scheduling timeout: the GPUs stay free a while for others.
            self.requeue_within(t.0.duration_since(self.now.0).as_secs());
            return;
        }
        let lingering: Vec<Option<String>> = self
            .activity
            .earlier_attempts_alive(stage, &st)
            .map(|p| p.student.clone())
            .collect();
        let jobs: Vec<(StageJob, Option<Placements>)> = self
            .p
            .stage_jobs(stage, &st)
            .into_iter()
            .filter(|j| !lingering.contains(&j.student))
            .filter_map(|j| {
                let placement = self.placement(stage, j.student.as_deref())?;
                Some((j, placement))
            })
            .collect();
        let p = &mut self.p;
        if !jobs.is_empty() {
            // Each attempt's configuration first: its pods mount it.
            let attempts: std::collections::BTreeSet<u32> =
                jobs.iter().map(|(j, _)| j.attempt).collect();
            for attempt in attempts {
                let config = names::config_map(&p.ctx.name, stage, attempt);
                p.create(Kind::ConfigMap, &config, |ctx| {
                    children::config_map(ctx, stage, attempt)
                });
            }
            if stage == Stage::Rl {
                p.ensure(children::param_server_service(&p.ctx));
                // Once per attempt: re-applying an edited set would roll its shards under
                // running learners.
                let set = names::param_server_set(&p.ctx.name, st.attempt);
                let placement = jobs[0].1.clone();
                p.create(Kind::StatefulSet, &set, |ctx| {
                    placed(
                        children::param_server_set(ctx, st.attempt),
                        placement.as_ref(),
                    )
                });
            } else if children::needs_ranks_service(p.run) {
                p.ensure(children::ranks_service(&p.ctx));
            }
            for (job, placement) in jobs {
                let student = job.student.as_deref();
                p.create_job(stage, job.attempt, student, &job.name, placement.as_ref());
            }
        }
        if stage == Stage::Rl {
            self.p.plan.poll_figures = true;
        }
    }

    /// How a unit's pods are placed, by pod set: `None` while a queued run's unit is not
    /// admitted; `Some(None)` when the run is not queued (nothing added).
    fn placement(&self, stage: Stage, student: Option<&str>) -> Option<Option<Placements>> {
        if self.queue.is_none() {
            return Some(None);
        }
        let name = names::queue_workload(&self.p.ctx.name, stage, student);
        match self.p.obs.workload(&name).map(|w| &w.state) {
            Some(State::Admitted { placements }) => Some(Some(placements.clone())),
            _ => None,
        }
    }

    /// A short RL stage can end between two polls of the figures: its learners' termination
    /// messages carry the last step's, kept unless the status is already further along.
    fn record_final_figures(&mut self) {
        let attempt = current_attempt(&self.status.stages, Stage::Rl);
        let Some(f) = self.p.obs.final_figures(Stage::Rl, attempt) else {
            return;
        };
        if self
            .status
            .training
            .as_ref()
            .is_none_or(|t| t.step <= f.step)
        {
            let f = f.clone();
            self.set_training(&f);
        }
    }

    /// The latest figures, keeping when the step last moved.
    fn set_training(&mut self, f: &TrainingFigures) {
        let mut training = TrainingStatus::from(f);
        training.last_step_time = match &self.status.training {
            Some(old) if old.step == f.step => old.last_step_time.clone(),
            _ => Some(self.now.clone()),
        };
        self.status.training = Some(training);
    }

    /// The running stage's progress: RL steps from the latest figures, students done.
    fn show_progress(&mut self, stage: Stage, done: &[String]) {
        let detail = match stage {
            Stage::Rl => {
                if let Some(f) = self.p.obs.figures.clone() {
                    self.set_training(&f);
                }
                match &self.status.training {
                    Some(t) => Detail::Steps {
                        step: t.step,
                        total: t.total_steps,
                    },
                    None => Detail::Running,
                }
            }
            Stage::Distillation => Detail::Students {
                done: done.len(),
                total: self.p.run.spec.distillation.students.len(),
            },
            Stage::Warmup => Detail::Running,
        };
        self.set_progress(stage, &detail);
    }
}

/// A child write the API server refused with a 4xx (not retried: the same request would be
/// refused again), or a same-named object this run does not own (never adopted).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub kind: Kind,
    pub name: String,
    /// [`CHILD_REJECTED`] or [`CHILD_CONFLICT`].
    pub reason: &'static str,
    pub message: String,
}

/// Folds the outcome of the child writes into the status the plan left: the first rejection
/// sets `Degraded` (with a Warning Event when the condition changes); a reconcile whose writes
/// all went through clears it. Returns the status only when it changed.
pub fn record_child_writes(
    run: &RltRun,
    status: &RltRunStatus,
    rejections: &[Rejection],
    now: &Time,
) -> (Option<RltRunStatus>, Vec<Event>) {
    let mut new = status.clone();
    let mut events = Vec::new();
    let mut conds = Conditions {
        list: &mut new.conditions,
        generation: run.metadata.generation,
        now,
    };
    match rejections.first() {
        Some(r) => {
            let message = clip(r.message.clone());
            let before = conds.get(DEGRADED).cloned();
            conds.set(DEGRADED, true, r.reason, &message);
            if before
                .is_none_or(|c| c.status != "True" || c.reason != r.reason || c.message != message)
            {
                events.push(Event {
                    type_: EventType::Warning,
                    reason: r.reason.into(),
                    action: truncate(&format!("Apply{:?}/{}", r.kind, r.name), ACTION_MAX),
                    note: message,
                });
            }
        }
        None if conds.is_true(DEGRADED) => {
            conds.set(
                DEGRADED,
                false,
                "ChildrenApplied",
                "every child write went through",
            );
        }
        None => {}
    }
    new.phase = Some(derive_phase(&new));
    new.reason = derive_reason(&new);
    ((new != *status).then_some(new), events)
}

/// Derives phase and the display attempt, emits the phase-change Event, and keeps the status
/// only if anything changed.
fn finish(mut p: Planner, old: RltRunStatus, mut status: RltRunStatus) -> Plan {
    let phase = derive_phase(&status);
    let old_phase = old.phase.unwrap_or(Phase::Pending);
    if status.phase != Some(phase) {
        if phase != old_phase {
            p.event(
                EventType::Normal,
                "PhaseChanged",
                &format!("To{}", phase.as_str()),
                format!("{} -> {}", old_phase.as_str(), phase.as_str()),
            );
        }
        status.phase = Some(phase);
    }
    status.reason = derive_reason(&status);
    let current = Stage::ALL
        .into_iter()
        .rev()
        .find_map(|s| status.stages.get(s).map(|st| st.attempt));
    status.attempt = current;
    if status != old {
        p.plan.status = Some(status);
    }
    p.plan
}

/// The name of the run the plan is for (for logs).
pub fn run_key(run: &RltRun) -> String {
    format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any())
}

/// The pods a stage attempt runs: a warm-up's ranks, RL's parameter servers and learners,
/// every remaining student's ranks.
fn expected_pods(run: &RltRun, stage: Stage, done: &[String]) -> usize {
    let spec = &run.spec;
    match stage {
        Stage::Warmup => spec.warmup.replicas as usize,
        Stage::Rl => (spec.rl.param_servers + spec.rl.learners) as usize,
        Stage::Distillation => {
            let left = spec
                .distillation
                .students
                .iter()
                .filter(|s| !done.contains(&s.name))
                .count();
            left * spec.distillation.replicas as usize
        }
    }
}
