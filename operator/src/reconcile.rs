//! The decision logic: (run, observed children, now) -> (children to apply and delete, new
//! status, events). Pure: no I/O, no clock, so every phase transition is a unit test and the
//! controller is idempotent (the same inputs give the same plan; a reconcile that finds
//! nothing to change returns an empty plan and the controller writes nothing).
//!
//! The stage machine, per run:
//! - the ConfigMap (rendered config) and the workspace PVC always exist;
//! - the current stage is the first whose `<Stage>Complete` condition is not True (a
//!   disabled stage is completed with reason `Skipped`);
//! - its workload is applied for the stage's current attempt; a failed workload is a failed
//!   attempt: retried as attempt+1 up to `failurePolicy.retries`, then the run is `Failed`;
//! - `suspend` deletes the current workload; resuming starts it again as attempt+1 (the
//!   trainer resumes from the last checkpoint at or below its attempt);
//! - `Succeeded` / `Failed` are sticky: a finished run never recreates children.
use crate::children::{self, names, Child, Ctx, Kind, Stage};
use crate::observe::{JobState, Observed};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
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
    pub note: String,
}

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
    /// RL is running: the controller should poll parameter server 0 for training figures.
    pub poll_figures: bool,
}

impl Plan {
    /// Nothing to write (polling is a read).
    pub fn is_noop(&self) -> bool {
        self.apply.is_empty()
            && self.delete.is_empty()
            && self.status.is_none()
            && self.events.is_empty()
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
    if is_true(cond::SUSPENDED) {
        return Phase::Suspended;
    }
    match Stage::ALL
        .into_iter()
        .find(|s| !is_true(s.complete_condition()))
    {
        None => Phase::Succeeded,
        Some(s)
            if stage_status(status, s)
                .and_then(|st| st.start_time.as_ref())
                .is_some() =>
        {
            s.phase()
        }
        Some(_) => Phase::Pending,
    }
}

fn stage_status(status: &RltRunStatus, stage: Stage) -> Option<&StageStatus> {
    match stage {
        Stage::Warmup => status.stages.warmup.as_ref(),
        Stage::Rl => status.stages.rl.as_ref(),
        Stage::Distillation => status.stages.distillation.as_ref(),
    }
}

fn stage_status_mut(stages: &mut StagesStatus, stage: Stage) -> &mut StageStatus {
    let slot = match stage {
        Stage::Warmup => &mut stages.warmup,
        Stage::Rl => &mut stages.rl,
        Stage::Distillation => &mut stages.distillation,
    };
    slot.get_or_insert_with(StageStatus::default)
}

/// Artifact paths as the pods see them (`/workspace/<run>/...`).
fn artifact(run: &str, stage: Stage) -> String {
    let dir = RunDir::new(contract::WORKSPACE_MOUNT_DIR, run);
    let path = match stage {
        Stage::Warmup => dir.warmup().final_dir(),
        Stage::Rl => dir.rl().final_dir(),
        Stage::Distillation => dir.root().join("distill"),
    };
    path.display().to_string()
}

/// Keeps condition messages readable in `kubectl describe` and under the API's 32 KiB limit.
fn clip(message: String) -> String {
    const MAX: usize = 1024;
    if message.len() <= MAX {
        return message;
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

struct Planner<'a> {
    run: &'a RltRun,
    obs: &'a Observed,
    ctx: Ctx<'a>,
    plan: Plan,
}

impl Planner<'_> {
    fn event(&mut self, type_: EventType, reason: &str, note: String) {
        self.plan.events.push(Event {
            type_,
            reason: reason.into(),
            note,
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

    fn delete_param_servers(&mut self) {
        let name = names::param_servers(&self.ctx.name);
        self.delete(Kind::StatefulSet, &name);
        self.delete(Kind::Service, &name);
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

    /// Deletes the stage's Jobs of attempts other than `attempt` (failed or superseded).
    fn delete_stale_jobs(&mut self, stage: Stage, keep: &[String]) {
        let run = self.ctx.name.clone();
        let stale: Vec<String> = self
            .obs
            .jobs
            .iter()
            .filter(|j| {
                names::stage_of_job(&j.name, &run) == Some(stage) && !keep.contains(&j.name)
            })
            .map(|j| j.name.clone())
            .collect();
        for name in stale {
            self.delete(Kind::Job, &name);
        }
    }

    /// The stage's Jobs for an attempt, as (student, Job name).
    fn stage_jobs(
        &self,
        stage: Stage,
        attempt: u32,
        done: &[String],
    ) -> Vec<(Option<String>, String)> {
        let run = &self.ctx.name;
        match stage {
            Stage::Warmup => vec![(None, names::warmup_job(run, attempt))],
            Stage::Rl => vec![(None, names::learner_job(run, attempt))],
            Stage::Distillation => self
                .run
                .spec
                .distillation
                .students
                .iter()
                .filter(|s| !done.contains(&s.name))
                .map(|s| {
                    (
                        Some(s.name.clone()),
                        names::distill_job(run, &s.name, attempt),
                    )
                })
                .collect(),
        }
    }

    fn create_job(&mut self, stage: Stage, attempt: u32, student: Option<&str>, name: &str) {
        let run = self.run;
        self.create(Kind::Job, name, |ctx| match stage {
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
        });
    }
}

/// The outcome of looking at the current stage's workload.
enum Outcome {
    Running { problem: Option<(String, String)> },
    Complete,
    Failed { message: String },
}

/// Decides what to do for a run given what exists. See the module docs for the stage machine.
pub fn reconcile(run: &RltRun, obs: &Observed, now: &Time) -> Plan {
    let old = run.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let mut p = Planner {
        run,
        obs,
        ctx: Ctx::new(run),
        plan: Plan::default(),
    };
    status.observed_generation = run.metadata.generation;
    let mut conds = Conditions {
        list: &mut status.conditions,
        generation: run.metadata.generation,
        now,
    };

    // Sticky terminal states: nothing is (re)created; what still runs is stopped.
    if conds.is_true(cond::SUCCEEDED) || conds.is_true(cond::FAILED) {
        p.delete_param_servers();
        for stage in Stage::ALL {
            p.delete_stage_jobs(stage, true);
        }
        return finish(p, old, status);
    }

    // What the schema cannot catch: report, create nothing, do not crash-loop.
    let errors = validate::semantic_errors(run);
    if !errors.is_empty() {
        let message = clip(validate::render(&errors).replace('\n', "; "));
        if conds.set(cond::INVALID_SPEC, true, "InvalidSpec", &message) {
            p.event(EventType::Warning, "InvalidSpec", message);
        }
        return finish(p, old, status);
    }
    if conds.get(cond::INVALID_SPEC).is_some() {
        conds.set(cond::INVALID_SPEC, false, "Valid", "");
    }

    let config = names::config_map(&p.ctx.name);
    if obs
        .child(Kind::ConfigMap, &config)
        .and_then(|c| c.hash.clone())
        != Some(children::config_hash(run))
    {
        p.ensure(children::config_map(&p.ctx));
    }
    if run.spec.workspace.claim_name.is_none() {
        let pvc = names::workspace(&p.ctx.name);
        p.create(Kind::PersistentVolumeClaim, &pvc, |ctx| {
            children::workspace_pvc(ctx).expect("no existing claim")
        });
    }

    for stage in Stage::ALL {
        if !stage.enabled(&run.spec) && !conds.is_true(stage.complete_condition()) {
            conds.set(
                stage.complete_condition(),
                true,
                "Skipped",
                &format!("spec.{}.enabled is false", stage.label()),
            );
        }
    }

    let retries = run.spec.failure_policy.retries;
    let stage_count = stage::enabled_stages(&run.spec).len();
    // At most one stage completes and the next starts per pass; loop so a reconcile that
    // sees a stage finish starts the next one right away.
    loop {
        let Some(stage) = Stage::ALL
            .into_iter()
            .find(|s| !conds.is_true(s.complete_condition()))
        else {
            if conds.set(
                cond::SUCCEEDED,
                true,
                "AllStagesComplete",
                "every stage succeeded",
            ) {
                p.event(
                    EventType::Normal,
                    "Succeeded",
                    "every stage succeeded".into(),
                );
            }
            p.delete_param_servers();
            status.progress = Some(stage::progress_done(stage_count));
            break;
        };
        if stage != Stage::Rl {
            p.delete_param_servers();
        }
        let stage_no = Stage::ALL
            .iter()
            .filter(|s| s.enabled(&run.spec) && **s <= stage)
            .count();

        if run.spec.suspend {
            if conds.set(
                cond::SUSPENDED,
                true,
                "Suspended",
                &format!(
                    "spec.suspend is true: the {} pods are stopped",
                    stage.label()
                ),
            ) {
                p.event(
                    EventType::Normal,
                    "Suspended",
                    format!("{} pods stopped", stage.label()),
                );
            }
            p.delete_stage_jobs(stage, true);
            if stage == Stage::Rl {
                p.delete(Kind::StatefulSet, &names::param_servers(&p.ctx.name));
            }
            status.progress = Some(stage::progress(
                stage_no,
                stage_count,
                stage,
                &Detail::Suspended,
            ));
            break;
        }
        if conds.is_true(cond::SUSPENDED) {
            conds.set(cond::SUSPENDED, false, "Resumed", "spec.suspend is false");
            let st = stage_status_mut(&mut status.stages, stage);
            if st.start_time.is_some() {
                st.attempt += 1;
            }
            let attempt = st.attempt;
            p.event(
                EventType::Normal,
                "Resumed",
                format!(
                    "{} resumes from its last checkpoint as attempt {attempt}",
                    stage.label()
                ),
            );
        }

        let st = stage_status_mut(&mut status.stages, stage);
        if st.start_time.is_none() {
            st.start_time = Some(now.clone());
            p.event(
                EventType::Normal,
                "StageStarted",
                format!("{} started", stage.label()),
            );
        }
        let mut attempt = st.attempt;
        let mut done = st.completed_students.clone();

        // Look at this attempt's Jobs.
        let jobs = p.stage_jobs(stage, attempt, &done);
        let mut outcome = Outcome::Running { problem: None };
        let mut all_complete = true;
        for (student, job) in &jobs {
            match obs.job(job).map(|j| &j.state) {
                Some(JobState::Complete) => {
                    if let Some(s) = student {
                        done.push(s.clone());
                    }
                }
                Some(JobState::Failed { reason, message }) => {
                    all_complete = false;
                    let pod = obs
                        .problem(stage, attempt, student.as_deref())
                        .map(|pr| pr.message.clone());
                    let detail = pod.unwrap_or_else(|| format!("{reason}: {message}"));
                    outcome = Outcome::Failed {
                        message: format!("job {job} failed: {detail}"),
                    };
                    break;
                }
                _ => all_complete = false,
            }
        }
        if all_complete {
            outcome = Outcome::Complete;
        } else if let Outcome::Running { problem } = &mut outcome {
            *problem = obs
                .problem(stage, attempt, None)
                .map(|pr| (pr.reason.clone(), pr.message.clone()));
        }
        stage_status_mut(&mut status.stages, stage).completed_students = done.clone();

        match outcome {
            Outcome::Complete => {
                let st = stage_status_mut(&mut status.stages, stage);
                st.completion_time = Some(now.clone());
                st.artifact = Some(artifact(&p.ctx.name, stage));
                conds.set(
                    stage.complete_condition(),
                    true,
                    "Succeeded",
                    &format!("{} succeeded in attempt {attempt}", stage.label()),
                );
                p.event(
                    EventType::Normal,
                    "StageSucceeded",
                    format!("{} succeeded", stage.label()),
                );
                if stage == Stage::Rl {
                    p.delete_param_servers();
                }
                continue;
            }
            Outcome::Failed { message } => {
                let st = stage_status_mut(&mut status.stages, stage);
                st.failures += 1;
                let failures = st.failures;
                let reason = format!("{}Failed", stage.phase().as_str());
                if failures > retries {
                    let message = clip(format!(
                        "{message} (attempt {attempt}; {failures} failures, retries {retries})"
                    ));
                    conds.set(stage.complete_condition(), false, &reason, &message);
                    conds.set(cond::FAILED, true, &reason, &message);
                    p.event(EventType::Warning, &reason, message);
                    p.delete_stage_jobs(stage, true);
                    p.delete_param_servers();
                    status.progress = Some(stage::progress(
                        stage_no,
                        stage_count,
                        stage,
                        &Detail::Failed,
                    ));
                    break;
                }
                st.attempt += 1;
                attempt = st.attempt;
                let message = clip(format!("{message}; retrying as attempt {attempt} ({failures} of {retries} retries used)"));
                conds.set(stage.complete_condition(), false, "Retrying", &message);
                p.event(EventType::Warning, "Retrying", message);
            }
            Outcome::Running { problem } => {
                let (reason, message) = problem
                    .unwrap_or_else(|| ("Running".into(), format!("attempt {attempt} running")));
                if conds.set(
                    stage.complete_condition(),
                    false,
                    &reason,
                    &clip(message.clone()),
                ) && reason != "Running"
                {
                    p.event(EventType::Warning, &reason, clip(message));
                }
            }
        }

        // The workload of the (possibly new) attempt.
        let jobs = p.stage_jobs(stage, attempt, &done);
        let keep: Vec<String> = jobs.iter().map(|(_, j)| j.clone()).collect();
        p.delete_stale_jobs(stage, &keep);
        if stage == Stage::Rl {
            p.ensure(children::param_server_service(&p.ctx));
            p.ensure(children::param_server_set(&p.ctx, attempt));
            p.plan.poll_figures = true;
        }
        for (student, job) in jobs {
            p.create_job(stage, attempt, student.as_deref(), &job);
        }

        let detail = match stage {
            Stage::Rl => {
                if let Some(f) = &obs.figures {
                    status.training = Some(TrainingStatus {
                        step: f.step,
                        total_steps: f.total_steps,
                        mean_reward: f.mean_reward,
                    });
                }
                match &status.training {
                    Some(t) => Detail::Steps {
                        step: t.step,
                        total: t.total_steps,
                    },
                    None => Detail::Running,
                }
            }
            Stage::Distillation => Detail::Students {
                done: done.len(),
                total: run.spec.distillation.students.len(),
            },
            Stage::Warmup => Detail::Running,
        };
        status.progress = Some(stage::progress(stage_no, stage_count, stage, &detail));
        break;
    }
    finish(p, old, status)
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
                format!("{} -> {}", old_phase.as_str(), phase.as_str()),
            );
        }
        status.phase = Some(phase);
    }
    let current = Stage::ALL
        .into_iter()
        .rev()
        .find_map(|s| stage_status(&status, s).map(|st| st.attempt));
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
