//! Admission of whole stages by Kueue (`kueue.x-k8s.io/v1beta2`). A run whose metadata names a
//! LocalQueue (`kueue.x-k8s.io/queue-name`, as every Kueue integration takes it; or, without
//! the label, the namespace's LocalQueue named `default`, as Kueue's own defaulting does) is
//! admitted one stage unit at a time through a Workload the operator owns: RL's parameter
//! servers and learners together, a warm-up's ranks together, each distillation student
//! alone. Nothing of a unit is created before its Workload is admitted, so a stage never holds
//! part of its GPUs while the rest wait.
//!
//! RltRun is registered with Kueue as an external framework (`integrations.externalFrameworks:
//! [RltRun.v1alpha1.rlt.dev]`): Kueue then never defaults the queue of the run's Jobs, and the
//! operator plays the part Kueue's own job integrations play: it creates the Workload, starts
//! the unit's pods on admission with the flavors' node labels and tolerations, stops them on
//! eviction and then gives the quota back (the Workload's reservation cleared, `Requeued`), and
//! marks the Workload `Finished` when the unit ends.
//!
//! The types here carry only the fields the operator reads or writes; the status writes go
//! through the whole object as JSON ([`requeue`], [`finish`]) so nothing Kueue wrote is lost.
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::CustomResource;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The LocalQueue a run is queued in (on the RltRun's metadata).
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// The WorkloadPriorityClass of a run's Workloads (on the RltRun's metadata).
pub const PRIORITY_LABEL: &str = "kueue.x-k8s.io/priority-class";
/// The LocalQueue Kueue uses for a namespace's objects that name none.
pub const DEFAULT_QUEUE: &str = "default";
/// On admitted pods, as Kueue's integrations label them: the pod set they belong to.
pub const PODSET_LABEL: &str = "kueue.x-k8s.io/podset";
/// Every label of Kueue's: never copied from the run to its children (a queue-name label on
/// a Job would have Kueue queue it on its own).
pub const LABEL_PREFIX: &str = "kueue.x-k8s.io/";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kueue.x-k8s.io",
    version = "v1beta2",
    kind = "Workload",
    namespaced,
    status = "WorkloadStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub queue_name: String,
    pub pod_sets: Vec<PodSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_ref: Option<PriorityClassRef>,
    /// Kueue requires it with `priorityClassRef`: the class's value, as its integrations copy it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PodSet {
    pub name: String,
    pub count: i32,
    pub template: PodTemplateSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PriorityClassRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct WorkloadStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<AdmissionStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionStatus {
    #[serde(default)]
    pub cluster_queue: String,
    #[serde(default)]
    pub pod_set_assignments: Vec<PodSetAssignment>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PodSetAssignment {
    pub name: String,
    /// Resource name -> ResourceFlavor name.
    #[serde(default)]
    pub flavors: BTreeMap<String, String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "kueue.x-k8s.io",
    version = "v1beta2",
    kind = "ResourceFlavor",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ResourceFlavorSpec {
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
}

/// Watched for its name only: a LocalQueue named `default` makes its namespace queued.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "kueue.x-k8s.io",
    version = "v1beta2",
    kind = "LocalQueue",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct LocalQueueSpec {
    #[serde(default)]
    pub cluster_queue: String,
}

/// A WorkloadPriorityClass: its `value` is top-level (no spec), so no derive.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct WorkloadPriorityClass {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub value: i32,
}

impl kube::Resource for WorkloadPriorityClass {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "WorkloadPriorityClass".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "kueue.x-k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1beta2".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "workloadpriorityclasses".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What a reconcile knows of Kueue, from the operator's stores.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fleet {
    /// Kueue's Workload API is served (looked up when the operator starts).
    pub installed: bool,
    /// The run's namespace has a LocalQueue named `default`.
    pub default_queue: bool,
    /// ResourceFlavor name -> what it adds to the pods it places.
    pub flavors: BTreeMap<String, Placement>,
    /// WorkloadPriorityClass name -> value.
    pub priorities: BTreeMap<String, i32>,
}

/// What an admission adds to a pod set's pods: its flavors' node labels and tolerations.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Placement {
    pub node_labels: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
}

impl From<&ResourceFlavor> for Placement {
    fn from(f: &ResourceFlavor) -> Self {
        Placement {
            node_labels: f.spec.node_labels.clone(),
            tolerations: f.spec.tolerations.clone(),
        }
    }
}

/// Where a unit's Workload stands.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Waiting for quota (Kueue's message says what is missing).
    Pending {
        message: String,
    },
    /// Admitted: the placement of each pod set, by pod-set name.
    Admitted {
        placements: BTreeMap<String, Placement>,
    },
    /// Evicted (preempted, its queue stopped, ...) `since`; `holds_quota` until the operator
    /// has stopped the unit's pods and cleared the reservation.
    Evicted {
        since: Time,
        reason: String,
        message: String,
        holds_quota: bool,
    },
    Finished,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObservedWorkload {
    pub name: String,
    pub state: State,
}

fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn is_true(conditions: &[Condition], type_: &str) -> bool {
    condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Reads a Workload's state; an admitted pod set's flavors are resolved against `flavors`
/// (a flavor not in the store adds nothing).
pub fn observe(w: &Workload, flavors: &BTreeMap<String, Placement>) -> ObservedWorkload {
    let status = w.status.clone().unwrap_or_default();
    let c = &status.conditions;
    let holds_quota = is_true(c, "QuotaReserved") && status.admission.is_some();
    let state = if is_true(c, "Finished") {
        State::Finished
    } else if let Some(ev) = condition(c, "Evicted").filter(|e| e.status == "True") {
        State::Evicted {
            since: ev.last_transition_time.clone(),
            reason: ev.reason.clone(),
            message: ev.message.clone(),
            holds_quota,
        }
    } else if is_true(c, "Admitted") && holds_quota {
        let admission = status.admission.unwrap_or_default();
        let placements = admission
            .pod_set_assignments
            .iter()
            .map(|a| {
                let mut p = Placement::default();
                let mut names: Vec<&String> = a.flavors.values().collect();
                names.sort();
                names.dedup();
                for f in names.into_iter().filter_map(|n| flavors.get(n)) {
                    p.node_labels.extend(f.node_labels.clone());
                    for t in &f.tolerations {
                        if !p.tolerations.contains(t) {
                            p.tolerations.push(t.clone());
                        }
                    }
                }
                (a.name.clone(), p)
            })
            .collect();
        State::Admitted { placements }
    } else {
        let message = condition(c, "QuotaReserved")
            .map(|q| q.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "waiting for Kueue to look at it".into());
        State::Pending { message }
    };
    ObservedWorkload {
        name: w.metadata.name.clone().unwrap_or_default(),
        state,
    }
}

/// A pod set as Kueue reads it: its pods' resources, node selection and priority. What varies
/// from one attempt to the next (the attempt label, the configuration volume, the environment)
/// is left out: a Workload spans a unit's attempts, and Kueue refuses edits of the pod sets of
/// an admitted one.
pub fn pod_set(name: &str, count: i32, template: &PodTemplateSpec, drop_label: &str) -> PodSet {
    let spec = template.spec.clone().unwrap_or_default();
    let bare = |c: &Container| Container {
        name: c.name.clone(),
        image: c.image.clone(),
        resources: c.resources.clone(),
        restart_policy: c.restart_policy.clone(),
        ..Default::default()
    };
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.remove(drop_label);
    PodSet {
        name: name.into(),
        count,
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: spec.containers.iter().map(bare).collect(),
                init_containers: spec
                    .init_containers
                    .as_ref()
                    .map(|cs| cs.iter().map(bare).collect()),
                node_selector: spec.node_selector,
                affinity: spec.affinity,
                tolerations: spec.tolerations,
                priority_class_name: spec.priority_class_name,
                runtime_class_name: spec.runtime_class_name,
                overhead: spec.overhead,
                restart_policy: spec.restart_policy,
                ..Default::default()
            }),
        },
    }
}

