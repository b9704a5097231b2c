//! The stage machine, one test per behaviour a platform team depends on. A tiny in-memory
//! "cluster" applies each plan (children created, deleted, status written), so a test walks
//! a run through its life the way the controller would.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rlt_api::contract::TrainingFigures;
use rlt_api::status::{condition as cond, Phase};
use rlt_api::RltRun;
use rlt_operator::activity::{Activity, PodRef};
use rlt_operator::children::{Child, Kind, Stage};
use rlt_operator::kueue::{Fleet, ObservedWorkload, Placement, State, StatusWrite};
use rlt_operator::observe::{JobState, Observed, ObservedChild, ObservedJob, ObservedPod, Problem};
use rlt_operator::reconcile::{
    reconcile, reconcile_with, record_child_writes, EventType, Plan, Rejection, DEGRADED, NOTE_MAX,
};

const TINY: &str = include_str!("../../api/tests/good/tiny-cpu.yaml");

fn run_from(yaml: &str) -> RltRun {
    let mut run = rlt_api::parse_yaml(yaml).unwrap();
    run.metadata.namespace = Some("ml".into());
    run.metadata.uid = Some("uid-1".into());
    run.metadata.generation = Some(1);
    run
}

fn at(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap())
}

/// The run plus what exists in the cluster.
struct World {
    run: RltRun,
    obs: Observed,
    activity: Activity,
    clock: i64,
}

impl World {
    fn new(run: RltRun) -> World {
        World {
            run,
            obs: Observed::default(),
            activity: Activity::default(),
            clock: 0,
        }
    }

    /// One reconcile; the plan is applied to the world.
    fn step(&mut self) -> Plan {
        self.clock += 10;
        let plan = reconcile_with(&self.run, &self.obs, &self.activity, &at(self.clock));
        for child in &plan.apply {
            self.obs
                .children
                .retain(|c| !(c.kind == child.kind() && c.name == child.name()));
            self.obs.children.push(ObservedChild {
                kind: child.kind(),
                name: child.name().into(),
                hash: child.hash().map(Into::into),
                deleting: false,
            });
            if child.kind() == Kind::Workload && self.obs.workload(child.name()).is_none() {
                self.obs.workloads.push(ObservedWorkload {
                    name: child.name().into(),
                    state: State::Pending {
                        message: "couldn't assign flavors: insufficient quota".into(),
                    },
                });
            }
            if child.kind() == Kind::Job && self.obs.job(child.name()).is_none() {
                self.obs.jobs.push(ObservedJob {
                    name: child.name().into(),
                    state: JobState::Running,
                    deleting: false,
                    created: Some(at(self.clock)),
                });
            }
        }
        for (kind, name) in &plan.delete {
            self.obs
                .children
                .retain(|c| !(c.kind == *kind && &c.name == name));
            if *kind == Kind::Job {
                self.obs.jobs.retain(|j| &j.name != name);
                self.obs.pods.clear();
            }
            if *kind == Kind::Workload {
                self.obs.workloads.retain(|w| &w.name != name);
            }
        }
        for write in &plan.workload_writes {
            let w = self
                .obs
                .workloads
                .iter_mut()
                .find(|w| w.name == write.name())
                .expect("writes go to existing Workloads");
            match write {
                StatusWrite::Requeue { .. } => {
                    let State::Evicted { holds_quota, .. } = &mut w.state else {
                        panic!("requeue of a Workload not evicted: {w:?}")
                    };
                    *holds_quota = false;
                }
                StatusWrite::Finish { .. } => w.state = State::Finished,
            }
        }
        if let Some(status) = &plan.status {
            self.run.status = Some(status.clone());
        }
        plan
    }

    fn set_job(&mut self, name: &str, state: JobState) {
        let job = self
            .obs
            .jobs
            .iter_mut()
            .find(|j| j.name == name)
            .unwrap_or_else(|| panic!("no job {name}"));
        job.state = state;
    }

    fn status(&self) -> &rlt_api::RltRunStatus {
        self.run.status.as_ref().unwrap()
    }

    fn phase(&self) -> Phase {
        self.status().phase.unwrap()
    }

