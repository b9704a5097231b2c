//! The pod status as a kubelet reports it, and its strategic-merge patches (with the pod's
//! uid as precondition, retried, never sent twice unchanged).
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

use super::kubeapi::{self, now, time};

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
        container_id: Option<String>,
    },
}

impl State {
    pub fn waiting(reason: &str, message: Option<String>) -> State {
        State::Waiting {
            reason: reason.into(),
            message,
        }
    }

    fn api(&self) -> ContainerState {
        match self {
            State::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            State::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(time(*started_at)),
                }),
                ..Default::default()
            },
            State::Terminated {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
                container_id,
            } => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    reason: Some(reason.clone()),
                    message: message.clone(),
                    started_at: started_at.map(time),
                    finished_at: Some(time(*finished_at)),
                    container_id: container_id.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }
}

/// One container's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub container_id: Option<String>,
    pub state: State,
    pub last: Option<State>,
    pub ready: bool,
    pub restart_count: i32,
}

impl Container {
    pub fn new(name: &str, image: &str, reason: &str) -> Container {
        Container {
            name: name.into(),
            image: image.into(),
            image_id: String::new(),
            container_id: None,
            state: State::waiting(reason, None),
            last: None,
            ready: false,
            restart_count: 0,
        }
    }

    pub fn started_at(&self) -> Option<Timestamp> {
        match &self.state {
            State::Running { started_at } => Some(*started_at),
            _ => None,
        }
    }

    /// Ended with exit code 0.
    pub fn succeeded(&self) -> bool {
        matches!(self.state, State::Terminated { exit_code: 0, .. })
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self.state {
            State::Terminated { exit_code, .. } => Some(exit_code),
            _ => None,
        }
    }

    /// Running, or ended, once: a container that never ran is reported unknown when the pod
    /// is torn down.
    pub fn ever_ran(&self) -> bool {
        !matches!(self.state, State::Waiting { .. }) || self.last.is_some()
    }

    fn api(&self) -> ContainerStatus {
        let running = matches!(self.state, State::Running { .. });
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id: self.container_id.clone(),
            ready: self.ready,
            restart_count: self.restart_count,
            started: Some(running),
            state: Some(self.state.api()),
            last_state: Some(self.last.as_ref().map(State::api).unwrap_or_default()),
            ..Default::default()
        }
    }
}

/// What the kubelet would report for the pod.
#[derive(Debug, Clone)]
pub struct View {
    pub phase: String,
    pub pod_ip: String,
    pub host_ip: String,
    pub start_time: Timestamp,
    pub init: Vec<Container>,
    pub containers: Vec<Container>,
    conditions: BTreeMap<&'static str, Condition>,
}

/// (status, reason, message, lastTransitionTime)
type Condition = (bool, Option<String>, Option<String>, Timestamp);

fn names(cs: &[&Container]) -> String {
    format!(
        "[{}]",
        cs.iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    )
}

impl View {
    pub fn new(pod: &Pod, pod_ip: String, host_ip: String) -> View {
        let spec = pod.spec.clone().unwrap_or_default();
        let has_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
        let main_reason = if has_init {
            "PodInitializing"
        } else {
            "ContainerCreating"
        };
        View {
            phase: "Pending".into(),
            pod_ip,
            host_ip,
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0)
                .unwrap_or_else(now),
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| {
                    Container::new(
                        &c.name,
                        c.image.as_deref().unwrap_or_default(),
                        "PodInitializing",
                    )
                })
                .collect(),
            containers: spec
                .containers
                .iter()
                .map(|c| {
                    Container::new(&c.name, c.image.as_deref().unwrap_or_default(), main_reason)
                })
                .collect(),
            conditions: BTreeMap::new(),
        }
    }

    pub fn terminal(&self) -> bool {
        self.phase == "Succeeded" || self.phase == "Failed"
    }

    fn set_condition(
        &mut self,
        ty: &'static str,
        status: bool,
        reason: Option<String>,
        message: Option<String>,
    ) {
        let at = now();
        let e = self
            .conditions
            .entry(ty)
            .or_insert((status, None, None, at));
        if e.0 != status {
            e.3 = at;
        }
        e.0 = status;
        e.1 = reason;
        e.2 = message;
    }

    fn update_conditions(&mut self) {
        self.set_condition("PodReadyToStartContainers", !self.terminal(), None, None);
        let pending_init: Vec<&Container> = self.init.iter().filter(|c| !c.succeeded()).collect();
        let (ok, reason, msg) = if pending_init.is_empty() {
            (true, None, None)
        } else {
            (
                false,
                Some("ContainersNotInitialized".to_string()),
                Some(format!(
                    "containers with incomplete status: {}",
                    names(&pending_init)
                )),
            )
        };
        self.set_condition("Initialized", ok, reason, msg);
        let unready: Vec<&Container> = self.containers.iter().filter(|c| !c.ready).collect();
        let (ok, reason, msg) = if self.phase == "Succeeded" {
            (false, Some("PodCompleted".to_string()), None)
        } else if unready.is_empty() && self.phase == "Running" {
            (true, None, None)
        } else {
            (
                false,
                Some("ContainersNotReady".to_string()),
                Some(format!(
                    "containers with unready status: {}",
                    names(&unready)
                )),
            )
        };
        self.set_condition("ContainersReady", ok, reason.clone(), msg.clone());
        self.set_condition("Ready", ok, reason, msg);
    }

    /// The `status` of the patch. Conditions carry explicit nulls so a merge never keeps a
    /// stale reason.
    pub fn status(&mut self) -> Value {
        self.update_conditions();
        let conditions: Vec<Value> = self
            .conditions
            .iter()
            .map(|(ty, (status, reason, message, at))| {
                json!({
                    "type": ty,
                    "status": if *status { "True" } else { "False" },
                    "reason": reason,
                    "message": message,
                    "lastProbeTime": null,
                    "lastTransitionTime": time(*at),
                })
            })
            .collect();
        json!({
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": self.host_ip,
            "hostIPs": [{ "ip": self.host_ip }],
            "podIP": self.pod_ip,
            "podIPs": [{ "ip": self.pod_ip }],
            "startTime": time(self.start_time),
            "initContainerStatuses": self.init.iter().map(Container::api).collect::<Vec<_>>(),
            "containerStatuses": self.containers.iter().map(Container::api).collect::<Vec<_>>(),
        })
    }
}