/// Adds an admission's placement to a pod template, as Kueue's integrations do: the flavors'
/// node labels into the node selector, their tolerations appended, the pod-set label.
pub fn place(template: &mut PodTemplateSpec, pod_set: &str, placement: &Placement) {
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert(PODSET_LABEL.into(), pod_set.into());
    let spec = template.spec.get_or_insert_with(Default::default);
    if !placement.node_labels.is_empty() {
        spec.node_selector
            .get_or_insert_with(Default::default)
            .extend(placement.node_labels.clone());
    }
    for t in &placement.tolerations {
        let tolerations = spec.tolerations.get_or_insert_with(Default::default);
        if !tolerations.contains(t) {
            tolerations.push(t.clone());
        }
    }
}

/// A status change the operator makes to one of its Workloads.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusWrite {
    /// The evicted unit's pods are gone: give the quota back and queue again (`Requeued` True
    /// after a preemption or node failure, as Kueue's integrations set it).
    Requeue {
        name: String,
        reason: String,
        message: String,
    },
    /// The unit ended: `Finished` with reason `Succeeded` or `Failed`, which frees its quota.
    Finish {
        name: String,
        succeeded: bool,
        message: String,
    },
}

impl StatusWrite {
    pub fn name(&self) -> &str {
        match self {
            StatusWrite::Requeue { name, .. } | StatusWrite::Finish { name, .. } => name,
        }
    }

