//! What the reconciler needs to know about a run's children, distilled from the API objects:
//! which children exist (and their content hash), how each Job ended, and what is wrong with
//! each pod (image pull, scheduling, OOM, exit code). Pure functions of the objects.
use crate::children::{
    Kind, Stage, ANNOTATION_HASH, CONTAINER, LABEL_ATTEMPT, LABEL_ROLE, LABEL_STAGE, LABEL_STUDENT,
};
use crate::kueue::{Fleet, ObservedWorkload};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use rlt_api::contract::{self, parse_final_figures, Role, TrainingFigures};
use rlt_api::status::StageStatus;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// Every owned child (Jobs included), by kind and name.
    pub children: Vec<ObservedChild>,
    pub jobs: Vec<ObservedJob>,
    pub pods: Vec<ObservedPod>,
    /// Parameter server 0's latest figures, when the controller could read them.
    pub figures: Option<TrainingFigures>,
    /// The run's Kueue Workloads (also listed in `children`).
    pub workloads: Vec<ObservedWorkload>,
    /// What the operator knows of Kueue in the run's namespace.
    pub fleet: Fleet,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservedChild {
    pub kind: Kind,
    pub name: String,
    pub hash: Option<String>,
    /// Being deleted: neither re-applied nor deleted again.
    pub deleting: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Running,
    Complete,
    Failed { reason: String, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservedJob {
    pub name: String,
    pub state: JobState,
    pub deleting: bool,
    /// `metadata.creationTimestamp`: when the attempt's pods were asked for.
    pub created: Option<Time>,
}

/// Something wrong with a pod, lifted into the run's condition and an Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// `ImagePullBackOff`, `Unschedulable`, `OOMKilled`, `Error`, `CrashLoopBackOff`, ...
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObservedPod {
    pub name: String,
    pub stage: Option<Stage>,
    pub attempt: Option<u32>,
    pub student: Option<String>,
    /// The Job the pod belongs to (the Job controller's `batch.kubernetes.io/job-name`).
    pub job: Option<String>,
    pub problem: Option<Problem>,
    /// `status.podIP`, once the pod has one (parameter server 0's is where the training
    /// figures are read).
    pub ip: Option<String>,
    /// Being deleted (terminating).
    pub deleting: bool,
    /// The figures a learner that succeeded left in its termination message.
    pub final_figures: Option<TrainingFigures>,
    /// GPUs the pod holds: its containers' GPU resources ([`contract::gpus`]).
    pub gpus: u32,
    /// When the kubelet started the pod (`status.startTime`).
    pub started: Option<Time>,
    /// When a pod that ran to its end (Succeeded or Failed) stopped: its last container's end.
    pub finished: Option<Time>,
    /// Since when a running pod is not Ready (its `Ready` condition's last transition).
    pub not_ready_since: Option<Time>,
    /// Not a Job's: a parameter server (of its StatefulSet).
    pub param_server: bool,
}

impl Observed {
    pub fn child(&self, kind: Kind, name: &str) -> Option<&ObservedChild> {
        self.children
            .iter()
            .find(|c| c.kind == kind && c.name == name)
    }
    pub fn workload(&self, name: &str) -> Option<&ObservedWorkload> {
        self.workloads.iter().find(|w| w.name == name)
    }
    pub fn job(&self, name: &str) -> Option<&ObservedJob> {
        self.jobs.iter().find(|j| j.name == name)
    }
    /// The first problem among the pods of the stage's current attempt (each student's own,
    /// in distillation).
    pub fn problem(&self, stage: Stage, st: &StageStatus) -> Option<&Problem> {
        self.pods
            .iter()
            .filter(|p| p.stage == Some(stage))
            .filter(|p| p.attempt == Some(st.attempt_of(p.student.as_deref())))
            .find_map(|p| p.problem.as_ref())
    }
    /// The first problem among the pods of one Job: why that Job failed (never a problem of
    /// another role's pods of the same attempt).
    pub fn job_problem(&self, job: &str) -> Option<&Problem> {
        self.pods
            .iter()
            .filter(|p| p.job.as_deref() == Some(job))
            .find_map(|p| p.problem.as_ref())
    }
    /// The furthest figures the succeeded pods of one stage attempt reported.
    pub fn final_figures(&self, stage: Stage, attempt: u32) -> Option<&TrainingFigures> {
        self.pods
            .iter()
            .filter(|p| p.stage == Some(stage) && p.attempt == Some(attempt))
            .filter_map(|p| p.final_figures.as_ref())
            .max_by_key(|f| f.step)
    }
}

pub fn child(kind: Kind, meta: &ObjectMeta) -> ObservedChild {
    ObservedChild {
        kind,
        name: meta.name.clone().unwrap_or_default(),
        hash: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_HASH))
            .cloned(),
        deleting: meta.deletion_timestamp.is_some(),
    }
}