    fn condition(&self, type_: &str) -> (String, String, String) {
        let c = self
            .status()
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no condition {type_}"));
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    fn bump_spec(&mut self, edit: impl FnOnce(&mut RltRun)) {
        edit(&mut self.run);
        *self.run.metadata.generation.as_mut().unwrap() += 1;
    }
}

fn applied(plan: &Plan) -> Vec<(Kind, String)> {
    plan.apply
        .iter()
        .map(|c| (c.kind(), c.name().to_string()))
        .collect()
}

fn reasons(plan: &Plan) -> Vec<&str> {
    plan.events.iter().map(|e| e.reason.as_str()).collect()
}

fn fail(reason: &str) -> JobState {
    JobState::Failed {
        reason: reason.into(),
        message: "Job has reached the specified backoff limit".into(),
    }
}

/// A pod of the stage attempt's Job (the learners' in RL) with a problem.
fn problem_pod(stage: Stage, attempt: u32, reason: &str, message: &str) -> ObservedPod {
    let job = match stage {
        Stage::Warmup => format!("tiny-cpu-warmup-{attempt}"),
        Stage::Rl => format!("tiny-cpu-learner-{attempt}"),
        Stage::Distillation => format!("tiny-cpu-distill-student-{attempt}"),
    };
    ObservedPod {
        name: "pod-x".into(),
        stage: Some(stage),
        attempt: Some(attempt),
        job: Some(job),
        problem: Some(Problem {
            reason: reason.into(),
            message: message.into(),
        }),
        ..Default::default()
    }
}

/// Walks a world to the start of RL.
fn at_rl() -> World {
    let mut w = World::new(run_from(TINY));
    w.step();
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    w.step();
    assert_eq!(w.phase(), Phase::RL);
    w
}

#[test]
fn new_run_creates_config_workspace_and_warmup_job() {
    let mut w = World::new(run_from(TINY));
    let plan = w.step();
    assert_eq!(
        applied(&plan),
        vec![
            (
                Kind::PersistentVolumeClaim,
                "tiny-cpu-workspace".to_string()
            ),
            (Kind::ConfigMap, "tiny-cpu-config-warmup-0".to_string()),
            (Kind::Job, "tiny-cpu-warmup-0".to_string()),
        ]
    );
    assert!(plan.delete.is_empty());
    assert_eq!(w.phase(), Phase::WarmUp);
    assert_eq!(w.status().attempt, Some(0));
    assert_eq!(w.status().progress.as_deref(), Some("1/3 warmup"));
    assert_eq!(w.status().observed_generation, Some(1));
    assert_eq!(w.condition(cond::WARMUP_COMPLETE).0, "False");
    assert_eq!(reasons(&plan), vec!["StageStarted", "PhaseChanged"]);
    assert_eq!(plan.events[1].note, "Pending -> WarmUp");
    assert!(!plan.poll_figures);
}

#[test]
fn reconcile_with_nothing_changed_writes_nothing() {
    let mut w = World::new(run_from(TINY));
    w.step();
    let before = w.run.status.clone();
    let again = w.step();
    assert!(again.is_noop(), "{again:#?}");
    assert_eq!(w.run.status, before, "no timestamps rewritten");
    // Same in RL, with the same figures polled twice.
    let mut w = at_rl();
    w.obs.figures = Some(TrainingFigures {
        step: 2,
        total_steps: 4,
        mean_reward: Some(-0.5),
        ..Default::default()
    });
    assert!(w.step().status.is_some());
    let again = w.step();
    assert!(again.is_noop() && again.poll_figures, "{again:#?}");
}

#[test]
fn warmup_success_starts_rl_with_param_servers_and_learners() {
    let mut w = World::new(run_from(TINY));
    w.step();
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    let plan = w.step();
    assert_eq!(
        applied(&plan),
        vec![
            (Kind::ConfigMap, "tiny-cpu-config-rl-0".to_string()),
            (Kind::Service, "tiny-cpu-ps".to_string()),
            (Kind::StatefulSet, "tiny-cpu-ps-0".to_string()),
            (Kind::Job, "tiny-cpu-learner-0".to_string()),
        ]
    );
    assert_eq!(w.phase(), Phase::RL);
    assert_eq!(w.condition(cond::WARMUP_COMPLETE).0, "True");
    let warmup = w.status().stages.warmup.clone().unwrap();
    assert_eq!(
        warmup.artifact.as_deref(),
        // The run's own directory: its name and UID (a re-created run starts afresh).
        Some("/workspace/tiny-cpu-uid1/warmup/final")
    );
    assert!(warmup.completion_time.is_some());
    assert!(plan.poll_figures);
    assert_eq!(
        reasons(&plan),
        vec!["StageSucceeded", "StageStarted", "PhaseChanged"]
    );
    assert_eq!(plan.events[2].note, "WarmUp -> RL");
    // A shard is ready once it serves gRPC.
    let Some(Child::StatefulSet(sts)) = plan
        .apply
        .iter()
        .find(|c| matches!(c, Child::StatefulSet(_)))
    else {
        panic!("no parameter-server StatefulSet")
    };
    let container = &sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let probe = container
        .readiness_probe
        .as_ref()
        .expect("a readiness probe");
    assert_eq!(
        probe.tcp_socket.as_ref().unwrap().port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("rpc".into())
    );
}

#[test]
fn rl_figures_are_copied_into_status() {
    let mut w = at_rl();
    w.obs.figures = Some(TrainingFigures {
        step: 3,
        total_steps: 4,
        mean_reward: Some(0.25),
        ..Default::default()
    });
    let plan = w.step();
    assert_eq!(plan.apply.len() + plan.delete.len(), 0);
    let t = w.status().training.clone().unwrap();
    assert_eq!((t.step, t.total_steps, t.mean_reward), (3, 4, Some(0.25)));
    assert_eq!(w.status().progress.as_deref(), Some("2/3 rl 3/4"));
}

#[test]
fn a_short_rl_stage_never_polled_keeps_its_final_figures_from_the_learners() {
    let mut w = at_rl();
    let last = TrainingFigures {
        step: 8,
        total_steps: 8,
        mean_reward: Some(-0.5),
        solution_term: Some(-0.25),
        kl_term: Some(0.25),
        tokens_per_second: None,
    };
    let mut learner = problem_pod(Stage::Rl, 0, "", "");
    learner.problem = None;
    learner.final_figures = Some(last.clone());
    // A figure of an earlier attempt's learner is not this stage's.
    let mut stale = learner.clone();
    stale.attempt = Some(1);
    stale.final_figures = Some(TrainingFigures {
        step: 9,
        ..last.clone()
    });
    w.obs.pods = vec![stale, learner];
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    w.step();
    assert_eq!(w.phase(), Phase::Distillation);
    let t = w.status().training.clone().expect("final figures");
    assert_eq!(
        (
            t.step,
            t.total_steps,
            t.mean_reward,
            t.solution_term,
            t.kl_term
        ),
        (8, 8, Some(-0.5), Some(-0.25), Some(0.25))
    );
    assert!(w.step().is_noop(), "recorded once");
    // They stay once the learners' pods are gone.
    w.obs.pods.clear();
    assert!(w.step().is_noop());
    assert_eq!(w.status().training.as_ref().map(|t| t.step), Some(8));
}

#[test]
fn a_pod_waiting_for_its_claim_to_bind_is_a_normal_event_not_a_warning() {
    let mut w = at_rl();
    let message = "pod p waits for its volume claim to be bound: 0/250 nodes are available: pod has unbound immediate PersistentVolumeClaims.";
    w.obs.pods = vec![problem_pod(Stage::Rl, 0, "WaitingForVolume", message)];
    let plan = w.step();
    assert_eq!(
        w.condition(cond::RL_COMPLETE),
        ("False".into(), "WaitingForVolume".into(), message.into())
    );
    assert_eq!(
        plan.events
            .iter()
            .map(|e| (e.type_, e.reason.as_str()))
            .collect::<Vec<_>>(),
        vec![(EventType::Normal, "WaitingForVolume")]
    );
}

#[test]
fn rl_success_removes_param_servers_and_starts_one_distill_job_per_student() {
    let yaml = TINY.replace("students: [{name: student, model: {tiny: {seed: 2}}}]", "students: [{name: small, model: {tiny: {seed: 2}}}, {name: big, model: {tiny: {seed: 3, layers: 4}}}]");
    let mut w = World::new(run_from(&yaml));
    w.step();
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    w.step();
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    let plan = w.step();
    assert_eq!(
        plan.delete,
        vec![
            (Kind::StatefulSet, "tiny-cpu-ps-0".to_string()),
            (Kind::Service, "tiny-cpu-ps".to_string())
        ]
    );
    assert_eq!(
        applied(&plan),
        vec![
            (
                Kind::ConfigMap,
                "tiny-cpu-config-distillation-0".to_string()
            ),
            (Kind::Job, "tiny-cpu-distill-small-0".to_string()),
            (Kind::Job, "tiny-cpu-distill-big-0".to_string())
        ]
    );
    assert_eq!(w.phase(), Phase::Distillation);
    assert_eq!(w.status().progress.as_deref(), Some("3/3 distill 0/2"));
    w.set_job("tiny-cpu-distill-big-0", JobState::Complete);
    w.step();
    assert_eq!(w.status().progress.as_deref(), Some("3/3 distill 1/2"));
    assert_eq!(
        w.status()
            .stages
            .distillation
            .as_ref()
            .unwrap()
            .completed_students,
        vec!["big".to_string()]
    );
    w.set_job("tiny-cpu-distill-small-0", JobState::Complete);
    let plan = w.step();
    assert_eq!(w.phase(), Phase::Succeeded);
    assert_eq!(w.condition(cond::SUCCEEDED).0, "True");
    assert_eq!(
        reasons(&plan),
        vec!["StageSucceeded", "Succeeded", "PhaseChanged"]
    );
    assert_eq!(
        w.status()
            .stages
            .distillation
            .as_ref()
            .unwrap()
            .artifact
            .as_deref(),
        Some("/workspace/tiny-cpu-uid1/distill")
    );
}

#[test]
fn succeeded_is_sticky_even_when_children_are_gone() {
    let mut w = at_rl();
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    w.step();
    w.set_job("tiny-cpu-distill-student-0", JobState::Complete);
    w.step();
    assert_eq!(w.phase(), Phase::Succeeded);
    w.obs = Observed::default(); // Jobs expired, ConfigMap deleted by hand...
    let plan = w.step();
    assert!(plan.is_noop(), "{plan:#?}");
    w.bump_spec(|r| r.spec.rl.steps = 1000); // ...or the spec edited afterwards.
    let plan = w.step();
    assert!(plan.apply.is_empty() && plan.delete.is_empty() && plan.events.is_empty());
    assert_eq!(w.phase(), Phase::Succeeded);
}

#[test]
fn after_its_ttl_a_finished_run_loses_its_children_but_not_its_workspace() {
    let mut w = at_rl();
    w.bump_spec(|r| r.spec.ttl_seconds_after_finished = Some(60));
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    w.step();
    w.set_job("tiny-cpu-distill-student-0", JobState::Complete);
    let plan = w.step(); // Succeeded at t = 40 (every step is 10 s)
    assert_eq!(w.phase(), Phase::Succeeded);
    assert_eq!(plan.requeue_after, Some(std::time::Duration::from_secs(60)));
    assert!(plan.delete.is_empty());
    let plan = w.step(); // 10 s later: 50 s to go
    assert_eq!(plan.requeue_after, Some(std::time::Duration::from_secs(50)));
    assert!(plan.is_noop(), "{plan:#?}");
    for _ in 0..4 {
        w.step();
    }
    let plan = w.step(); // t = 100: due
    let mut deleted: Vec<Kind> = plan.delete.iter().map(|(k, _)| *k).collect();
    deleted.sort_by_key(|k| format!("{k:?}"));
    deleted.dedup();
    assert_eq!(
        deleted,
        vec![Kind::ConfigMap, Kind::Job],
        "{:?}",
        plan.delete
    );
    assert!(!plan
        .delete
        .iter()
        .any(|(k, _)| *k == Kind::PersistentVolumeClaim));
    assert_eq!(reasons(&plan), vec!["ChildrenDeleted"]);
    assert_eq!(w.phase(), Phase::Succeeded);
    // Gone: nothing more to do, and nothing is recreated.
    assert!(w.step().is_noop());
    assert!(w
        .obs
        .children
        .iter()
        .all(|c| c.kind == Kind::PersistentVolumeClaim));
}

#[test]
fn failed_attempts_are_retried_up_to_the_policy_then_the_run_fails() {
    let mut w = World::new(run_from(TINY)); // failurePolicy.retries defaults to 2
    w.step();
    for attempt in 0..2u32 {
        let job = format!("tiny-cpu-warmup-{attempt}");
        w.obs.pods = vec![problem_pod(
            Stage::Warmup,
            attempt,
            "OOMKilled",
            "pod p: the trainer was OOMKilled (exit code 137): raise its memory limit",
        )];
        w.set_job(&job, fail("BackoffLimitExceeded"));
        let plan = w.step();
        let next = format!("tiny-cpu-warmup-{}", attempt + 1);
        assert!(
            plan.delete.is_empty(),
            "the failed Job is kept for its logs"
        );
        let config = format!("tiny-cpu-config-warmup-{}", attempt + 1);
        assert_eq!(
            applied(&plan),
            vec![(Kind::ConfigMap, config), (Kind::Job, next)]
        );
        let (status, reason, message) = w.condition(cond::WARMUP_COMPLETE);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Retrying"));
        assert!(
            message.contains("OOMKilled")
                && message.contains(&format!("retrying as attempt {}", attempt + 1)),
            "{message}"
        );
        assert_eq!(plan.events[0].type_, EventType::Warning);
        assert_eq!(w.status().attempt, Some(attempt + 1));
        assert_eq!(w.phase(), Phase::WarmUp);
    }
    w.obs.pods = vec![];
    w.set_job("tiny-cpu-warmup-2", fail("BackoffLimitExceeded"));
    let plan = w.step();
    assert!(plan.apply.is_empty());
    assert_eq!(w.phase(), Phase::Failed);
    assert_eq!(w.status().reason.as_deref(), Some("WarmUpFailed"));
    let (status, reason, message) = w.condition(cond::FAILED);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "WarmUpFailed"));
    assert!(
        message.contains("job tiny-cpu-warmup-2 failed: BackoffLimitExceeded"),
        "{message}"
    );
    assert_eq!(reasons(&plan), vec!["WarmUpFailed", "PhaseChanged"]);
    // Sticky: nothing is recreated, even with the failed Job gone.
    w.obs.jobs.clear();
    w.obs.children.retain(|c| c.kind != Kind::Job);
    assert!(w.step().is_noop());
}