    /// Applies the change to a whole Workload object (JSON, so fields this operator does not
    /// know survive the write-back). `now` stamps the conditions that change status.
    pub fn apply_to(&self, workload: &mut Value, now: &str) {
        let status = &mut workload["status"];
        if !status.is_object() {
            *status = Value::Object(Default::default());
        }
        match self {
            StatusWrite::Requeue {
                reason, message, ..
            } => {
                let requeued = reason == "Preempted" || reason == "NodeFailures";
                set_condition(status, "Requeued", requeued, reason, message, now);
                set_condition(status, "QuotaReserved", false, "Pending", message, now);
                set_condition(
                    status,
                    "Admitted",
                    false,
                    "NoReservation",
                    "The workload has no reservation",
                    now,
                );
                status.as_object_mut().unwrap().remove("admission");
            }
            StatusWrite::Finish {
                succeeded, message, ..
            } => {
                let reason = if *succeeded { "Succeeded" } else { "Failed" };
                set_condition(status, "Finished", true, reason, message, now);
            }
        }
    }
}

/// Sets one condition in a JSON status, moving `lastTransitionTime` only when its status flips.
fn set_condition(
    status: &mut Value,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
    now: &str,
) {
    let value = if value { "True" } else { "False" };
    let conditions = status
        .as_object_mut()
        .unwrap()
        .entry("conditions")
        .or_insert_with(|| Value::Array(vec![]));
    if !conditions.is_array() {
        *conditions = Value::Array(vec![]);
    }
    let list = conditions.as_array_mut().unwrap();
    let message: String = message.chars().take(32 * 1024).collect();
    match list.iter_mut().find(|c| c["type"] == type_) {
        Some(c) => {
            if c["status"] != value {
                c["lastTransitionTime"] = now.into();
            }
            c["status"] = value.into();
            c["reason"] = reason.into();
            c["message"] = message.into();
        }
        None => list.push(serde_json::json!({
            "type": type_, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": now,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workload(status: Value) -> Workload {
        serde_json::from_value(json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": "r-rl", "namespace": "default"},
            "spec": {"queueName": "team", "podSets": []},
            "status": status,
        }))
        .unwrap()
    }

    fn cond(t: &str, s: &str, reason: &str, message: &str) -> Value {
        json!({"type": t, "status": s, "reason": reason, "message": message,
               "lastTransitionTime": "2026-12-06T05:25:57Z"})
    }

    fn flavors() -> BTreeMap<String, Placement> {
        let gpu = Placement {
            node_labels: BTreeMap::from([("pool".into(), "gpu".into())]),
            tolerations: vec![Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }],
        };
        let cpu = Placement {
            node_labels: BTreeMap::from([
                ("pool".into(), "gpu".into()),
                ("zone".into(), "a".into()),
            ]),
            tolerations: gpu.tolerations.clone(),
        };
        BTreeMap::from([("gpu".into(), gpu), ("cpu".into(), cpu)])
    }

    #[test]
    fn pending_says_what_kueue_says() {
        let w = workload(
            json!({"conditions": [cond("QuotaReserved", "False", "Pending",
            "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu, 1 more needed")]}),
        );
        let State::Pending { message } = observe(&w, &flavors()).state else {
            panic!()
        };
        assert!(message.contains("insufficient unused quota"), "{message}");
        // Not looked at yet: still pending, with a message of its own.
        let fresh = observe(&workload(json!({})), &flavors());
        assert!(matches!(fresh.state, State::Pending { .. }));
    }

    #[test]
    fn admitted_pod_sets_get_their_flavors_placement() {
        let w = workload(json!({
            "conditions": [cond("QuotaReserved", "True", "QuotaReserved", ""), cond("Admitted", "True", "Admitted", "")],
            "admission": {"clusterQueue": "gpus", "podSetAssignments": [
                {"name": "learners", "flavors": {"nvidia.com/gpu": "gpu", "cpu": "cpu"}, "count": 2},
                {"name": "param-servers", "flavors": {"cpu": "unknown"}, "count": 1}]}}));
        let State::Admitted { placements } = observe(&w, &flavors()).state else {
            panic!()
        };
        let learners = &placements["learners"];
        assert_eq!(learners.node_labels.len(), 2);
        assert_eq!(learners.tolerations.len(), 1, "the same toleration once");
        assert_eq!(placements["param-servers"], Placement::default());
    }

    #[test]
    fn quota_reserved_without_admitted_is_still_pending() {
        let w = workload(json!({
            "conditions": [cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus")],
            "admission": {"clusterQueue": "gpus", "podSetAssignments": []}}));
        assert!(matches!(
            observe(&w, &flavors()).state,
            State::Pending { .. }
        ));
    }

    #[test]
    fn an_eviction_holds_quota_until_requeued_then_finished_wins() {
        let evicted = json!({
            "conditions": [cond("QuotaReserved", "True", "QuotaReserved", ""), cond("Admitted", "True", "Admitted", ""),
                           cond("Evicted", "True", "Preempted", "Preempted to accommodate a workload"),
                           cond("Preempted", "True", "InClusterQueue", "")],
            "admission": {"clusterQueue": "gpus", "podSetAssignments": [{"name": "trainers"}]}});
        let w = workload(evicted.clone());
        let State::Evicted {
            reason,
            holds_quota,
            ..
        } = observe(&w, &flavors()).state
        else {
            panic!()
        };
        assert_eq!(reason, "Preempted");
        assert!(holds_quota);

        let mut whole = serde_json::to_value(&w).unwrap();
        whole["status"]["unknownField"] = json!(7);
        let write = StatusWrite::Requeue {
            name: "r-rl".into(),
            reason: reason.clone(),
            message: "Preempted to accommodate a workload".into(),
        };
        write.apply_to(&mut whole, "2026-12-06T06:00:00Z");
        assert_eq!(
            whole["status"]["unknownField"], 7,
            "fields it does not know survive"
        );
        assert!(whole["status"].get("admission").is_none());
        let back: Workload = serde_json::from_value(whole.clone()).unwrap();
        let c = &back.status.as_ref().unwrap().conditions;
        let get = |t: &str| condition(c, t).unwrap();
        assert_eq!(get("Requeued").status, "True");
        assert_eq!(get("QuotaReserved").status, "False");
        assert_eq!(
            get("QuotaReserved").last_transition_time.0.to_string(),
            "2026-12-06T06:00:00Z"
        );
        assert_eq!(get("Admitted").reason, "NoReservation");
        // Evicted stays (Kueue flips it at the next admission); the quota is no longer held.
        let State::Evicted { holds_quota, .. } = observe(&back, &flavors()).state else {
            panic!()
        };
        assert!(!holds_quota);

        StatusWrite::Finish {
            name: "r-rl".into(),
            succeeded: true,
            message: "warmup succeeded".into(),
        }
        .apply_to(&mut whole, "2026-12-06T06:01:00Z");
        let done: Workload = serde_json::from_value(whole).unwrap();
        assert_eq!(observe(&done, &flavors()).state, State::Finished);
    }

    #[test]
    fn an_eviction_that_is_not_a_preemption_is_requeued_false() {
        let mut w = json!({"status": {"conditions": []}});
        StatusWrite::Requeue {
            name: "w".into(),
            reason: "ClusterQueueStopped".into(),
            message: "stopped".into(),
        }
        .apply_to(&mut w, "2026-12-06T06:00:00Z");
        let requeued = &w["status"]["conditions"][0];
        assert_eq!(requeued["type"], "Requeued");
        assert_eq!(requeued["status"], "False");
    }

    #[test]
    fn pod_sets_leave_out_what_changes_between_attempts() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"rlt.dev/attempt": "3", "rlt.dev/run": "r"}, "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "trainer", "image": "i", "env": [{"name": "RLT_ATTEMPT", "value": "3"}],
                "resources": {"requests": {"nvidia.com/gpu": "1"}}}],
                "volumes": [{"name": "config", "configMap": {"name": "r-config-rl-3"}}],
                "nodeSelector": {"pool": "a"}, "priorityClassName": "high", "restartPolicy": "Never"}}))
        .unwrap();
        let set = pod_set("learners", 2, &template, "rlt.dev/attempt");
        let json = serde_json::to_value(&set).unwrap();
        assert_eq!(json["count"], 2);
        assert_eq!(
            json["template"]["metadata"],
            json!({"labels": {"rlt.dev/run": "r"}})
        );
        let spec = &json["template"]["spec"];
        assert!(spec.get("volumes").is_none());
        assert!(spec["containers"][0].get("env").is_none());
        assert_eq!(
            spec["containers"][0]["resources"]["requests"]["nvidia.com/gpu"],
            "1"
        );
        assert_eq!(spec["nodeSelector"]["pool"], "a");
        assert_eq!(spec["priorityClassName"], "high");
    }

    #[test]
    fn placing_merges_selectors_and_tolerations_once() {
        let mut t: PodTemplateSpec = serde_json::from_value(json!({
            "spec": {"containers": [], "nodeSelector": {"disk": "ssd"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}}))
        .unwrap();
        place(&mut t, "learners", &flavors()["cpu"]);
        let spec = t.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap().len(), 3);
        assert_eq!(spec.tolerations.unwrap().len(), 1);
        assert_eq!(
            t.metadata.unwrap().labels.unwrap()[PODSET_LABEL],
            "learners"
        );
    }
}
