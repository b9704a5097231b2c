//! The child objects of a run, built from its spec and the stage contract
//! (`rlt_api::contract`). Pure functions: the same run and attempt always give the same
//! objects, with deterministic names and a content hash the reconciler compares instead of
//! diffing against server-defaulted objects.
//!
//! - [`names`]: every child's name, sized so that what the API server derives from it stays
//!   a DNS label;
//! - `pod`: the pod template all stage pods share (environment, container, volumes, security);
//! - `workloads`: the Jobs, the parameter-server StatefulSet and its headless Service;
//! - `admission`: a stage's admission units and their Kueue Workloads.
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, PersistentVolumeClaimSpec, Service,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use rlt_api::contract::{self, Role};
use rlt_api::spec::{AccessMode, RetainPolicy, RltRun};
use serde::Serialize;
use std::collections::BTreeMap;

use crate::kueue::{self, Workload};

mod admission;
pub mod names;
mod pod;
mod workloads;

pub use admission::{place, pod_set_of, queue_units, queue_workload, Unit};
pub use pod::{DEFAULT_SHM_SIZE, SCRATCH_DIR};
pub use workloads::{
    distill_job, learner_job, needs_ranks_service, param_server_service, param_server_set,
    ranks_service, stale_param_server_sets, status_url, warmup_job,
};

pub const LABEL_RUN: &str = "rlt.dev/run";
pub const LABEL_STAGE: &str = "rlt.dev/stage";
pub const LABEL_ROLE: &str = "rlt.dev/role";
pub const LABEL_ATTEMPT: &str = "rlt.dev/attempt";
pub const LABEL_STUDENT: &str = "rlt.dev/student";
/// On the pods of a data-parallel group spanning pods: what the ranks Service selects.
pub const LABEL_RANK: &str = "rlt.dev/rank";
/// Hash of the desired object; a child whose annotation matches is left alone (no write).
pub const ANNOTATION_HASH: &str = "rlt.dev/spec-hash";
pub const CONTAINER: &str = "trainer";
/// The UID/GID the trainer runs as (non-root); the workspace is made group-writable for it.
pub const RUN_AS: i64 = 65532;

pub use rlt_api::stage::Stage;

/// Kinds of children, for deletes and observed-object bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ConfigMap,
    PersistentVolumeClaim,
    Job,
    StatefulSet,
    Service,
    /// Kueue's, when the run is queued ([`crate::kueue`]).
    Workload,
}

/// A child to server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    ConfigMap(ConfigMap),
    Pvc(PersistentVolumeClaim),
    Job(Job),
    StatefulSet(StatefulSet),
    Service(Service),
    Workload(Workload),
}

impl Child {
    pub fn kind(&self) -> Kind {
        match self {
            Child::ConfigMap(_) => Kind::ConfigMap,
            Child::Pvc(_) => Kind::PersistentVolumeClaim,
            Child::Job(_) => Kind::Job,
            Child::StatefulSet(_) => Kind::StatefulSet,
            Child::Service(_) => Kind::Service,
            Child::Workload(_) => Kind::Workload,
        }
    }
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Child::ConfigMap(o) => &o.metadata,
            Child::Pvc(o) => &o.metadata,
            Child::Job(o) => &o.metadata,
            Child::StatefulSet(o) => &o.metadata,
            Child::Service(o) => &o.metadata,
            Child::Workload(o) => &o.metadata,
        }
    }
    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }
    /// The object as the API server takes it (apiVersion and kind included).
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Child::ConfigMap(o) => serde_json::to_value(o),
            Child::Pvc(o) => serde_json::to_value(o),
            Child::Job(o) => serde_json::to_value(o),
            Child::StatefulSet(o) => serde_json::to_value(o),
            Child::Service(o) => serde_json::to_value(o),
            Child::Workload(o) => serde_json::to_value(o),
        };
        value.expect("children serialize")
    }
    pub fn hash(&self) -> Option<&str> {
        self.meta()
            .annotations
            .as_ref()?
            .get(ANNOTATION_HASH)
            .map(String::as_str)
    }
}

/// Everything the builders need besides the run: the attempt of the stage being built.
pub struct Ctx<'a> {
    pub run: &'a RltRun,
    pub name: String,
    pub namespace: String,
    owner: OwnerReference,
}

