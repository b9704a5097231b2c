//! What the reconciler needs to know about a run's stage workloads beyond
//! [`crate::observe`]: which Job pods are still alive (a new attempt starts only once the
//! previous attempt's pods are gone), which attempts ended with the trainer's
//! bad-configuration exit code (not retried), and why a Job has no pods at all (its
//! `FailedCreate` Events: quota, admission; Jobs have no condition for it). Pure functions of
//! the API objects (owned, or shared out of the controller's stores).
use crate::children::{Stage, CONTAINER, LABEL_ATTEMPT, LABEL_STAGE, LABEL_STUDENT};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use rlt_api::status::StageStatus;
use std::borrow::Borrow;
use std::time::Duration;

/// Set by the Job controller on every pod of a Job.
pub const LABEL_JOB_NAME: &str = "batch.kubernetes.io/job-name";

pub use rlt_api::contract::{EXIT_BAD_CONFIG, EXIT_PEER_LOST};

/// How long a Job may have no pods before its Events are read.
pub const PODLESS_GRACE: Duration = Duration::from_secs(10);

/// A pod of a stage attempt, by its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRef {
    pub name: String,
    pub stage: Option<Stage>,
    pub attempt: Option<u32>,
    pub student: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Activity {
    /// Job pods not yet terminal (pending, running or terminating).
    pub live: Vec<PodRef>,
    /// Pods whose trainer exited with [`EXIT_BAD_CONFIG`].
    pub bad_config: Vec<PodRef>,
    /// Jobs without pods, with the message of their latest `FailedCreate` Event.
    pub failed_create: Vec<(String, String)>,
    /// Stage pods the cluster took away (evicted, preempted, their node lost): condition
    /// `DisruptionTarget` True.
    pub disrupted: Vec<PodRef>,
    /// Stage pods whose trainer exited non-zero, with the exit code.
    pub exits: Vec<(PodRef, i32)>,
}

impl Activity {
    pub fn from_pods(pods: &[impl Borrow<Pod>]) -> Activity {
        let pods = || pods.iter().map(|p| -> &Pod { p.borrow() });
        Activity {
            live: pods()
                .filter(|p| is_job_pod(p) && !is_terminal(p))
                .map(pod_ref)
                .collect(),
            bad_config: pods()
                .filter(|p| exited_with(p, EXIT_BAD_CONFIG))
                .map(pod_ref)
                .collect(),
            failed_create: Vec::new(),
            disrupted: pods().filter(|p| is_disrupted(p)).map(pod_ref).collect(),
            exits: pods()
                .filter_map(|p| Some((pod_ref(p), trainer_exit(p)?)))
                .collect(),
        }
    }

    /// A pod of the attempt (of one student, in distillation) the cluster took away, when
    /// that is all that went wrong: every other pod of the attempt whose trainer failed exited
    /// because it lost a peer ([`EXIT_PEER_LOST`]). Such an attempt is retried without
    /// counting a failure.
    pub fn disruption(&self, stage: Stage, student: Option<&str>, attempt: u32) -> Option<&PodRef> {
        let of = |p: &PodRef| {
            p.stage == Some(stage) && p.student.as_deref() == student && p.attempt == Some(attempt)
        };
        let disrupted = |p: &PodRef| self.disrupted.iter().any(|d| d.name == p.name);
        let first = self.disrupted.iter().find(|p| of(p))?;
        let own_fault = self
            .exits
            .iter()
            .any(|(p, code)| of(p) && *code != EXIT_PEER_LOST && !disrupted(p));
        (!own_fault).then_some(first)
    }

    /// The live pods of `stage` from before the attempt their unit (the stage, or a student
    /// retried alone) is on now.
    pub fn earlier_attempts_alive<'a>(
        &'a self,
        stage: Stage,
        st: &'a StageStatus,
    ) -> impl Iterator<Item = &'a PodRef> + 'a {
        self.live.iter().filter(move |p| {
            p.stage == Some(stage)
                && p.attempt
                    .is_some_and(|a| a < st.attempt_of(p.student.as_deref()))
        })
    }

    /// Whether a pod of this attempt (of this student, in distillation) exited with a bad
    /// configuration.
    pub fn bad_config(&self, stage: Stage, student: Option<&str>, attempt: u32) -> bool {
        self.bad_config.iter().any(|p| {
            p.stage == Some(stage) && p.attempt == Some(attempt) && p.student.as_deref() == student
        })
    }

    pub fn failed_create(&self, job: &str) -> Option<&str> {
        self.failed_create
            .iter()
            .find(|(j, _)| j == job)
            .map(|(_, m)| m.as_str())
    }
}