#[test]
fn failed_rl_stops_the_param_servers() {
    let mut w = at_rl();
    w.bump_spec(|r| r.spec.failure_policy.retries = 0);
    w.step();
    w.set_job("tiny-cpu-learner-0", fail("BackoffLimitExceeded"));
    let plan = w.step();
    assert_eq!(w.phase(), Phase::Failed);
    assert!(plan
        .delete
        .contains(&(Kind::StatefulSet, "tiny-cpu-ps-0".to_string())));
    assert_eq!(w.condition(cond::FAILED).1, "RLFailed");
}

#[test]
fn pod_problems_are_lifted_into_the_condition_and_an_event_once() {
    for (reason, message) in [
        (
            "ImagePullBackOff",
            "pod p: ImagePullBackOff: Back-off pulling image \"rlt-trainer:cpu\"",
        ),
        (
            "Unschedulable",
            "pod p cannot be scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
        ),
        ("CrashLoopBackOff", "pod p: CrashLoopBackOff"),
    ] {
        let mut w = at_rl();
        w.obs.pods = vec![problem_pod(Stage::Rl, 0, reason, message)];
        let plan = w.step();
        assert_eq!(
            w.condition(cond::RL_COMPLETE),
            ("False".into(), reason.into(), message.into())
        );
        assert_eq!(
            w.status().reason.as_deref(),
            Some(reason),
            "the REASON column"
        );
        assert_eq!(plan.events.len(), 1);
        assert_eq!(
            (
                plan.events[0].type_,
                plan.events[0].reason.as_str(),
                plan.events[0].note.as_str()
            ),
            (EventType::Warning, reason, message)
        );
        assert!(w.step().is_noop(), "the same problem is reported once");
        w.obs.pods.clear();
        w.step();
        assert_eq!(w.condition(cond::RL_COMPLETE).1, "Running");
    }
}

#[test]
fn suspend_stops_the_stage_and_resume_continues_as_a_new_attempt_with_new_templates() {
    let mut w = at_rl();
    w.bump_spec(|r| r.spec.suspend = true);
    let plan = w.step();
    assert_eq!(
        plan.delete,
        vec![
            (Kind::Job, "tiny-cpu-learner-0".to_string()),
            (Kind::StatefulSet, "tiny-cpu-ps-0".to_string())
        ]
    );
    assert!(plan.apply.is_empty());
    assert_eq!(w.phase(), Phase::Suspended);
    assert_eq!(w.condition(cond::SUSPENDED).0, "True");
    assert!(!plan.poll_figures);
    assert!(w.step().is_noop());

    // Kueue admits the run on other nodes: the pod templates change while suspended.
    w.bump_spec(|r| {
        r.spec.suspend = false;
        r.spec
            .rl
            .scheduling
            .node_selector
            .insert("pool".into(), "gpu-b".into());
    });
    let plan = w.step();
    assert_eq!(w.phase(), Phase::RL);
    assert_eq!(w.condition(cond::SUSPENDED).1, "Resumed");
    assert_eq!(w.status().stages.rl.as_ref().unwrap().attempt, 1);
    assert_eq!(
        w.status().stages.rl.as_ref().unwrap().failures,
        0,
        "a resume is not a failure"
    );
    let job = plan.apply.iter().find_map(|c| match c {
        Child::Job(j) => Some(j.clone()),
        _ => None,
    });
    let job = job.expect("a new learner Job");
    assert_eq!(job.metadata.name.as_deref(), Some("tiny-cpu-learner-1"));
    let pod = job.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.node_selector.unwrap()["pool"], "gpu-b");
    assert!(applied(&plan).contains(&(Kind::StatefulSet, "tiny-cpu-ps-1".to_string())));
    assert!(reasons(&plan).contains(&"Resumed"));
}

#[test]
fn suspended_before_start_creates_no_pods_and_resumes_at_attempt_zero() {
    let mut run = run_from(TINY);
    run.spec.suspend = true;
    let mut w = World::new(run);
    let plan = w.step();
    assert!(!applied(&plan).iter().any(|(k, _)| *k == Kind::Job));
    assert_eq!(w.phase(), Phase::Suspended);
    w.bump_spec(|r| r.spec.suspend = false);
    let plan = w.step();
    assert_eq!(
        applied(&plan),
        vec![
            (Kind::ConfigMap, "tiny-cpu-config-warmup-0".to_string()),
            (Kind::Job, "tiny-cpu-warmup-0".to_string())
        ]
    );
}

#[test]
fn skipped_stages_start_rl_from_the_teacher_and_stop_after_rl() {
    let yaml = TINY
        .replace(
            "warmup: {epochs: 1, batchSize: 4, maxLength: 256}",
            "warmup: {enabled: false}",
        )
        .replace("  distillation:\n", "  distillation:\n    enabled: false\n");
    let mut w = World::new(run_from(&yaml));
    let plan = w.step();
    assert!(applied(&plan).contains(&(Kind::Job, "tiny-cpu-learner-0".to_string())));
    assert!(!applied(&plan).iter().any(|(_, n)| n.contains("warmup")));
    assert_eq!(w.condition(cond::WARMUP_COMPLETE).1, "Skipped");
    assert_eq!(w.phase(), Phase::RL);
    assert_eq!(w.status().progress.as_deref(), Some("1/1 rl"));
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    let plan = w.step();
    assert_eq!(w.phase(), Phase::Succeeded);
    assert!(plan.apply.is_empty());
    assert_eq!(w.condition(cond::DISTILLATION_COMPLETE).1, "Skipped");
}

#[test]
fn invalid_spec_is_a_condition_not_a_crash_and_creates_nothing() {
    let mut run = run_from(TINY);
    run.spec.env.push(k8s_openapi::api::core::v1::EnvVar {
        name: "RLT_ATTEMPT".into(),
        value: Some("7".into()),
        ..Default::default()
    });
    let mut w = World::new(run);
    let plan = w.step();
    assert!(plan.apply.is_empty());
    let (status, reason, message) = w.condition(cond::INVALID_SPEC);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(
        message.starts_with("spec.env[0].name: RLT_ATTEMPT is set by the operator"),
        "{message}"
    );
    // `kubectl get rltruns` says so: PHASE Invalid, REASON InvalidSpec.
    assert_eq!(w.phase(), Phase::Invalid);
    assert_eq!(w.status().reason.as_deref(), Some("InvalidSpec"));
    assert_eq!(plan.events[0].type_, EventType::Warning);
    assert!(w.step().is_noop());
    // Fixing the spec proceeds.
    w.bump_spec(|r| r.spec.env.clear());
    let plan = w.step();
    assert!(applied(&plan).contains(&(Kind::Job, "tiny-cpu-warmup-0".to_string())));
    assert_eq!(w.condition(cond::INVALID_SPEC).0, "False");
    assert_eq!(w.status().reason, None);
}