impl<'a> Ctx<'a> {
    pub fn new(run: &'a RltRun) -> Ctx<'a> {
        let owner = run
            .controller_owner_ref(&())
            .unwrap_or_else(|| OwnerReference {
                api_version: RltRun::api_version(&()).into(),
                kind: RltRun::kind(&()).into(),
                name: run.name_any(),
                uid: run.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            });
        Ctx {
            run,
            name: run.name_any(),
            namespace: run.namespace().unwrap_or_else(|| "default".into()),
            owner,
        }
    }

    fn labels(
        &self,
        stage: Option<Stage>,
        role: Option<Role>,
        attempt: Option<u32>,
    ) -> BTreeMap<String, String> {
        // The run's own labels travel to every child (a policy that requires a team label
        // on pods then accepts them), under the operator's.
        let mut l: BTreeMap<String, String> = self
            .run
            .labels()
            .iter()
            .filter(|(k, _)| !rlt_api::pod_template::is_reserved_key(k))
            .filter(|(k, _)| !k.starts_with(kueue::LABEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        l.extend([
            (
                "app.kubernetes.io/name".to_string(),
                "rlt-trainer".to_string(),
            ),
            (
                "app.kubernetes.io/managed-by".to_string(),
                "rlt-operator".to_string(),
            ),
            (LABEL_RUN.to_string(), self.name.clone()),
        ]);
        if let Some(s) = stage {
            l.insert(LABEL_STAGE.into(), s.label().into());
        }
        if let Some(r) = role {
            l.insert(LABEL_ROLE.into(), r.subcommand().into());
        }
        if let Some(a) = attempt {
            l.insert(LABEL_ATTEMPT.into(), a.to_string());
        }
        l
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    fn claim_name(&self) -> String {
        self.run
            .spec
            .workspace
            .claim_name
            .clone()
            .unwrap_or_else(|| names::workspace(&self.name))
    }
}

/// Stamps the content hash annotation (FNV-1a of the JSON, stable across processes).
fn hashed<T: Serialize + Resource>(mut obj: T) -> T {
    let hash = fnv(&serde_json::to_vec(&obj).expect("child serializes"));
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_HASH.into(), hash);
    obj
}

/// FNV-1a: stable across processes and releases (unlike std's hasher).
fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The configuration snapshot of a stage attempt ([`names::config_map`]): immutable (the API
/// server refuses edits, and kubelets need not watch it), created once when the attempt starts.
pub fn config_map(ctx: &Ctx, stage: Stage, attempt: u32) -> Child {
    Child::ConfigMap(ConfigMap {
        metadata: ctx.meta(
            names::config_map(&ctx.name, stage, attempt),
            ctx.labels(Some(stage), None, Some(attempt)),
        ),
        data: Some(BTreeMap::from([(
            contract::CONFIG_FILE.to_string(),
            contract::render_config(ctx.run),
        )])),
        immutable: Some(true),
        ..Default::default()
    })
}

/// The workspace claim, when the run does not name an existing one (access modes: see
/// [`rlt_api::spec::Workspace::access_modes`]).
pub fn workspace_pvc(ctx: &Ctx) -> Option<Child> {
    let ws = &ctx.run.spec.workspace;
    if ws.claim_name.is_some() {
        return None;
    }
    // Every stage but warm-up runs several pods at once (RL: parameter servers and
    // learners), which the scheduler may place on different nodes: ReadWriteMany unless the
    // run says otherwise.
    let modes: &[AccessMode] = if ws.access_modes.is_empty() {
        &[AccessMode::ReadWriteMany]
    } else {
        &ws.access_modes
    };
    let modes: Vec<String> = modes
        .iter()
        .map(|m| {
            serde_json::to_value(m)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut metadata = ctx.meta(names::workspace(&ctx.name), ctx.labels(None, None, None));
    if ws.retain_policy == RetainPolicy::Retain {
        // No owner: deleting the run does not collect the claim (and the trained models).
        metadata.owner_references = None;
    }
    let pvc = PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(modes),
            storage_class_name: ws.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    Quantity(ws.size.clone().unwrap_or_else(|| "10Gi".into())),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(Child::Pvc(hashed(pvc)))
}

#[cfg(test)]
mod tests;