fn pod_ref(pod: &Pod) -> PodRef {
    let label = |k: &str| pod.metadata.labels.as_ref().and_then(|l| l.get(k)).cloned();
    PodRef {
        name: pod.metadata.name.clone().unwrap_or_default(),
        stage: label(LABEL_STAGE).as_deref().and_then(Stage::from_label),
        attempt: label(LABEL_ATTEMPT).and_then(|a| a.parse().ok()),
        student: label(LABEL_STUDENT),
    }
}

fn job_name_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_JOB_NAME))
        .map(String::as_str)
}

fn is_job_pod(pod: &Pod) -> bool {
    job_name_of(pod).is_some()
}

/// A pod that will not run again: Succeeded or Failed. A terminating pod (deletion requested)
/// is alive until its phase says otherwise or it is gone from the API.
fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

fn is_disrupted(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
}

/// The trainer's non-zero exit code (its current state, else its last).
fn trainer_exit(pod: &Pod) -> Option<i32> {
    let c = pod
        .status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER)?;
    [
        c.state.as_ref().and_then(|s| s.terminated.as_ref()),
        c.last_state.as_ref().and_then(|s| s.terminated.as_ref()),
    ]
    .into_iter()
    .flatten()
    .map(|t| t.exit_code)
    .find(|code| *code != 0)
}

fn exited_with(pod: &Pod, code: i32) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter(|c| c.name == CONTAINER)
        .flat_map(|c| {
            [
                c.state.as_ref().and_then(|s| s.terminated.as_ref()),
                c.last_state.as_ref().and_then(|s| s.terminated.as_ref()),
            ]
        })
        .flatten()
        .any(|t| t.exit_code == code)
}

/// A Job that is not finished but has had no pod at all for `min_age` since its creation
/// (e.g. [`PODLESS_GRACE`]): the Job controller could not create them, and says why only in
/// Events.
pub fn is_podless(job: &Job, pods: &[impl Borrow<Pod>], now: Timestamp, min_age: Duration) -> bool {
    let name = job.metadata.name.as_deref();
    let counted = job.status.as_ref().map_or(0, |s| {
        s.active.unwrap_or(0)
            + s.succeeded.unwrap_or(0)
            + s.failed.unwrap_or(0)
            + s.terminating.unwrap_or(0)
    });
    let finished = job
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"));
    let old_enough = job
        .metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|t| now.duration_since(t.0).as_secs() >= min_age.as_secs() as i64);
    counted == 0 && !finished && old_enough && !pods.iter().any(|p| job_name_of(p.borrow()) == name)
}

/// The field selector of the `FailedCreate` Events the controller watches: every Job's (a
/// Job's own are picked out by `involvedObject.uid`), not the ReplicaSets', DaemonSets' and
/// others' of the whole cluster, which it would only hold in memory.
pub const FAILED_CREATE_SELECTOR: &str = "reason=FailedCreate,involvedObject.kind=Job";