/// The configuration a pod reads: its attempt's snapshot.
fn config_of(plan: &Plan, name: &str) -> RltRun {
    let cm = plan
        .apply
        .iter()
        .find_map(|c| match c {
            Child::ConfigMap(cm) if cm.metadata.name.as_deref() == Some(name) => Some(cm),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{name} not applied: {plan:#?}"));
    assert_eq!(cm.immutable, Some(true));
    rlt_api::parse_yaml(&cm.data.as_ref().unwrap()[rlt_api::contract::CONFIG_FILE]).unwrap()
}

#[test]
fn each_attempt_reads_its_own_snapshot_and_an_edit_never_reaches_a_running_one() {
    let mut w = World::new(run_from(TINY));
    let first = w.step();
    assert_eq!(
        config_of(&first, "tiny-cpu-config-warmup-0").spec.image,
        "rlt-trainer:cpu"
    );
    // An edit the API server would refuse mid-run (CEL) still writes nothing here.
    w.bump_spec(|r| r.spec.warmup.epochs = 2);
    assert!(applied(&w.step()).is_empty());
    // Suspended, the image may change; resuming is attempt 1 with its own snapshot, and the
    // old one goes.
    w.bump_spec(|r| r.spec.suspend = true);
    w.step();
    w.bump_spec(|r| {
        r.spec.suspend = false;
        r.spec.image = "rlt-trainer:v2".into();
    });
    let plan = w.step();
    assert_eq!(
        config_of(&plan, "tiny-cpu-config-warmup-1").spec.image,
        "rlt-trainer:v2"
    );
    assert!(applied(&plan).contains(&(Kind::Job, "tiny-cpu-warmup-1".to_string())));
    // The suspended attempt's Job was deleted, so its snapshot goes too.
    assert_eq!(
        plan.delete,
        vec![(Kind::ConfigMap, "tiny-cpu-config-warmup-0".to_string())]
    );
    assert!(w.step().is_noop(), "a snapshot is written once");
}

#[test]
fn the_parameter_server_set_is_created_once_per_attempt() {
    let mut w = at_rl();
    assert!(w
        .obs
        .children
        .iter()
        .any(|c| c.kind == Kind::StatefulSet && c.name == "tiny-cpu-ps-0"));
    // A run label edit (metadata: allowed mid-run) changes the set's template, which is not
    // re-applied under running learners.
    w.run
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("team".into(), "b".into());
    let plan = w.step();
    assert!(
        !applied(&plan).iter().any(|(k, _)| *k == Kind::StatefulSet),
        "{plan:#?}"
    );
}

#[test]
fn a_deleted_running_job_is_recreated_with_the_same_name() {
    let mut w = World::new(run_from(TINY));
    w.step();
    w.obs.jobs.clear();
    w.obs.children.retain(|c| c.kind != Kind::Job);
    let plan = w.step();
    assert_eq!(
        applied(&plan),
        vec![(Kind::Job, "tiny-cpu-warmup-0".to_string())]
    );
    assert!(plan.status.is_none() && plan.events.is_empty());
}

#[test]
fn a_lost_status_write_is_recovered_without_duplicates() {
    // The operator created the Job, then died before writing status.
    let mut w = World::new(run_from(TINY));
    let first = w.step();
    w.run.status = None;
    let plan = w.step();
    assert!(plan.apply.is_empty(), "{:?}", applied(&plan));
    assert_eq!(
        plan.status,
        first.status.map(|mut s| {
            s.stages.warmup.as_mut().unwrap().start_time = Some(at(20));
            s.conditions
                .iter_mut()
                .for_each(|c| c.last_transition_time = at(20));
            s
        })
    );
}

fn live_pod(stage: Stage, attempt: u32) -> PodRef {
    PodRef {
        name: format!("pod-{attempt}"),
        stage: Some(stage),
        attempt: Some(attempt),
        student: None,
    }
}

#[test]
fn a_retry_keeps_the_failed_job_and_starts_the_next_attempt_once_its_pods_are_gone() {
    let mut w = World::new(run_from(TINY));
    w.step();
    w.set_job("tiny-cpu-warmup-0", fail("BackoffLimitExceeded"));
    // The Job failed but one of its pods is still terminating.
    w.activity.live = vec![live_pod(Stage::Warmup, 0)];
    let plan = w.step();
    let st = w.status().stages.warmup.clone().unwrap();
    assert_eq!((st.attempt, st.failures), (1, 1), "the retry is recorded");
    assert!(plan.apply.is_empty() && plan.delete.is_empty(), "{plan:#?}");
    assert_eq!(w.condition(cond::WARMUP_COMPLETE).1, "Retrying");
    // Still there: nothing more to do, the condition keeps saying why.
    assert!(w.step().is_noop());
    // Gone: the next attempt starts; the failed Job stays (owner references delete it).
    w.activity.live.clear();
    let plan = w.step();
    assert_eq!(
        applied(&plan),
        vec![
            (Kind::ConfigMap, "tiny-cpu-config-warmup-1".to_string()),
            (Kind::Job, "tiny-cpu-warmup-1".to_string())
        ]
    );
    assert!(plan.delete.is_empty());
    assert!(w.obs.job("tiny-cpu-warmup-0").is_some());
    assert_eq!(w.status().stages.warmup.as_ref().unwrap().failures, 1);
}

#[test]
fn a_stale_status_never_deletes_a_later_attempt_nor_recreates_an_earlier_one() {
    let mut w = World::new(run_from(TINY));
    w.step();
    w.set_job("tiny-cpu-warmup-0", fail("BackoffLimitExceeded"));
    w.step();
    let stale = w.run.clone(); // a cache that still holds attempt 1's status
    w.set_job("tiny-cpu-warmup-1", fail("BackoffLimitExceeded"));
    w.step();
    assert_eq!(
        w.obs.job("tiny-cpu-warmup-2").map(|j| &j.state),
        Some(&JobState::Running)
    );
    // It would record attempt 1's failure again (the controller's resourceVersion-conditional
    // status write refuses that), but it neither recreates attempt 1 nor touches attempt 2.
    let plan = reconcile(&stale, &w.obs, &at(100));
    assert!(plan.apply.is_empty() && plan.delete.is_empty(), "{plan:#?}");
    assert!(plan.status.is_some(), "a status write, to be fenced");
}

#[test]
fn a_bad_configuration_fails_the_run_without_retrying() {
    let mut w = World::new(run_from(TINY));
    w.step();
    w.obs.pods = vec![problem_pod(
        Stage::Warmup,
        0,
        "Error",
        "pod p: the trainer exited with code 2: spec.dataset.path: no dataset file at /workspace/x",
    )];
    w.activity.bad_config = vec![live_pod(Stage::Warmup, 0)];
    w.set_job("tiny-cpu-warmup-0", fail("PodFailurePolicy"));
    let plan = w.step();
    assert!(plan.apply.is_empty());
    assert_eq!(w.phase(), Phase::Failed);
    let (_, reason, message) = w.condition(cond::FAILED);
    assert_eq!(reason, "WarmUpFailed");
    assert!(
        message.contains("no dataset file") && message.contains("not retried"),
        "{message}"
    );
}

#[test]
fn a_job_that_cannot_create_its_pods_is_lifted_into_the_condition_and_an_event() {
    let mut w = World::new(run_from(TINY));
    w.step();
    let quota = "pods \"tiny-cpu-warmup-0-0-x\" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1";
    w.activity.failed_create = vec![("tiny-cpu-warmup-0".into(), quota.into())];
    let plan = w.step();
    let (status, reason, message) = w.condition(cond::WARMUP_COMPLETE);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "FailedCreate")
    );
    assert_eq!(
        message,
        format!("job tiny-cpu-warmup-0 cannot create its pods: {quota}")
    );
    assert_eq!(reasons(&plan), vec!["FailedCreate"]);
    assert_eq!(plan.events[0].type_, EventType::Warning);
    assert!(w.step().is_noop(), "reported once");
}

/// A `stage` pod of attempt 0 whose trainer exited with `code`, as the kubelet reports it.
fn failed_pod(
    stage: Stage,
    name: &str,
    code: i32,
    message: &str,
) -> k8s_openapi::api::core::v1::Pod {
    // A Job's pod is `<job>-<index>-<suffix>`, labelled with its Job by the Job controller.
    let job = name.rsplitn(3, '-').nth(2).unwrap();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name,
            "labels": {"rlt.dev/run": "tiny-cpu", "rlt.dev/stage": stage.label(), "rlt.dev/attempt": "0",
                "batch.kubernetes.io/job-name": job}},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {
            "reason": "Error", "exitCode": code, "message": message}}}]}
    }))
    .unwrap()
}

#[test]
fn the_trainers_termination_message_reaches_the_condition_and_the_event() {
    let mut w = World::new(run_from(TINY));
    w.run.spec.failure_policy.retries = 0;
    w.step();
    let pod = failed_pod(
        Stage::Warmup,
        "tiny-cpu-warmup-0-0-abcde",
        1,
        "loading the teacher: /workspace/tiny-cpu/inputs/models/x/model.safetensors: unexpected end of file",
    );
    w.obs.pods = vec![rlt_operator::observe::pod(&pod)];
    w.set_job("tiny-cpu-warmup-0", fail("BackoffLimitExceeded"));
    let plan = w.step();
    let (_, _, message) = w.condition(cond::FAILED);
    let lifted = "the trainer exited with code 1: loading the teacher: /workspace/tiny-cpu/inputs/models/x/model.safetensors: unexpected end of file";
    assert!(message.contains(lifted), "{message}");
    assert!(plan.events[0].note.contains(lifted), "{:?}", plan.events[0]);
}

#[test]
fn distinct_transitions_have_distinct_event_actions_and_notes_fit_the_api_limit() {
    let mut w = World::new(run_from(TINY));
    let long = "\u{e9}".repeat(2000); // 4000 bytes of two-byte characters
    let mut retrying = Vec::new();
    w.step();
    for attempt in 0..2u32 {
        w.obs.pods = vec![problem_pod(Stage::Warmup, attempt, "Error", &long)];
        w.set_job(
            &format!("tiny-cpu-warmup-{attempt}"),
            fail("BackoffLimitExceeded"),
        );
        let plan = w.step();
        let ev = plan.events.iter().find(|e| e.reason == "Retrying").unwrap();
        assert!(ev.note.len() <= NOTE_MAX, "{}", ev.note.len());
        assert!(ev.note.ends_with('\u{2026}'));
        retrying.push(ev.action.clone());
    }
    assert_eq!(retrying, ["WarmUpAttempt1", "WarmUpAttempt2"]);
    // Every Event has an action within the API's limit.
    let mut w = at_rl();
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    let plan = w.step();
    let actions: Vec<(&str, &str)> = plan
        .events
        .iter()
        .map(|e| (e.reason.as_str(), e.action.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("StageSucceeded", "RLAttempt0"),
            ("StageStarted", "DistillationAttempt0"),
            ("PhaseChanged", "ToDistillation")
        ]
    );
}

#[test]
fn a_refused_child_write_degrades_the_run_until_a_reconcile_writes_them_all() {
    let mut w = World::new(run_from(TINY));
    w.step();
    let status = w.status().clone();
    let rejected = Rejection {
        kind: Kind::Job,
        name: "tiny-cpu-warmup-0".into(),
        reason: "ChildRejected",
        message: "Job ml/tiny-cpu-warmup-0 was refused: 403 Forbidden: jobs.batch is forbidden"
            .into(),
    };
    let (new, events) =
        record_child_writes(&w.run, &status, std::slice::from_ref(&rejected), &at(99));
    let new = new.expect("Degraded set");
    let c = new.conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
        ("True", "ChildRejected", rejected.message.as_str())
    );
    assert_eq!(
        (new.phase, new.reason.as_deref()),
        (Some(Phase::Blocked), Some("ChildRejected"))
    );
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].type_, events[0].action.as_str()),
        (EventType::Warning, "ApplyJob/tiny-cpu-warmup-0")
    );
    // The same refusal again: nothing new to say.
    assert_eq!(
        record_child_writes(&w.run, &new, &[rejected], &at(100)),
        (None, vec![])
    );
    // All writes went through: cleared.
    let (cleared, events) = record_child_writes(&w.run, &new, &[], &at(101));
    let cleared = cleared.unwrap();
    let c = cleared
        .conditions
        .iter()
        .find(|c| c.type_ == DEGRADED)
        .unwrap();
    assert_eq!(c.status, "False");
    assert_eq!(cleared.phase, status.phase);
    assert!(events.is_empty());
    // Never degraded: no write at all.
    assert_eq!(
        record_child_writes(&w.run, &status, &[], &at(102)),
        (None, vec![])
    );
}