pub fn job(job: &Job) -> ObservedJob {
    let conds = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    let is = |t: &str| {
        conds
            .into_iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
    };
    let state = if is("Complete").is_some() {
        JobState::Complete
    } else if let Some(c) = is("Failed").or_else(|| is("FailureTarget")) {
        JobState::Failed {
            reason: c.reason.clone().unwrap_or_else(|| "Failed".into()),
            message: c.message.clone().unwrap_or_default(),
        }
    } else {
        JobState::Running
    };
    ObservedJob {
        name: job.metadata.name.clone().unwrap_or_default(),
        state,
        deleting: job.metadata.deletion_timestamp.is_some(),
        created: job.metadata.creation_timestamp.clone(),
    }
}

pub fn pod(pod: &Pod) -> ObservedPod {
    let labels = pod.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
    let name = pod.metadata.name.clone().unwrap_or_default();
    ObservedPod {
        stage: label(LABEL_STAGE).as_deref().and_then(Stage::from_label),
        attempt: label(LABEL_ATTEMPT).and_then(|a| a.parse().ok()),
        student: label(LABEL_STUDENT),
        job: label(JOB_NAME_LABEL).or_else(|| label(LEGACY_JOB_NAME_LABEL)),
        problem: pod_problem(&name, pod),
        ip: pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty()),
        deleting: pod.metadata.deletion_timestamp.is_some(),
        final_figures: final_figures(pod),
        gpus: pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| contract::gpus(c.resources.as_ref()))
            .sum(),
        started: pod.status.as_ref().and_then(|s| s.start_time.clone()),
        finished: finished(pod),
        not_ready_since: not_ready_since(pod),
        param_server: label(LABEL_ROLE).as_deref() == Some(Role::ParamServer.subcommand()),
        name,
    }
}

/// Since when a Running pod's `Ready` condition is False.
fn not_ready_since(pod: &Pod) -> Option<Time> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")?;
    (ready.status == "False")
        .then(|| ready.last_transition_time.clone())
        .flatten()
}

/// When a pod that ran to its end stopped (the latest of its containers' ends).
fn finished(pod: &Pod) -> Option<Time> {
    let status = pod.status.as_ref()?;
    if !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.clone())
        .max_by_key(|t| t.0)
}

/// The label the Job controller puts on its pods, and its name before Kubernetes 1.27.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
const LEGACY_JOB_NAME_LABEL: &str = "job-name";

/// The trainer's termination message, when it exited 0 with figures in it.
fn final_figures(pod: &Pod) -> Option<TrainingFigures> {
    let status = pod.status.as_ref()?;
    let trainer = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == CONTAINER)?;
    let t = trainer.state.as_ref()?.terminated.as_ref()?;
    (t.exit_code == 0)
        .then(|| t.message.as_deref().and_then(parse_final_figures))
        .flatten()
}

/// The scheduler's word for a pod whose claim is not bound yet: a wait, not a fault (the
/// volume binder or a provisioner binds it; upstream reports a waiting claim as Normal too).
const UNBOUND_CLAIM: &str = "unbound immediate PersistentVolumeClaims";
/// The reason given to a pod that waits only for its volume claim to be bound.
pub const WAITING_FOR_VOLUME: &str = "WaitingForVolume";

