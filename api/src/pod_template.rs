//! `podTemplate`: what a platform team adds to a role's pods so that they fit the cluster's
//! policies and habits (a team label a policy requires, an annotation that keeps a sidecar
//! out, `runtimeClassName: nvidia`, a token or cache volume, topology spread, a security
//! context an OpenShift SCC accepts). One at the run's level for every stage pod, one per role
//! on top of it.
//!
//! Volumes, mounts, init containers, topology spread and the security context are Kubernetes'
//! own types, kept as free-form objects in the schema: their full schemas, once per role,
//! would multiply the CRD's size (already ~420 KB with one copy of `Volume` and `Affinity`).
//! [`errors`] parses each into its typed form, so a malformed entry makes the run
//! `InvalidSpec` naming it, and the API server checks the rest of its rules when the operator
//! creates the pods.
use k8s_openapi::api::core::v1::{
    Container, PodSecurityContext, TopologySpreadConstraint, Volume, VolumeMount,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Label and annotation keys the operator owns on its pods.
pub const RESERVED_KEY_PREFIX: &str = "rlt.dev/";
/// Labels the operator sets on every child besides its `rlt.dev/` ones.
pub const RESERVED_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app.kubernetes.io/managed-by"];
/// Volume names of the stage pods' own volumes (inputs are `in-<name>`).
pub const RESERVED_VOLUMES: [&str; 4] = ["config", "workspace", "tmp", "shm"];
/// Where the stage pods mount their own volumes: an added mount may not be at or under them.
pub const RESERVED_MOUNTS: [&str; 4] = [
    crate::contract::WORKSPACE_MOUNT_DIR,
    crate::contract::CONFIG_MOUNT_DIR,
    "/tmp",
    "/dev/shm",
];

/// Additions to the pods of a role. Labels and annotations are merged (the role's win over
/// the run's, the operator's own keys cannot be set); lists are appended, the role's after the
/// run's; `runtimeClassName` and `securityContext` of the role replace the run's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    /// Labels of the pods (e.g. a team or cost-centre label an admission policy requires).
    /// Keys under `rlt.dev/` and `app.kubernetes.io/name`/`managed-by` are the operator's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: BTreeMap<String, String>,
    /// Annotations of the pods (e.g. `sidecar.istio.io/inject: "false"`, which a Job's pods
    /// need in a meshed namespace to complete). Keys under `rlt.dev/` are the operator's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub annotations: BTreeMap<String, String>,
    /// The pods' RuntimeClass (GPU nodes on k3s, RKE2 and OpenShift need `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
    /// More pod volumes (a pod's `volumes` entries), e.g. a projected token or a cache; names
    /// other than the pods' own (`config`, `workspace`, `tmp`, `shm`, `in-*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "objects")]
    pub volumes: Vec<Value>,
    /// Mounts of those volumes in the trainer container (a container's `volumeMounts`
    /// entries), not at or under `/workspace`, `/etc/rlt`, `/tmp` or `/dev/shm`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "objects")]
    pub volume_mounts: Vec<Value>,
    /// Init containers (a pod's `initContainers` entries), run before the trainer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "objects")]
    pub init_containers: Vec<Value>,
    /// A pod's `topologySpreadConstraints` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "objects")]
    pub topology_spread_constraints: Vec<Value>,
    /// The pods' security context, replacing the operator's (non-root as user, group and
    /// fsGroup 65532, seccomp `RuntimeDefault`) whole. Under OpenShift's restricted SCC give
    /// `{runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}` and let the SCC choose
    /// the UIDs: the image runs as a non-root user either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "object")]
    pub security_context: Option<Value>,
}

/// Free-form objects: Kubernetes' own types, checked by [`errors`] and the API server.
fn objects(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 32,
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
    })
}

fn object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

impl PodTemplate {
    pub fn is_empty(&self) -> bool {
        *self == PodTemplate::default()
    }

    /// `self` (a role's) on top of `base` (the run's).
    pub fn over(&self, base: &PodTemplate) -> PodTemplate {
        let merged = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
            let mut m = b.clone();
            m.extend(a.iter().map(|(k, v)| (k.clone(), v.clone())));
            m
        };
        let appended = |a: &[Value], b: &[Value]| [b, a].concat();
        PodTemplate {
            labels: merged(&self.labels, &base.labels),
            annotations: merged(&self.annotations, &base.annotations),
            runtime_class_name: self
                .runtime_class_name
                .clone()
                .or_else(|| base.runtime_class_name.clone()),
            volumes: appended(&self.volumes, &base.volumes),
            volume_mounts: appended(&self.volume_mounts, &base.volume_mounts),
            init_containers: appended(&self.init_containers, &base.init_containers),
            topology_spread_constraints: appended(
                &self.topology_spread_constraints,
                &base.topology_spread_constraints,
            ),
            security_context: self
                .security_context
                .clone()
                .or_else(|| base.security_context.clone()),
        }
    }

    pub fn typed_volumes(&self) -> Vec<Volume> {
        typed(&self.volumes)
    }
    pub fn typed_volume_mounts(&self) -> Vec<VolumeMount> {
        typed(&self.volume_mounts)
    }
    pub fn typed_init_containers(&self) -> Vec<Container> {
        typed(&self.init_containers)
    }
    pub fn typed_topology_spread_constraints(&self) -> Vec<TopologySpreadConstraint> {
        typed(&self.topology_spread_constraints)
    }
    pub fn typed_security_context(&self) -> Option<PodSecurityContext> {
        let v = self.security_context.as_ref()?;
        serde_json::from_value(v.clone()).ok()
    }
}