#[test]
fn a_failed_rl_attempt_gets_new_param_servers_never_a_rolling_update_of_the_old() {
    let mut w = at_rl();
    w.set_job("tiny-cpu-learner-0", fail("BackoffLimitExceeded"));
    let plan = w.step();
    assert_eq!(w.status().stages.rl.as_ref().unwrap().attempt, 1);
    // The old shards go as a whole; the new attempt's are a new set with new addresses.
    assert!(plan
        .delete
        .contains(&(Kind::StatefulSet, "tiny-cpu-ps-0".to_string())));
    assert!(!plan
        .delete
        .contains(&(Kind::Service, "tiny-cpu-ps".to_string())));
    assert!(applied(&plan).contains(&(Kind::StatefulSet, "tiny-cpu-ps-1".to_string())));
    let learners = plan
        .apply
        .iter()
        .find_map(|c| match c {
            Child::Job(j) if j.metadata.name.as_deref() == Some("tiny-cpu-learner-1") => {
                Some(j.clone())
            }
            _ => None,
        })
        .expect("the new attempt's learners");
    let env = learners.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let servers = env.iter().find(|e| e.name == "RLT_PARAM_SERVERS").unwrap();
    assert_eq!(
        servers.value.as_deref(),
        Some("tiny-cpu-ps-1-0.tiny-cpu-ps.ml.svc:50051")
    );
    let again = w.step();
    assert!(
        again.apply.is_empty() && again.delete.is_empty(),
        "the new set is left alone: {again:#?}"
    );
}

/// Fails `job` (of `stage`, attempt 0) the way a trainer that exited 2 with `refusal` does;
/// the next plan and the run's Failed condition (reason, message), once it failed.
fn refused(w: &mut World, stage: Stage, job: &str, refusal: &str) -> (Plan, String, String) {
    let pod = failed_pod(stage, &format!("{job}-0-abcde"), 2, refusal);
    w.obs.pods = vec![rlt_operator::observe::pod(&pod)];
    w.activity = Activity::from_pods(&[pod]);
    w.set_job(job, fail("PodFailurePolicy"));
    let plan = w.step();
    assert_eq!(w.phase(), Phase::Failed);
    let (_, reason, message) = w.condition(cond::FAILED);
    (plan, reason, message)
}