const WAITING_PROBLEMS: &[&str] = &[
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The most telling problem of a pod: a failed container first (OOM, exit code), then a
/// container that cannot start, then a pod that cannot be scheduled.
pub fn pod_problem(name: &str, pod: &Pod) -> Option<Problem> {
    let status = pod.status.as_ref()?;
    let containers: Vec<&ContainerStatus> = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .collect();
    for c in &containers {
        // The current state only: a container that crashed once and runs again is healthy.
        // The last state explains a container waiting to restart (CrashLoopBackOff).
        let state = c.state.as_ref();
        let waiting = state.is_some_and(|s| s.waiting.is_some());
        let terminated = state.and_then(|s| s.terminated.as_ref()).or_else(|| {
            c.last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .filter(|_| waiting)
        });
        if let Some(t) = terminated.filter(|t| t.exit_code != 0) {
            let what = if c.name == CONTAINER {
                "the trainer".to_string()
            } else {
                format!("container {}", c.name)
            };
            let (reason, message) = match t.reason.as_deref() {
                Some("OOMKilled") => (
                    "OOMKilled".to_string(),
                    format!(
                        "pod {name}: {what} was OOMKilled (exit code {}): raise its memory limit",
                        t.exit_code
                    ),
                ),
                _ => {
                    let tail = t
                        .message
                        .as_deref()
                        .map(|m| format!(": {}", last_line(m)))
                        .unwrap_or_default();
                    (
                        "Error".to_string(),
                        format!("pod {name}: {what} exited with code {}{tail}", t.exit_code),
                    )
                }
            };
            return Some(Problem { reason, message });
        }
    }
    for c in &containers {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            if WAITING_PROBLEMS.contains(&reason.as_str()) {
                let detail = w
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                return Some(Problem {
                    message: format!("pod {name}: {reason}{detail}"),
                    reason,
                });
            }
        }
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unschedulable {
        let said = c.message.as_deref().unwrap_or_default();
        return Some(if said.contains(UNBOUND_CLAIM) {
            Problem {
                reason: WAITING_FOR_VOLUME.into(),
                message: format!("pod {name} waits for its volume claim to be bound: {said}"),
            }
        } else {
            let detail = c
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            Problem {
                reason: "Unschedulable".into(),
                message: format!("pod {name} cannot be scheduled{detail}"),
            }
        });
    }
    None
}

/// Termination messages can be long logs; the last line is the error.
fn last_line(m: &str) -> &str {
    m.trim_end().lines().last().unwrap_or(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_from(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": {"rlt.dev/stage": "rl", "rlt.dev/attempt": "2"}},
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn a_running_pod_not_ready_says_since_when() {
        let ready = |status: &str, phase: &str| {
            pod(&pod_from(
                json!({"phase": phase, "conditions": [{"type": "Ready", "status": status,
                "lastTransitionTime": "2026-12-06T06:00:00Z"}]}),
            ))
            .not_ready_since
        };
        assert_eq!(
            ready("False", "Running").map(|t| t.0.to_string()),
            Some("2026-12-06T06:00:00Z".into())
        );
        assert_eq!(ready("True", "Running"), None);
        // A pod not yet running is the scheduling timeout's business, not this.
        assert_eq!(ready("False", "Pending"), None);
    }

    #[test]
    fn lifts_each_pod_failure_kind() {
        let cases = [
            (json!({"containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}),
             "ImagePullBackOff", "pod p: ImagePullBackOff: Back-off pulling image \"x\""),
            (json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}),
             "Unschedulable", "pod p cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
            (json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/250 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/250 nodes are available: 250 Preemption is not helpful for scheduling."}]}),
             "WaitingForVolume", "pod p waits for its volume claim to be bound: 0/250 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/250 nodes are available: 250 Preemption is not helpful for scheduling."),
            (json!({"containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}),
             "OOMKilled", "pod p: the trainer was OOMKilled (exit code 137): raise its memory limit"),
            (json!({"containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"reason": "Error", "exitCode": 2, "message": "loading\nerror: config.json not found"}}}]}),
             "Error", "pod p: the trainer exited with code 2: error: config.json not found"),
        ];
        for (status, reason, message) in cases {
            let p = pod(&pod_from(status));
            let problem = p.problem.expect(reason);
            assert_eq!(
                (problem.reason.as_str(), problem.message.as_str()),
                (reason, message)
            );
            assert_eq!((p.stage, p.attempt), (Some(Stage::Rl), Some(2)));
            assert_eq!((p.ip.as_deref(), p.deleting), (None, false));
        }
        let healthy = pod(&pod_from(
            json!({"containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}}}]}),
        ));
        assert_eq!(healthy.problem, None);
        // Crashed once, running again: its old exit is history, not a problem.
        let recovered = pod(&pod_from(
            json!({"containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": true,
            "restartCount": 1, "state": {"running": {}},
            "lastState": {"terminated": {"reason": "Error", "exitCode": 1, "message": "lost a peer"}}}]}),
        ));
        assert_eq!(recovered.problem, None);
    }

    #[test]
    fn a_learner_that_succeeded_leaves_its_final_figures_and_a_failed_one_does_not() {
        let ended = |code: i32, message: &str| {
            pod(&pod_from(
                json!({"containerStatuses": [{"name": "trainer", "image": "i",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"reason": "Completed", "exitCode": code, "message": message}}}]}),
            ))
        };
        let figures =
            r#"{"step":8,"totalSteps":8,"meanReward":-0.5,"solutionTerm":-0.25,"klTerm":0.25}"#;
        let f = ended(0, figures).final_figures.expect("figures");
        assert_eq!((f.step, f.total_steps, f.kl_term), (8, 8, Some(0.25)));
        assert_eq!(ended(1, figures).final_figures, None);
        assert_eq!(ended(0, "done").final_figures, None);
        let obs = Observed {
            pods: vec![ended(0, figures), {
                let mut earlier = ended(0, &figures.replace(":8,", ":5,"));
                earlier.name = "q".into();
                earlier
            }],
            ..Default::default()
        };
        assert_eq!(obs.final_figures(Stage::Rl, 2).map(|f| f.step), Some(8));
        assert_eq!(obs.final_figures(Stage::Rl, 1), None);
    }

    #[test]
    fn a_failed_job_is_explained_by_its_own_pods_only() {
        let failed = |name: &str, job: &str, code: i32| {
            let mut p: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"rlt.dev/stage": "rl", "rlt.dev/attempt": "0"}},
                "status": {"containerStatuses": [{"name": "trainer", "image": "i", "imageID": "",
                    "ready": false, "restartCount": 0,
                    "state": {"terminated": {"reason": "Error", "exitCode": code}}}]}
            }))
            .unwrap();
            if !job.is_empty() {
                let labels = p.metadata.labels.as_mut().unwrap();
                labels.insert(JOB_NAME_LABEL.into(), job.into());
            }
            pod(&p)
        };
        // A parameter server (no Job) failed too; the learner Job's failure names its pod.
        let obs = Observed {
            pods: vec![
                failed("run-ps-0-0", "", 1),
                failed("run-learner-0-0", "run-learner-0", 3),
            ],
            ..Default::default()
        };
        let problem = obs.job_problem("run-learner-0").unwrap();
        assert!(
            problem.message.starts_with("pod run-learner-0-0:"),
            "{problem:?}"
        );
        assert_eq!(obs.job_problem("run-warmup-0"), None);
    }

    #[test]
    fn a_cached_pod_keeps_its_gpus_and_running_time() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": {"rlt.dev/stage": "warmup", "rlt.dev/attempt": "0"}},
            "spec": {"containers": [
                {"name": "trainer", "image": "i", "command": ["rlt-trainer"],
                 "resources": {"limits": {"nvidia.com/gpu": "4", "cpu": "8"}}},
                {"name": "sidecar", "image": "s", "resources": {"limits": {"amd.com/gpu": "1"}}}]},
            "status": {"phase": "Succeeded", "startTime": "2026-12-06T03:00:00Z",
                "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "",
                    "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0,
                    "startedAt": "2026-12-06T03:00:05Z", "finishedAt": "2026-12-06T03:30:00Z"}}}]}
        }))
        .unwrap();
        crate::cache::slim_pod(&mut p);
        let o = pod(&p);
        assert_eq!(o.gpus, 5);
        assert_eq!(o.started.unwrap().0.to_string(), "2026-12-06T03:00:00Z");
        assert_eq!(o.finished.unwrap().0.to_string(), "2026-12-06T03:30:00Z");
        // Still running: no end yet.
        p.status.as_mut().unwrap().phase = Some("Running".into());
        assert_eq!(pod(&p).finished, None);
    }

    #[test]
    fn reads_the_pod_ip() {
        let p = pod(&pod_from(json!({"podIP": "10.1.2.3"})));
        assert_eq!(p.ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(pod(&pod_from(json!({"podIP": ""}))).ip, None);
    }

    #[test]
    fn job_states() {
        let j = |conds: serde_json::Value| {
            job(&serde_json::from_value(
                json!({"metadata": {"name": "j"}, "status": {"conditions": conds}}),
            )
            .unwrap())
        };
        assert_eq!(j(json!([])).state, JobState::Running);
        assert_eq!(
            j(json!([{"type": "Complete", "status": "True"}])).state,
            JobState::Complete
        );
        assert_eq!(
            j(json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}])).state,
            JobState::Failed { reason: "BackoffLimitExceeded".into(), message: "Job has reached the specified backoff limit".into() }
        );
    }
}