/// The message of the most recent `FailedCreate` Event.
pub fn latest_failed_create(events: &[impl Borrow<Event>]) -> Option<String> {
    let when = |e: &Event| {
        e.series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
            .or(e.last_timestamp.as_ref().map(|t| t.0))
            .or(e.event_time.as_ref().map(|t| t.0))
            .or(e.first_timestamp.as_ref().map(|t| t.0))
    };
    events
        .iter()
        .map(|e| -> &Event { e.borrow() })
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .max_by_key(|e| when(e))
        .map(|e| e.message.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: serde_json::Value, status: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "labels": labels}, "status": status}),
        )
        .unwrap()
    }

    fn named(name: &str, labels: serde_json::Value, status: serde_json::Value) -> Pod {
        let mut p = pod(labels, status);
        p.metadata.name = Some(name.into());
        p
    }

    fn exited(code: i32) -> serde_json::Value {
        json!({"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code}}}]})
    }

    #[test]
    fn a_disrupted_peer_excuses_the_attempt_only_when_the_others_merely_lost_it() {
        let rl = json!({"rlt.dev/stage": "rl", "rlt.dev/attempt": "1"});
        let preempted = named(
            "ps-0",
            rl.clone(),
            json!({"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True",
                "reason": "PreemptionByScheduler"}]}),
        );
        let lost_it = named("learner-0", rl.clone(), exited(EXIT_PEER_LOST));
        let a = Activity::from_pods(&[preempted.clone(), lost_it.clone()]);
        assert_eq!(
            a.disruption(Stage::Rl, None, 1).map(|p| p.name.as_str()),
            Some("ps-0")
        );
        assert!(
            a.disruption(Stage::Rl, None, 0).is_none(),
            "another attempt's"
        );
        // A learner that crashed on its own is a failure, whatever else happened.
        let crashed = named("learner-1", rl.clone(), exited(1));
        let a = Activity::from_pods(&[preempted, lost_it.clone(), crashed]);
        assert!(a.disruption(Stage::Rl, None, 1).is_none());
        // A peer lost with no disrupted pod: nothing the cluster did, counted.
        let a = Activity::from_pods(&[lost_it]);
        assert!(a.disruption(Stage::Rl, None, 1).is_none());
    }

    #[test]
    fn live_job_pods_are_those_not_yet_terminal() {
        let labels = json!({"rlt.dev/stage": "warmup", "rlt.dev/attempt": "0",
            "batch.kubernetes.io/job-name": "r-warmup-0"});
        let pods = [
            pod(labels.clone(), json!({"phase": "Running"})),
            pod(labels.clone(), json!({"phase": "Failed"})),
            // A parameter server is no Job pod: it never blocks a new attempt.
            pod(
                json!({"rlt.dev/stage": "rl", "rlt.dev/attempt": "0"}),
                json!({"phase": "Running"}),
            ),
        ];
        let a = Activity::from_pods(&pods);
        assert_eq!(a.live.len(), 1);
        let on = |attempt| StageStatus {
            attempt,
            ..Default::default()
        };
        let earlier = |stage, attempt| a.earlier_attempts_alive(stage, &on(attempt)).count();
        assert_eq!(earlier(Stage::Warmup, 1), 1);
        assert_eq!(earlier(Stage::Warmup, 0), 0);
        assert_eq!(earlier(Stage::Rl, 1), 0);
    }

    #[test]
    fn a_student_retried_alone_waits_only_for_its_own_earlier_pods() {
        let student = |name: &str, attempt: &str| {
            let job = format!("r-distill-{name}-{attempt}");
            pod(
                json!({"rlt.dev/stage": "distillation", "rlt.dev/attempt": attempt,
                    "rlt.dev/student": name, "batch.kubernetes.io/job-name": job}),
                json!({"phase": "Running"}),
            )
        };
        let a = Activity::from_pods(&[student("a", "0"), student("b", "0")]);
        let mut st = StageStatus::default();
        st.next_student_attempt("b");
        let earlier: Vec<_> = a
            .earlier_attempts_alive(Stage::Distillation, &st)
            .map(|p| p.student.as_deref())
            .collect();
        assert_eq!(earlier, [Some("b")], "a's attempt 0 is its current one");
        // A student's own disruption and bad configuration, never another's.
        let b = Activity::from_pods(&[named(
            "b-0",
            json!({"rlt.dev/stage": "distillation",
            "rlt.dev/attempt": "0", "rlt.dev/student": "b"}),
            exited(2),
        )]);
        assert!(b.bad_config(Stage::Distillation, Some("b"), 0));
        assert!(!b.bad_config(Stage::Distillation, Some("a"), 0));
    }

    #[test]
    fn bad_configuration_is_the_trainers_exit_code_2() {
        let labels = json!({"rlt.dev/stage": "rl", "rlt.dev/attempt": "3"});
        let exited = |code: i32| {
            pod(
                labels.clone(),
                json!({"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "i",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": "Error"}}}]}),
            )
        };
        assert!(Activity::from_pods(&[exited(2)]).bad_config(Stage::Rl, None, 3));
        assert!(!Activity::from_pods(&[exited(2)]).bad_config(Stage::Rl, None, 2));
        assert!(!Activity::from_pods(&[exited(1)]).bad_config(Stage::Rl, None, 3));
    }

    #[test]
    fn a_job_without_pods_for_a_while_is_podless_and_its_latest_failed_create_says_why() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let job = |age: i64, status: serde_json::Value| -> Job {
            serde_json::from_value(json!({"metadata": {"name": "j", "uid": "u-1",
                "creationTimestamp": Timestamp::from_second(1_000_000 - age).unwrap().to_string()},
                "status": status}))
            .unwrap()
        };
        let grace = PODLESS_GRACE;
        let none: [Pod; 0] = [];
        assert!(is_podless(&job(30, json!({})), &none, now, grace));
        assert!(
            !is_podless(&job(3, json!({})), &none, now, grace),
            "too young"
        );
        assert!(is_podless(&job(3, json!({})), &none, now, Duration::ZERO));
        assert!(!is_podless(
            &job(30, json!({"active": 1})),
            &none,
            now,
            grace
        ));
        let mine = pod(json!({"batch.kubernetes.io/job-name": "j"}), json!({}));
        assert!(!is_podless(&job(30, json!({})), &[mine], now, grace));
        let ev = |msg: &str, at: i64| -> Event {
            serde_json::from_value(json!({"metadata": {"name": msg}, "involvedObject": {},
                "reason": "FailedCreate", "message": msg,
                "lastTimestamp": Timestamp::from_second(at).unwrap().to_string()}))
            .unwrap()
        };
        assert_eq!(
            latest_failed_create(&[ev("old", 10), ev("new", 20), ev("older", 5)]).as_deref(),
            Some("new")
        );
        let none: [Event; 0] = [];
        assert_eq!(latest_failed_create(&none), None);
    }
}