#[test]
fn a_memory_preflight_refusal_fails_the_run_at_once_naming_the_fields_to_change() {
    // What `rlt-trainer warmup` writes to its termination log and exits 2 with when the stage
    // cannot fit its GPUs (trainer/src/train/memory.rs), as the kubelet reports it.
    let refusal = "memory preflight: warm-up needs about 96.4 GiB per GPU (80.0 GiB available) \
                   for a 7.6B-parameter model at maxLength 16384 with 1 rank; raise \
                   warmup.replicas (or the GPUs per pod) to 4, or lower warmup.maxLength";
    let mut w = World::new(run_from(TINY));
    assert!(w.run.spec.failure_policy.retries > 0, "retries are left");
    w.step();
    let (plan, reason, message) = refused(&mut w, Stage::Warmup, "tiny-cpu-warmup-0", refusal);
    assert!(plan.apply.is_empty(), "no new attempt");
    assert_eq!(reason, "WarmUpFailed");
    for part in [
        "warmup.replicas",
        "warmup.maxLength",
        "96.4 GiB",
        "not retried",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert!(plan
        .events
        .iter()
        .any(|e| e.note.contains("warmup.replicas")));
}

#[test]
fn a_learner_memory_refusal_fails_rl_at_once_naming_the_fields_to_change() {
    // What `rlt-trainer learner` writes to its termination log and exits 2 with when a
    // learner cannot fit its GPU (trainer/src/train/memory.rs: learner_preflight).
    let refusal = "memory preflight: an RL learner needs about 97.2 GiB per GPU (79.6 GiB \
                   available) for a 7.6B-parameter teacher and a 7.6B-parameter student with \
                   sequences up to 17408 tokens, one at a time: weights 42.6, gradients 14.2, \
                   optimizer 0.0, activations 31.4, logits 6.5 GiB; set \
                   rl.activationCheckpointing: true, or lower rl.maxNewTokens to 4096";
    let mut w = at_rl();
    let (plan, reason, message) = refused(&mut w, Stage::Rl, "tiny-cpu-learner-0", refusal);
    assert_eq!(reason, "RLFailed");
    for part in [
        "an RL learner needs about 97.2 GiB",
        "rl.activationCheckpointing: true",
        "rl.maxNewTokens",
        "not retried",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert!(
        plan.delete
            .contains(&(Kind::StatefulSet, "tiny-cpu-ps-0".to_string())),
        "the parameter servers go: {plan:#?}"
    );
}

/// A pod holding `gpus` GPUs from `started` to `finished` (seconds of the world's clock).
fn gpu_pod(
    stage: Stage,
    attempt: u32,
    gpus: u32,
    started: i64,
    finished: Option<i64>,
) -> ObservedPod {
    ObservedPod {
        name: format!("{}-{attempt}", stage.label()),
        stage: Some(stage),
        attempt: Some(attempt),
        gpus,
        started: Some(at(started)),
        finished: finished.map(at),
        ..Default::default()
    }
}

#[test]
fn gpu_hours_add_up_over_attempts_and_stages() {
    let mut w = World::new(run_from(TINY));
    w.step();
    let warmup = |w: &World| w.status().stages.warmup.clone().unwrap();
    assert_eq!(warmup(&w).gpu_hours, Some(0.0));
    // Attempt 0 fails after half an hour on 2 GPUs: 1 GPU-hour, recorded as it ends.
    w.obs.pods = vec![gpu_pod(Stage::Warmup, 0, 2, 0, Some(1800))];
    w.set_job("tiny-cpu-warmup-0", fail("BackoffLimitExceeded"));
    w.step();
    let st = warmup(&w);
    assert_eq!(
        (st.gpu_hours, st.ended_attempts_gpu_hours),
        (Some(1.0), Some(1.0))
    );
    assert_eq!(w.status().gpu_hours, Some(1.0));
    // Attempt 1 on 4 GPUs: 40 s in, its share is not worth a write yet...
    let start = w.clock;
    w.obs.pods.push(gpu_pod(Stage::Warmup, 1, 4, start, None));
    w.step();
    w.step();
    assert!(
        w.step().is_noop(),
        "a share below 0.1 GPU-hours is not written"
    );
    assert_eq!(warmup(&w).gpu_hours, Some(1.0));
    // ... an hour in, it is (4 GPU-hours so far, plus the first attempt's).
    w.obs.pods = vec![gpu_pod(Stage::Warmup, 1, 4, w.clock + 10 - 3600, None)];
    w.step();
    assert_eq!(warmup(&w).gpu_hours, Some(5.0));
    assert_eq!(warmup(&w).ended_attempts_gpu_hours, Some(1.0));
    // It ends after 1.5 h: exact, and RL's pods add to the run's total.
    let end = w.clock + 1800;
    w.obs.pods = vec![gpu_pod(Stage::Warmup, 1, 4, end - 5400, Some(end))];
    w.set_job("tiny-cpu-warmup-1", JobState::Complete);
    w.step();
    assert_eq!(warmup(&w).gpu_hours, Some(7.0));
    w.obs.pods = vec![gpu_pod(Stage::Rl, 0, 8, w.clock + 10 - 900, None)];
    w.step();
    assert_eq!(w.status().stages.rl.clone().unwrap().gpu_hours, Some(2.0));
    assert_eq!(w.status().gpu_hours, Some(9.0));
}

// Kueue: admission of whole stages (rlt_operator::kueue).

fn queued(yaml: &str, queue: Option<&str>) -> World {
    let mut run = run_from(yaml);
    if let Some(q) = queue {
        run.metadata.labels =
            Some([("kueue.x-k8s.io/queue-name".to_string(), q.to_string())].into());
    }
    let mut w = World::new(run);
    let gpu = Placement {
        node_labels: [("rlt.dev/pool".to_string(), "gpu".to_string())].into(),
        tolerations: vec![serde_json::from_value(serde_json::json!(
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ))
        .unwrap()],
    };
    w.obs.fleet = Fleet {
        installed: true,
        default_queue: false,
        flavors: [("gpu".to_string(), gpu)].into(),
        priorities: [("high".to_string(), 1000)].into(),
    };
    w
}

impl World {
    fn set_workload(&mut self, name: &str, state: State) {
        let w = self
            .obs
            .workloads
            .iter_mut()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"));
        w.state = state;
    }

    fn admit(&mut self, name: &str, pod_sets: &[&str]) {
        let placements = pod_sets
            .iter()
            .map(|s| (s.to_string(), self.obs.fleet.flavors["gpu"].clone()))
            .collect();
        self.set_workload(name, State::Admitted { placements });
    }
}

fn job_of(plan: &Plan, name: &str) -> k8s_openapi::api::batch::v1::Job {
    plan.apply
        .iter()
        .find_map(|c| match c {
            Child::Job(j) if j.metadata.name.as_deref() == Some(name) => Some(j.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no job {name} in {:?}", applied(plan)))
}

#[test]
fn a_queued_run_creates_its_stage_workload_and_no_pods_until_admitted() {
    let mut w = queued(TINY, Some("team"));
    let plan = w.step();
    assert_eq!(
        applied(&plan),
        vec![
            (
                Kind::PersistentVolumeClaim,
                "tiny-cpu-workspace".to_string()
            ),
            (Kind::Workload, "tiny-cpu-warmup".to_string()),
        ],
        "the Workload only: no Job, no configuration"
    );
    let Child::Workload(wl) = &plan.apply[1] else {
        panic!()
    };
    assert_eq!(wl.spec.queue_name, "team");
    assert_eq!(wl.spec.pod_sets.len(), 1);
    assert_eq!(wl.spec.pod_sets[0].name, "trainers");
    let labels = wl.metadata.labels.as_ref().unwrap();
    assert!(
        !labels.keys().any(|k| k.starts_with("kueue.x-k8s.io/")),
        "{labels:?}"
    );
    assert_eq!(w.phase(), Phase::Queued);
    assert_eq!(w.status().reason.as_deref(), Some("Queued"));
    assert_eq!(w.status().progress.as_deref(), Some("1/3 warmup queued"));
    assert!(w
        .status()
        .stages
        .warmup
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .is_none());
    // Kueue says why it waits: the condition carries it, and nothing else is written.
    w.step();
    assert!(w
        .condition(cond::WARMUP_COMPLETE)
        .2
        .contains("insufficient quota"));
    assert!(w.step().is_noop());

    // Admitted: the stage starts, its pods placed on the flavor's nodes.
    w.admit("tiny-cpu-warmup", &["trainers"]);
    let plan = w.step();
    assert_eq!(w.phase(), Phase::WarmUp);
    let job = job_of(&plan, "tiny-cpu-warmup-0");
    let template = job.spec.unwrap().template;
    let spec = template.spec.unwrap();
    assert_eq!(spec.node_selector.unwrap()["rlt.dev/pool"], "gpu");
    assert_eq!(
        spec.tolerations.unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    let labels = template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels["kueue.x-k8s.io/podset"], "trainers");
    assert!(
        !labels.contains_key("kueue.x-k8s.io/queue-name"),
        "a child never carries the queue"
    );
    assert!(!job
        .metadata
        .labels
        .unwrap()
        .contains_key("kueue.x-k8s.io/queue-name"));

    // Done: the Workload is Finished (its quota freed), RL queues its own.
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    let plan = w.step();
    assert_eq!(
        plan.workload_writes,
        vec![StatusWrite::Finish {
            name: "tiny-cpu-warmup".into(),
            succeeded: true,
            message: "warmup succeeded".into()
        }]
    );
    assert!(applied(&plan).contains(&(Kind::Workload, "tiny-cpu-rl".to_string())));
    assert!(!applied(&plan)
        .iter()
        .any(|(k, _)| *k == Kind::Job || *k == Kind::StatefulSet));
    assert_eq!(w.phase(), Phase::Queued);
}

#[test]
fn rl_is_one_unit_of_parameter_servers_and_learners_each_placed_by_its_pod_set() {
    let mut w = queued(TINY, Some("team"));
    w.step();
    w.admit("tiny-cpu-warmup", &["trainers"]);
    w.step();
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    let plan = w.step();
    let Child::Workload(wl) = plan
        .apply
        .iter()
        .find(|c| c.kind() == Kind::Workload)
        .unwrap()
    else {
        panic!()
    };
    let sets: Vec<(&str, i32)> = wl
        .spec
        .pod_sets
        .iter()
        .map(|p| (p.name.as_str(), p.count))
        .collect();
    assert_eq!(sets, vec![("param-servers", 1), ("learners", 1)]);
    // Only the learners' pod set has a flavor with node labels here.
    w.set_workload(
        "tiny-cpu-rl",
        State::Admitted {
            placements: [
                ("param-servers".to_string(), Placement::default()),
                ("learners".to_string(), w.obs.fleet.flavors["gpu"].clone()),
            ]
            .into(),
        },
    );
    let plan = w.step();
    let set = plan
        .apply
        .iter()
        .find_map(|c| match c {
            Child::StatefulSet(s) => Some(s.clone()),
            _ => None,
        })
        .expect("the parameter servers start with the learners");
    let ps = set.spec.unwrap().template.spec.unwrap();
    assert!(ps.node_selector.is_none());
    let learners = job_of(&plan, "tiny-cpu-learner-0")
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert_eq!(learners.node_selector.unwrap()["rlt.dev/pool"], "gpu");
    assert_eq!(w.phase(), Phase::RL);
}

#[test]
fn an_eviction_stops_the_attempt_gives_the_quota_back_and_resumes_without_a_failure() {
    let mut w = queued(TINY, Some("team"));
    w.step();
    w.admit("tiny-cpu-warmup", &["trainers"]);
    w.step();
    // Preempted: Kueue sets Evicted while the pods still run.
    w.activity.live = vec![live_pod(Stage::Warmup, 0)];
    let evicted = State::Evicted {
        since: at(25),
        reason: "Preempted".into(),
        message: "Preempted to accommodate a workload".into(),
        holds_quota: true,
    };
    w.set_workload("tiny-cpu-warmup", evicted);
    let plan = w.step();
    let st = w.status().stages.warmup.clone().unwrap();
    assert_eq!((st.attempt, st.failures, st.evictions), (1, 0, 1));
    assert_eq!(st.last_eviction_time, Some(at(25)));
    assert_eq!(
        plan.delete,
        vec![(Kind::Job, "tiny-cpu-warmup-0".to_string())]
    );
    assert!(
        plan.workload_writes.is_empty(),
        "the quota is held until the pods are gone"
    );
    assert!(reasons(&plan).contains(&"Evicted"));
    assert_eq!(w.phase(), Phase::Queued);
    assert!(w.condition(cond::WARMUP_COMPLETE).2.contains("Preempted"));
    // The same eviction seen again is not counted again (the attempt's snapshot goes with
    // its Job).
    let again = w.step();
    assert!(
        again.status.is_none() && again.events.is_empty(),
        "{again:#?}"
    );
    assert!(again.workload_writes.is_empty() && again.apply.is_empty());
    assert!(w.step().is_noop());
    // The pods are gone: the reservation is given back (Requeued, as Kueue's jobs do).
    w.activity.live.clear();
    let plan = w.step();
    assert_eq!(
        plan.workload_writes,
        vec![StatusWrite::Requeue {
            name: "tiny-cpu-warmup".into(),
            reason: "Preempted".into(),
            message: "Preempted to accommodate a workload".into()
        }]
    );
    assert!(w.step().is_noop());
    // Admitted again: the next attempt starts (from the last checkpoint), no failure counted.
    w.admit("tiny-cpu-warmup", &["trainers"]);
    let plan = w.step();
    assert!(applied(&plan).contains(&(Kind::Job, "tiny-cpu-warmup-1".to_string())));
    let st = w.status().stages.warmup.clone().unwrap();
    assert_eq!((st.attempt, st.failures, st.evictions), (1, 0, 1));
    assert_eq!(w.phase(), Phase::WarmUp);
}

#[test]
fn a_failed_attempt_is_retried_under_the_same_admission_and_a_failed_run_finishes_it() {
    let mut w = queued(TINY, Some("team"));
    w.step();
    w.admit("tiny-cpu-warmup", &["trainers"]);
    w.step();
    w.set_job("tiny-cpu-warmup-0", fail("BackoffLimitExceeded"));
    let plan = w.step();
    assert!(applied(&plan).contains(&(Kind::Job, "tiny-cpu-warmup-1".to_string())));
    assert!(plan.workload_writes.is_empty());
    for attempt in 1..=2 {
        w.set_job(
            &format!("tiny-cpu-warmup-{attempt}"),
            fail("BackoffLimitExceeded"),
        );
        w.step();
    }
    assert_eq!(w.phase(), Phase::Failed);
    assert_eq!(
        w.obs.workload("tiny-cpu-warmup").unwrap().state,
        State::Finished
    );
}

#[test]
fn suspending_a_queued_run_deletes_its_workload_and_resuming_queues_again() {
    let mut w = queued(TINY, Some("team"));
    w.step();
    w.admit("tiny-cpu-warmup", &["trainers"]);
    w.step();
    w.bump_spec(|r| r.spec.suspend = true);
    let plan = w.step();
    assert!(plan
        .delete
        .contains(&(Kind::Workload, "tiny-cpu-warmup".to_string())));
    assert_eq!(w.phase(), Phase::Suspended);
    w.bump_spec(|r| r.spec.suspend = false);
    let plan = w.step();
    assert!(applied(&plan).contains(&(Kind::Workload, "tiny-cpu-warmup".to_string())));
    assert_eq!(w.phase(), Phase::Queued);
}

#[test]
fn a_namespace_with_a_default_local_queue_queues_a_run_that_names_none() {
    let mut w = queued(TINY, None);
    w.obs.fleet.default_queue = true;
    let plan = w.step();
    let Child::Workload(wl) = plan
        .apply
        .iter()
        .find(|c| c.kind() == Kind::Workload)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(wl.spec.queue_name, "default");
    // Without one (or without Kueue), a run that names no queue runs as before.
    let mut w = queued(TINY, None);
    let plan = w.step();
    assert!(applied(&plan).contains(&(Kind::Job, "tiny-cpu-warmup-0".to_string())));
    assert!(!applied(&plan).iter().any(|(k, _)| *k == Kind::Workload));
}

#[test]
fn a_queued_run_without_kueue_or_with_an_unknown_priority_waits_and_says_why() {
    let mut w = queued(TINY, Some("team"));
    w.obs.fleet = Fleet::default();
    let plan = w.step();
    assert!(!applied(&plan)
        .iter()
        .any(|(k, _)| *k == Kind::Job || *k == Kind::Workload));
    assert_eq!(w.phase(), Phase::Queued);
    assert!(
        w.condition(cond::WARMUP_COMPLETE).2.contains("not served"),
        "{:?}",
        w.condition(cond::WARMUP_COMPLETE)
    );

    let mut w = queued(TINY, Some("team"));
    w.run
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("kueue.x-k8s.io/priority-class".into(), "urgent".into());
    w.step();
    assert!(w
        .condition(cond::WARMUP_COMPLETE)
        .2
        .contains("WorkloadPriorityClass urgent"));
    // A known one is copied with its value, as Kueue requires.
    let mut w = queued(TINY, Some("team"));
    w.run
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("kueue.x-k8s.io/priority-class".into(), "high".into());
    let plan = w.step();
    let Child::Workload(wl) = plan
        .apply
        .iter()
        .find(|c| c.kind() == Kind::Workload)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(wl.spec.priority, Some(1000));
    assert_eq!(wl.spec.priority_class_ref.as_ref().unwrap().name, "high");
}

#[test]
fn each_student_is_admitted_on_its_own_and_finishes_its_own_workload() {
    let mut w = queued(TINY, Some("team"));
    let mut second = w.run.spec.distillation.students[0].clone();
    second.name = "second".into();
    w.run.spec.distillation.students.push(second);
    w.step();
    w.admit("tiny-cpu-warmup", &["trainers"]);
    w.step();
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    w.step();
    w.admit("tiny-cpu-rl", &["param-servers", "learners"]);
    w.step();
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    let plan = w.step();
    let students = w
        .run
        .spec
        .distillation
        .students
        .iter()
        .map(|s| s.name.clone())
        .collect::<Vec<_>>();
    for s in &students {
        assert!(applied(&plan).contains(&(Kind::Workload, format!("tiny-cpu-distillation-{s}"))));
    }
    // One admitted: only its Job starts; the stage runs, the other still waits.
    w.admit(
        &format!("tiny-cpu-distillation-{}", students[0]),
        &["trainers"],
    );
    let plan = w.step();
    let jobs: Vec<String> = applied(&plan)
        .into_iter()
        .filter(|(k, _)| *k == Kind::Job)
        .map(|(_, n)| n)
        .collect();
    assert_eq!(jobs, vec![format!("tiny-cpu-distill-{}-0", students[0])]);
    assert_eq!(w.phase(), Phase::Distillation);
    // It completes: its Workload is finished, the other's is untouched.
    w.set_job(
        &format!("tiny-cpu-distill-{}-0", students[0]),
        JobState::Complete,
    );
    let plan = w.step();
    assert_eq!(plan.workload_writes.len(), 1);
    assert_eq!(
        plan.workload_writes[0].name(),
        format!("tiny-cpu-distillation-{}", students[0])
    );
}

// Deadlines, timeouts and disruptions: attempts ended without counting a failure, or failed.

fn started_pod(stage: Stage, attempt: u32, name: &str, at_secs: i64) -> ObservedPod {
    ObservedPod {
        name: name.into(),
        stage: Some(stage),
        attempt: Some(attempt),
        started: Some(at(at_secs)),
        ..Default::default()
    }
}

#[test]
fn a_disrupted_attempt_is_retried_without_counting_a_failure() {
    let mut w = at_rl();
    let ps = PodRef {
        name: "tiny-cpu-ps-0-0".into(),
        stage: Some(Stage::Rl),
        attempt: Some(0),
        student: None,
    };
    w.activity.disrupted = vec![ps.clone()];
    let learner = PodRef {
        name: "tiny-cpu-learner-0-0".into(),
        ..ps.clone()
    };
    w.activity.exits = vec![(learner.clone(), rlt_api::contract::EXIT_PEER_LOST)];
    w.set_job("tiny-cpu-learner-0", fail("BackoffLimitExceeded"));
    let plan = w.step();
    let st = w.status().stages.rl.clone().unwrap();
    assert_eq!((st.attempt, st.failures, st.disruptions), (1, 0, 1));
    assert_eq!(w.condition(cond::RL_COMPLETE).1, "Disrupted");
    assert!(w.condition(cond::RL_COMPLETE).2.contains("tiny-cpu-ps-0-0"));
    assert!(reasons(&plan).contains(&"Disrupted"));
    // The same with a learner that crashed on its own: a failure.
    let mut w = at_rl();
    w.activity.disrupted = vec![ps];
    w.activity.exits = vec![(learner, 1)];
    w.set_job("tiny-cpu-learner-0", fail("BackoffLimitExceeded"));
    w.step();
    let st = w.status().stages.rl.clone().unwrap();
    assert_eq!((st.attempt, st.failures, st.disruptions), (1, 1, 0));
}

#[test]
fn active_deadline_seconds_reaches_every_stage_job() {
    let mut run = run_from(TINY);
    run.spec.warmup.active_deadline_seconds = Some(3600);
    run.spec.rl.active_deadline_seconds = Some(7200);
    let mut w = World::new(run);
    let plan = w.step();
    let spec = job_of(&plan, "tiny-cpu-warmup-0").spec.unwrap();
    assert_eq!(spec.active_deadline_seconds, Some(3600));
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    let plan = w.step();
    let spec = job_of(&plan, "tiny-cpu-learner-0").spec.unwrap();
    assert_eq!(spec.active_deadline_seconds, Some(7200));
    // A Job past it fails (DeadlineExceeded) like any failed attempt: retried.
    w.set_job("tiny-cpu-learner-0", fail("DeadlineExceeded"));
    w.step();
    assert_eq!(w.status().stages.rl.as_ref().unwrap().failures, 1);
}

#[test]
fn rl_without_a_new_step_past_its_progress_deadline_is_stalled_and_retried() {
    let mut w = at_rl();
    w.run.spec.rl.progress_deadline_seconds = Some(60);
    // Its pods started at t=30; a first step at t=40.
    w.obs.pods = vec![
        started_pod(Stage::Rl, 0, "ps", 25),
        started_pod(Stage::Rl, 0, "learner", 30),
    ];
    w.obs.figures = Some(TrainingFigures {
        step: 1,
        total_steps: 4,
        ..Default::default()
    });
    let plan = w.step();
    assert_eq!(
        w.status().training.as_ref().unwrap().last_step_time,
        Some(at(w.clock))
    );
    let moved = w.clock;
    assert!(
        plan.requeue_after.is_some_and(|d| d.as_secs() <= 61),
        "{plan:?}"
    );
    // The same step, seen until the deadline: quiet, then Stalled.
    while w.clock - moved <= 60 {
        let plan = w.step();
        assert!(plan.status.is_none() || w.condition(cond::RL_COMPLETE).1 == "Stalled");
    }
    let (status, reason, message) = w.condition(cond::RL_COMPLETE);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Stalled"));
    assert!(message.starts_with("Stalled: no RL step for"), "{message}");
    let st = w.status().stages.rl.clone().unwrap();
    assert_eq!((st.attempt, st.failures), (1, 1));
}

#[test]
fn an_attempt_whose_pods_do_not_all_run_in_time_is_torn_down_and_retried_later() {
    let mut run = run_from(TINY);
    run.spec.failure_policy.scheduling_timeout_seconds = Some(30);
    run.spec.warmup.replicas = 2;
    let mut w = World::new(run);
    w.step();
    // One of two ranks runs (holding its GPU), the other cannot be scheduled.
    w.obs.pods = vec![started_pod(Stage::Warmup, 0, "rank-0", 12)];
    let plan = w.step();
    assert!(
        plan.requeue_after.is_some_and(|d| d.as_secs() <= 31),
        "{plan:?}"
    );
    while w
        .status()
        .stages
        .warmup
        .as_ref()
        .unwrap()
        .scheduling_timeouts
        == 0
    {
        assert!(w.clock < 100, "never timed out");
        w.step();
    }
    let st = w.status().stages.warmup.clone().unwrap();
    assert_eq!((st.attempt, st.failures, st.scheduling_timeouts), (1, 0, 1));
    assert_eq!(w.condition(cond::WARMUP_COMPLETE).1, "SchedulingTimeout");
    assert!(
        !w.obs.jobs.iter().any(|j| j.name == "tiny-cpu-warmup-0"),
        "its pods are stopped"
    );
    // The next attempt waits as long again before asking for pods.
    let timed_out = w.clock;
    for _ in 0..2 {
        let plan = w.step();
        assert!(
            !applied(&plan).iter().any(|(k, _)| *k == Kind::Job),
            "{plan:?}"
        );
        assert!(
            plan.requeue_after.is_some(),
            "it comes back when the wait is over"
        );
    }
    let plan = w.step();
    assert_eq!(w.clock, timed_out + 30);
    assert!(applied(&plan).contains(&(Kind::Job, "tiny-cpu-warmup-1".to_string())));
}

#[test]
fn an_attempt_that_completed_before_its_eviction_was_seen_completes_the_stage() {
    let mut w = queued(TINY, Some("team"));
    w.step();
    w.admit("tiny-cpu-warmup", &["trainers"]);
    w.step();
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    w.set_workload(
        "tiny-cpu-warmup",
        State::Evicted {
            since: at(25),
            reason: "Preempted".into(),
            message: "Preempted to accommodate a workload".into(),
            holds_quota: true,
        },
    );
    let plan = w.step();
    let st = w.status().stages.warmup.clone().unwrap();
    assert_eq!((st.attempt, st.evictions), (0, 0), "not an eviction");
    assert_eq!(w.condition(cond::WARMUP_COMPLETE).0, "True");
    assert!(plan.workload_writes.iter().any(|x| matches!(x, StatusWrite::Finish { name, succeeded: true, .. } if name == "tiny-cpu-warmup")));
}

#[test]
fn a_parameter_server_not_ready_for_too_long_ends_the_attempt_without_a_failure() {
    let mut w = at_rl();
    w.run.spec.rl.param_server_not_ready_seconds = Some(60);
    let ps = |since: i64| ObservedPod {
        param_server: true,
        not_ready_since: Some(at(since)),
        ..started_pod(Stage::Rl, 0, "tiny-cpu-ps-0-0", 5)
    };
    w.obs.pods = vec![ps(w.clock)];
    let plan = w.step();
    assert!(
        plan.requeue_after.is_some_and(|d| d.as_secs() <= 61),
        "{plan:?}"
    );
    assert_eq!(w.status().stages.rl.as_ref().unwrap().attempt, 0);
    // Still not Ready a minute later (its node unreachable): the attempt ends.
    w.obs.pods = vec![ps(w.clock - 70)];
    let plan = w.step();
    let st = w.status().stages.rl.clone().unwrap();
    assert_eq!((st.attempt, st.failures, st.disruptions), (1, 0, 1));
    let (_, reason, message) = w.condition(cond::RL_COMPLETE);
    assert_eq!(reason, "ParamServerNotReady");
    assert!(
        message.contains("tiny-cpu-ps-0-0 not Ready for"),
        "{message}"
    );
    // Its learners and parameter servers go; the next attempt gets fresh ones.
    assert!(
        plan.delete
            .contains(&(Kind::Job, "tiny-cpu-learner-0".to_string())),
        "{:?}",
        plan.delete
    );
    assert!(plan
        .delete
        .contains(&(Kind::StatefulSet, "tiny-cpu-ps-0".to_string())));
}

/// Walks a world of two students (`small`, `big`) to the start of distillation.
fn at_two_students() -> World {
    let yaml = TINY.replace(
        "students: [{name: student, model: {tiny: {seed: 2}}}]",
        "students: [{name: small, model: {tiny: {seed: 2}}}, {name: big, model: {tiny: {seed: 3}}}]",
    );
    let mut w = World::new(run_from(&yaml));
    w.step();
    w.set_job("tiny-cpu-warmup-0", JobState::Complete);
    w.step();
    w.set_job("tiny-cpu-learner-0", JobState::Complete);
    w.step();
    assert_eq!(w.phase(), Phase::Distillation);
    w
}

fn student_pod(student: &str, attempt: u32) -> PodRef {
    PodRef {
        name: format!("tiny-cpu-distill-{student}-{attempt}-0"),
        stage: Some(Stage::Distillation),
        attempt: Some(attempt),
        student: Some(student.into()),
    }
}

#[test]
fn a_failed_student_is_retried_alone_while_the_others_run_on() {
    let mut w = at_two_students();
    w.activity.live = vec![student_pod("big", 0)];
    w.set_job("tiny-cpu-distill-small-0", fail("BackoffLimitExceeded"));
    let plan = w.step();
    // big's Job runs on untouched; small alone gets its attempt 1 (and that attempt's config).
    assert!(plan.delete.is_empty(), "{:?}", plan.delete);
    assert_eq!(
        applied(&plan),
        vec![
            (
                Kind::ConfigMap,
                "tiny-cpu-config-distillation-1".to_string()
            ),
            (Kind::Job, "tiny-cpu-distill-small-1".to_string())
        ]
    );
    let st = w.status().stages.distillation.clone().unwrap();
    assert_eq!(
        (st.attempt, st.failures),
        (0, 1),
        "the stage's attempt stays"
    );
    let small = &st.students["small"];
    assert_eq!((small.attempt, small.failures), (1, 1));
    assert!(!st.students.contains_key("big"));
    let (_, reason, message) = w.condition(cond::DISTILLATION_COMPLETE);
    assert_eq!(reason, "Retrying");
    assert!(
        message.starts_with("student small: job tiny-cpu-distill-small-0 failed")
            && message.contains("retrying student small alone (the others run on) as attempt 1"),
        "{message}"
    );
    assert_eq!(plan.events[0].action, "DistillationAttempt1");
    // Both run: nothing to create or delete; neither is taken for the other's earlier attempt.
    w.activity.live = vec![student_pod("big", 0), student_pod("small", 1)];
    let plan = w.step();
    assert!(plan.apply.is_empty() && plan.delete.is_empty(), "{plan:#?}");
    let (_, reason, message) = w.condition(cond::DISTILLATION_COMPLETE);
    assert_eq!(
        (reason.as_str(), message.as_str()),
        ("Running", "attempt 0 running (small on attempt 1)")
    );

    // small's attempt 1 loses a pod to the cluster: retried alone again, not counted.
    let disrupted = student_pod("small", 1);
    w.activity.disrupted = vec![disrupted.clone()];
    w.activity.live = vec![student_pod("big", 0)];
    w.set_job("tiny-cpu-distill-small-1", fail("BackoffLimitExceeded"));
    let plan = w.step();
    assert_eq!(
        applied(&plan),
        vec![
            (
                Kind::ConfigMap,
                "tiny-cpu-config-distillation-2".to_string()
            ),
            (Kind::Job, "tiny-cpu-distill-small-2".to_string())
        ]
    );
    let st = w.status().stages.distillation.clone().unwrap();
    assert_eq!((st.failures, st.disruptions), (1, 1));
    assert_eq!(st.students["small"].attempt, 2);
    assert_eq!(w.condition(cond::DISTILLATION_COMPLETE).1, "Disrupted");
    w.activity.disrupted.clear();

    // big finishes on its first attempt, then small on its third: the stage succeeds.
    w.set_job("tiny-cpu-distill-big-0", JobState::Complete);
    w.activity.live = vec![student_pod("small", 2)];
    w.step();
    assert_eq!(w.status().progress.as_deref(), Some("3/3 distill 1/2"));
    w.set_job("tiny-cpu-distill-small-2", JobState::Complete);
    w.activity.live.clear();
    w.step();
    assert_eq!(w.phase(), Phase::Succeeded);
}

#[test]
fn a_student_out_of_retries_fails_the_run_and_stops_the_others() {
    let mut w = at_two_students();
    w.bump_spec(|r| r.spec.failure_policy.retries = 1);
    w.step();
    w.activity.live = vec![student_pod("big", 0)];
    w.set_job("tiny-cpu-distill-small-0", fail("BackoffLimitExceeded"));
    w.step();
    assert_eq!(w.phase(), Phase::Distillation);
    w.set_job("tiny-cpu-distill-small-1", fail("BackoffLimitExceeded"));
    let plan = w.step();
    assert_eq!(w.phase(), Phase::Failed);
    let (_, reason, message) = w.condition(cond::FAILED);
    assert_eq!(reason, "DistillationFailed");
    assert!(
        message.contains("student small: 2 failures, retries 1"),
        "{message}"
    );
    assert_eq!(
        plan.delete,
        vec![(Kind::Job, "tiny-cpu-distill-big-0".to_string())],
        "the other student's running Job stops; the failed ones stay for their logs"
    );
    let st = w.status().stages.distillation.clone().unwrap();
    assert_eq!((st.failures, st.students["small"].failures), (2, 2));
}

#[test]
fn a_stage_wide_new_attempt_moves_every_student_on_past_its_own() {
    let mut w = at_two_students();
    w.set_job("tiny-cpu-distill-small-0", fail("BackoffLimitExceeded"));
    w.step(); // small alone on attempt 1
    w.bump_spec(|r| r.spec.suspend = true);
    let plan = w.step();
    let mut deleted: Vec<_> = plan.delete.iter().map(|(_, n)| n.as_str()).collect();
    deleted.sort();
    assert_eq!(
        deleted,
        ["tiny-cpu-distill-big-0", "tiny-cpu-distill-small-1"]
    );
    w.bump_spec(|r| r.spec.suspend = false);
    let plan = w.step();
    let jobs: Vec<String> = applied(&plan)
        .into_iter()
        .filter(|(k, _)| *k == Kind::Job)
        .map(|(_, n)| n)
        .collect();
    assert_eq!(jobs, ["tiny-cpu-distill-small-2", "tiny-cpu-distill-big-1"]);
    let st = w.status().stages.distillation.clone().unwrap();
    assert_eq!((st.attempt, st.attempt_of(Some("small"))), (1, 2));
}