/// The entries that parse (a valid run's are all of them: [`errors`] refuses the others).
fn typed<T: DeserializeOwned>(values: &[Value]) -> Vec<T> {
    values
        .iter()
        .filter_map(|v| serde_json::from_value(v.clone()).ok())
        .collect()
}

/// Whether a label key is the operator's (of annotations, only the `rlt.dev/` ones are).
pub fn is_reserved_key(key: &str) -> bool {
    key.starts_with(RESERVED_KEY_PREFIX) || RESERVED_LABELS.contains(&key)
}

/// What is wrong with a pod template at `field` (`spec.warmup.podTemplate`), as
/// (field, message) pairs.
pub fn errors(field: &str, t: &PodTemplate) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let annotation_reserved = |k: &str| k.starts_with(RESERVED_KEY_PREFIX);
    for (kind, map, reserved) in [
        (
            "labels",
            &t.labels,
            &is_reserved_key as &dyn Fn(&str) -> bool,
        ),
        ("annotations", &t.annotations, &annotation_reserved),
    ] {
        for key in map.keys().filter(|k| reserved(k)) {
            out.push((
                format!("{field}.{kind}[{key}]"),
                format!("{key} is set by the operator"),
            ));
        }
    }
    parse_each::<Volume>(field, "volumes", &t.volumes, &mut out);
    parse_each::<VolumeMount>(field, "volumeMounts", &t.volume_mounts, &mut out);
    parse_each::<Container>(field, "initContainers", &t.init_containers, &mut out);
    parse_each::<TopologySpreadConstraint>(
        field,
        "topologySpreadConstraints",
        &t.topology_spread_constraints,
        &mut out,
    );
    if let Some(v) = &t.security_context {
        if let Err(e) = serde_json::from_value::<PodSecurityContext>(v.clone()) {
            out.push((format!("{field}.securityContext"), e.to_string()));
        }
    }
    for (i, v) in t.typed_volumes().iter().enumerate() {
        if RESERVED_VOLUMES.contains(&v.name.as_str()) || v.name.starts_with("in-") {
            out.push((
                format!("{field}.volumes[{i}].name"),
                format!(
                    "{} is a name of the stage pods' own volumes ({}, in-*)",
                    v.name,
                    RESERVED_VOLUMES.join(", ")
                ),
            ));
        }
    }
    for (i, m) in t.typed_volume_mounts().iter().enumerate() {
        let path = m.mount_path.trim_end_matches('/');
        if path.is_empty()
            || RESERVED_MOUNTS
                .iter()
                .any(|r| path == *r || path.starts_with(&format!("{r}/")))
        {
            out.push((
                format!("{field}.volumeMounts[{i}].mountPath"),
                format!(
                    "must not be /, or at or under {} (the stage pods' own mounts)",
                    RESERVED_MOUNTS.join(", ")
                ),
            ));
        }
    }
    out
}

fn parse_each<T: DeserializeOwned>(
    field: &str,
    list: &str,
    values: &[Value],
    out: &mut Vec<(String, String)>,
) {
    for (i, v) in values.iter().enumerate() {
        if let Err(e) = serde_json::from_value::<T>(v.clone()) {
            out.push((format!("{field}.{list}[{i}]"), e.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(v: Value) -> PodTemplate {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_role_adds_to_the_run_and_wins_where_both_say() {
        let run = template(json!({
            "labels": {"team": "ml", "tier": "batch"},
            "runtimeClassName": "nvidia",
            "volumes": [{"name": "cache", "emptyDir": {}}],
        }));
        let role = template(json!({
            "labels": {"tier": "gpu"},
            "annotations": {"sidecar.istio.io/inject": "false"},
            "volumes": [{"name": "token", "projected": {"sources": []}}],
        }));
        let t = role.over(&run);
        assert_eq!(t.labels["team"], "ml");
        assert_eq!(t.labels["tier"], "gpu");
        assert_eq!(t.annotations["sidecar.istio.io/inject"], "false");
        assert_eq!(t.runtime_class_name.as_deref(), Some("nvidia"));
        let names: Vec<String> = t.typed_volumes().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["cache", "token"]);
    }

    #[test]
    fn malformed_and_reserved_entries_are_named() {
        let t = template(json!({
            "labels": {"rlt.dev/run": "x", "app.kubernetes.io/managed-by": "me", "ok": "1"},
            "volumes": [{"name": "workspace", "emptyDir": {}}, {"name": 3}],
            "volumeMounts": [{"name": "cache", "mountPath": "/tmp/cache"}, {"name": "c", "mountPath": "/cache"}],
            "initContainers": [{"name": "fetch", "image": "busybox", "command": "not-a-list"}],
            "securityContext": {"runAsUser": "root"},
        }));
        let got = errors("spec.podTemplate", &t);
        let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.podTemplate.labels[app.kubernetes.io/managed-by]",
                "spec.podTemplate.labels[rlt.dev/run]",
                "spec.podTemplate.volumes[1]",
                "spec.podTemplate.initContainers[0]",
                "spec.podTemplate.securityContext",
                "spec.podTemplate.volumes[0].name",
                "spec.podTemplate.volumeMounts[0].mountPath",
            ],
            "{got:#?}"
        );
        assert!(errors(
            "spec.podTemplate",
            &template(json!({"labels": {"ok": "1"}}))
        )
        .is_empty());
    }
}