/// Sends status patches for one pod.
pub struct Reporter {
    api: Api<Pod>,
    name: String,
    uid: String,
    last: Option<Value>,
    /// The pod is gone (or replaced by one of the same name): no more patches.
    pub gone: bool,
}

impl Reporter {
    pub fn new(api: Api<Pod>, name: &str, uid: &str) -> Reporter {
        Reporter {
            api,
            name: name.into(),
            uid: uid.into(),
            last: None,
            gone: false,
        }
    }

    pub async fn send(&mut self, view: &mut View) {
        let status = view.status();
        if self.gone || self.last.as_ref() == Some(&status) {
            return;
        }
        let patch = Patch::Strategic(json!({ "metadata": { "uid": self.uid }, "status": status }));
        let pp = PatchParams::default();
        let res = kubeapi::retry(8, || self.api.patch_status(&self.name, &pp, &patch)).await;
        match res {
            Ok(_) => self.last = Some(status),
            Err(e) if kubeapi::is_not_found(&e) || kubeapi::code(&e) == Some(409) => {
                tracing::debug!(pod = %self.name, "status patch: pod gone ({e})");
                self.gone = true;
            }
            Err(e) => {
                tracing::warn!(pod = %self.name, "status patch failed: {e}");
                self.last = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container as ApiContainer, PodSpec};

    fn pod() -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![ApiContainer {
                    name: "main".into(),
                    image: Some("busybox".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn cond<'a>(s: &'a Value, ty: &str) -> &'a Value {
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == ty)
            .unwrap()
    }

    #[test]
    fn conditions_follow_the_containers() {
        let mut v = View::new(&pod(), "127.64.0.1".into(), "127.0.0.1".into());
        let s = v.status();
        assert_eq!(s["phase"], "Pending");
        assert_eq!(cond(&s, "Ready")["status"], "False");
        assert_eq!(cond(&s, "Ready")["reason"], "ContainersNotReady");
        assert_eq!(cond(&s, "Initialized")["status"], "True");
        assert_eq!(
            s["containerStatuses"][0]["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        v.phase = "Running".into();
        v.containers[0].state = State::Running { started_at: now() };
        v.containers[0].ready = true;
        let s = v.status();
        assert_eq!(cond(&s, "Ready")["status"], "True");
        assert_eq!(cond(&s, "Ready")["reason"], Value::Null);
        assert_eq!(s["containerStatuses"][0]["started"], true);
        assert_eq!(s["podIPs"][0]["ip"], "127.64.0.1");
        v.phase = "Succeeded".into();
        v.containers[0].ready = false;
        v.containers[0].state = State::Terminated {
            exit_code: 0,
            reason: "Completed".into(),
            message: None,
            started_at: None,
            finished_at: now(),
            container_id: None,
        };
        let s = v.status();
        assert_eq!(cond(&s, "Ready")["reason"], "PodCompleted");
        assert_eq!(cond(&s, "PodReadyToStartContainers")["status"], "False");
        assert_eq!(
            s["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
    }
}
