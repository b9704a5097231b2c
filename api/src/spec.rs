//! The `RltRun` custom resource (`rlt.dev/v1alpha1`): what a platform team writes.
//!
//! Every field has a default that is either the paper's recipe or the smallest thing that
//! works, so a tiny CPU run is a dozen lines of YAML (`api/tests/good/tiny-cpu.yaml`). Bounds
//! live in the schema (schemars attributes); cross-field rules are CEL
//! (`x-kubernetes-validations`) so `kubectl apply` rejects a bad run naming the field, and
//! [`crate::validate`] evaluates the very same schema client-side for `rlt-trainer pipeline`.
//!
//! Serde defaults and schema defaults come from the same functions, so a run read from a file
//! and a run read back from the API server agree.
pub use crate::pod_template::PodTemplate;
use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, LocalObjectReference, ResourceRequirements, Toleration, Volume,
};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::status::*;

/// Longest run name: child names are `<run>-distill-<student>-<attempt>` and must stay a
/// 63-character DNS label (the Job controller copies the Job name into a pod label).
pub const MAX_RUN_NAME: usize = 24;
/// Longest student name, for the same reason.
pub const MAX_STUDENT_NAME: usize = 20;
/// Digits of the largest stage attempt child names are sized for (an Indexed Job's pods
/// are named `<job>-<index>`, itself a 63-character DNS label): attempts count failures
/// (`failurePolicy.retries` <= 100) and resumes, so five digits are never reached. Five, not
/// more, so that a 256-pod distillation Job's pods `<run>-distill-<student>-<attempt>-255`
/// fit.
pub const MAX_ATTEMPT_DIGITS: usize = 5;
/// Largest seed: any u32, so a seed survives a round trip through any JSON reader.
const MAX_SEED: u64 = u32::MAX as u64;
/// Largest checkpoint / re-sync interval in steps.
const MAX_INTERVAL: u32 = 1_000_000;
/// A DNS-1123 subdomain (names of service accounts, claims, classes).
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The root rules of an `RltRun`: its name becomes part of every child's name, so it must be a
/// DNS label (Services need a leading letter) short enough for
/// `<run>-distill-<student>-<attempt>-<index>` to stay one.
const NAME_RULES: [(&str, &str); 2] = [
    (
        "size(self.metadata.name) <= 24",
        "metadata.name must be at most 24 characters (child object names derive from it)",
    ),
    (
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "metadata.name must be a DNS label starting with a letter (lower case letters, digits, '-'): child object names derive from it",
    ),
];

/// The root schema, by hand because kube derives none with `metadata`: the name rules'
/// `fieldPath: .metadata.name` must resolve to a declared property, or the API server refuses
/// the CRD ("fieldPath must be a valid path"). Only `metadata.name` and `generateName` may be
/// declared there; declaring them with `kind` and `apiVersion` also makes the API server type
/// the CEL variable from this schema, and the name's `maxLength` (the API server's own limit,
/// so it never preempts the rules' messages) bounds the rules' estimated cost.
impl schemars::JsonSchema for RltRun {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RltRun".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut spec = generator.subschema_for::<RltRunSpec>().to_value();
        let transitions = crate::edits::transition_rules(&spec);
        if let Some(rules) = spec
            .get_mut("x-kubernetes-validations")
            .and_then(serde_json::Value::as_array_mut)
        {
            rules.extend(transitions);
        }
        let status = generator.subschema_for::<Option<RltRunStatus>>();
        let rules: Vec<serde_json::Value> = NAME_RULES
            .iter()
            .map(|(rule, message)| {
                serde_json::json!({"rule": rule, "message": message, "fieldPath": ".metadata.name"})
            })
            .collect();
        let mut schema = schemars::json_schema!({
            "title": "RltRun",
            "description": "An RLT (Reinforcement-Learned Teacher) training run: warm-up, RL, distillation.",
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string", "description": "rlt.dev/v1alpha1"},
                "kind": {"type": "string", "description": "RltRun"},
                "metadata": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 253},
                        "generateName": {"type": "string", "maxLength": 253}
                    }
                },
                "spec": spec,
                "status": status
            },
            "required": ["spec"],
            "x-kubernetes-validations": rules
        });
        known_integer_formats(&mut schema);
        schema
    }
}

/// Applies `edit` to every object of a schema, outermost first, for the rewrites below.
fn rewrite_objects(
    schema: &mut schemars::Schema,
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) {
    fn walk(
        v: &mut serde_json::Value,
        edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>),
    ) {
        match v {
            serde_json::Value::Object(map) => {
                edit(map);
                map.values_mut().for_each(|v| walk(v, edit));
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| walk(v, edit)),
            _ => {}
        }
    }
    let mut value = schema.clone().to_value();
    walk(&mut value, &edit);
    if let Ok(rewritten) = schemars::Schema::try_from(value) {
        *schema = rewritten;
    }
}

/// schemars names unsigned integers `uint32`/`uint64`, formats the API server does not know
/// (`kubectl apply` then warns `unrecognized format "uint32"` on every run): they become
/// `int64`, bounded to what the Rust type holds (a u64 to what a JSON number holds exactly).
fn known_integer_formats(schema: &mut schemars::Schema) {
    rewrite_objects(schema, |map| {
        let max = match map.get("format").and_then(serde_json::Value::as_str) {
            Some("uint8") => u64::from(u8::MAX),
            Some("uint16") => u64::from(u16::MAX),
            Some("uint32") => u64::from(u32::MAX),
            Some("uint64" | "uint") => (1u64 << 53) - 1,
            _ => return,
        };
        // Within the type's range whatever the field's own bounds say.
        let own = |k: &str| map.get(k).and_then(serde_json::Value::as_f64);
        let lo = own("minimum").map_or(0.0, |m| m.max(0.0));
        let hi = own("maximum").map_or(max as f64, |m| m.min(max as f64));
        map.insert("format".into(), "int64".into());
        map.insert("minimum".into(), serde_json::json!(lo as u64));
        map.insert("maximum".into(), serde_json::json!(hi as u64));
    });
}

/// Bounds the `weight` of every preferred (anti-)affinity term to 1..100, as the API server
/// does for pods; without a maximum a weight past i32 would be stored and break every typed
/// read of the runs.
fn bound_affinity_weights(schema: &mut schemars::Schema) {
    rewrite_objects(schema, |map| {
        if let Some(w) = map
            .get_mut("properties")
            .and_then(|p| p.get_mut("weight"))
            .and_then(serde_json::Value::as_object_mut)
        {
            if w.get("type").and_then(serde_json::Value::as_str) == Some("integer") {
                w.insert("minimum".into(), 1.into());
                w.insert("maximum".into(), 100.into());
            }
        }
    });
}

/// Bounds every integer a Kubernetes type leaves unbounded to what its format holds (int32;
/// int64 to what a JSON number holds exactly), as the API server's own types are checked:
/// without a maximum a value past the Rust type would be stored and break every typed read of
/// the runs.
fn bound_integers(schema: &mut schemars::Schema) {
    rewrite_objects(schema, |map| {
        let (lo, hi) = match map.get("format").and_then(serde_json::Value::as_str) {
            Some("int32") => (i64::from(i32::MIN), i64::from(i32::MAX)),
            // What a JSON number holds exactly (a YAML dump of i64::MAX is a float).
            Some("int64") => (-(1i64 << 53) + 1, (1i64 << 53) - 1),
            _ => return,
        };
        map.entry("minimum").or_insert(lo.into());
        map.entry("maximum").or_insert(hi.into());
    });
}

/// An RLT training run: warm-up -> RL -> distillation, each stage's pods run `rlt-trainer <role>`.
// Clippy reads the printcolumns' repeated `type_ = "string"` as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rlt.dev",
    version = "v1alpha1",
    kind = "RltRun",
    plural = "rltruns",
    shortname = "rlt",
    namespaced,
    status = "RltRunStatus",
    derive = "PartialEq",
    doc = "An RLT (Reinforcement-Learned Teacher) training run: warm-up, RL, distillation.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Stage Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Reward", type_ = "number", json_path = ".status.training.meanReward"),
    printcolumn(name = "Attempt", type_ = "integer", json_path = ".status.attempt"),
    printcolumn(name = "GPU-Hours", type_ = "number", json_path = ".status.gpuHours", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // The root schema is written by hand (see `impl JsonSchema for RltRun`): kube derives no
    // `metadata` property, which the name rules' `fieldPath` must resolve to.
    schema = "manual"
)]
#[x_kube(
    validation = Rule::new("!self.distillation.enabled || size(self.distillation.students) > 0")
        .message("distillation.students must list at least one student while distillation is enabled")
        .field_path(".distillation.students"),
    validation = Rule::new("has(self.rl.student) || has(self.teacher.tiny)")
        .message("rl.student must name the scoring student (a model trained on the thought/solution format, e.g. Bespoke-Stratos-7B); only a tiny teacher may score with itself")
        .field_path(".rl.student")
)]
#[serde(rename_all = "camelCase")]
pub struct RltRunSpec {
    /// The trainer image (CPU or CUDA build); every stage pod runs `rlt-trainer <role>` in it.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Image pull policy of every stage pod.
    #[serde(default = "defaults::pull_policy")]
    pub image_pull_policy: PullPolicy,
    /// Secrets for pulling the trainer image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// `cpu`, `cuda`, or `auto` (= `cuda` for pods that request a GPU: `nvidia.com/gpu`, a MIG
    /// slice `nvidia.com/mig-*`, or `amd.com/gpu`; a pod asking only for another extended
    /// resource needs `cpu` or `cuda` said).
    #[serde(default = "defaults::device")]
    pub device: Device,
    /// Number format of training: `auto` is `bf16` on CUDA and `fp32` on CPU. `bf16` keeps
    /// weights and activations in bfloat16 with fp32 master weights, fp32 gradient
    /// accumulation and fp32 optimizer state (sharded across the ranks); `fp32` is fp32
    /// throughout.
    #[serde(default = "defaults::precision")]
    pub precision: Precision,
    /// The teacher's starting model (warm-up starts from it; with warm-up disabled RL does).
    pub teacher: ModelRef,
    /// The dataset of (question, solution[, reasoning trace]) rows.
    pub dataset: Dataset,
    /// Read-only volumes with the run's inputs (models, datasets), mounted in every stage pod:
    /// a model or dataset `path` under an input's `mountPath` is read from that volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub inputs: Vec<InputVolume>,
    /// The shared workspace volume mounted in every stage pod at `/workspace`.
    #[serde(default)]
    pub workspace: Workspace,
    /// The system prompts of the teacher's and the student's chats.
    #[serde(default, skip_serializing_if = "SystemPrompts::is_empty")]
    pub prompts: SystemPrompts,
    #[serde(default)]
    pub warmup: WarmupStage,
    #[serde(default)]
    pub rl: RlStage,
    #[serde(default)]
    pub distillation: DistillationStage,
    /// Scheduling of every stage pod; a stage's own `scheduling` overrides it field by field.
    #[serde(default, skip_serializing_if = "Scheduling::is_empty")]
    pub scheduling: Scheduling,
    /// Additions to every stage pod (labels, annotations, volumes, init containers,
    /// `runtimeClassName`, topology spread, security context); each role's own `podTemplate`
    /// adds to it. The run's own labels are on every child already.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub pod_template: PodTemplate,
    /// Service account of the stage pods (default: the namespace's `default`, without a
    /// mounted API token: the trainer never calls the API server). Naming one mounts its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub service_account_name: Option<String>,
    /// Extra environment for every stage pod (e.g. `HF_HOME`), one entry per name. An entry
    /// named `HOME` or `TMPDIR` replaces the operator's (both `/tmp`, the writable volume under
    /// a read-only root filesystem); the contract's `RLT_*` variables cannot be overridden.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Vec<EnvVar>,
    /// Stops the current stage's pods; setting it back to false continues the stage from its
    /// last checkpoint (as a new attempt). Kueue drives this field.
    #[serde(default)]
    pub suspend: bool,
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Seconds after the run finished (`Succeeded` or `Failed`) when its children are
    /// deleted: the Jobs with their pods (and the pods' logs), the Services and the
    /// configuration. The run and its status stay; the workspace claim follows
    /// `workspace.retainPolicy` (it goes, if at all, with the run). Unset: the children stay
    /// until the run is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Auto,
    Bf16,
    Fp32,
}

/// Sequences at least this long recompute each decoder layer's activations in the backward
/// pass unless the stage says otherwise: at 4k tokens and up, activations dominate memory.
pub const ACTIVATION_CHECKPOINTING_FROM: u32 = 4096;

/// Whether a fine-tune of sequences up to `max_length` recomputes activations per decoder
/// layer: as the stage's `activationCheckpointing` says, else from
/// [`ACTIVATION_CHECKPOINTING_FROM`] tokens.
pub fn activation_checkpointing(setting: Option<bool>, max_length: u32) -> bool {
    setting.unwrap_or(max_length >= ACTIVATION_CHECKPOINTING_FROM)
}

/// A model: either a Hugging Face checkpoint directory or a tiny random model the trainer
/// creates deterministically (tests, CPU demos). Exactly one of the two.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.path) != has(self.tiny)").message("exactly one of path or tiny must be set"))]
#[serde(rename_all = "camelCase")]
pub struct ModelRef {
    /// Checkpoint directory (config.json, tokenizer.json, *.safetensors): absolute, or
    /// relative to the workspace root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiny: Option<TinyModel>,
}

/// A tiny random Qwen2-style model; the same numbers always give the same weights.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.hiddenSize % self.heads == 0").message("tiny.hiddenSize must be a multiple of tiny.heads"),
    validation = Rule::new("self.heads % self.kvHeads == 0").message("tiny.heads must be a multiple of tiny.kvHeads"),
    validation = Rule::new("self.hiddenSize / self.heads % 2 == 0").message("tiny.hiddenSize / tiny.heads (the head size) must be even for rotary embeddings")
)]
#[serde(rename_all = "camelCase")]
pub struct TinyModel {
    /// Width of the tiny model's hidden states.
    #[serde(default = "defaults::tiny_hidden")]
    #[schemars(range(min = 8, max = 4096))]
    pub hidden_size: u32,
    /// Decoder layers.
    #[serde(default = "defaults::tiny_layers")]
    #[schemars(range(min = 1, max = 64))]
    pub layers: u32,
    /// Attention heads (`hiddenSize / heads`, the head size, must be even).
    #[serde(default = "defaults::tiny_heads")]
    #[schemars(range(min = 1, max = 64))]
    pub heads: u32,
    /// Key/value heads of grouped-query attention (divides `heads`).
    #[serde(default = "defaults::tiny_kv_heads")]
    #[schemars(range(min = 1, max = 64))]
    pub kv_heads: u32,
    /// Width of each layer's MLP.
    #[serde(default = "defaults::tiny_intermediate")]
    #[schemars(range(min = 8, max = 16384))]
    pub intermediate_size: u32,
    /// Seed of the random weights (the same seed gives the same model).
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_SEED))]
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            hidden_size: defaults::tiny_hidden(),
            layers: defaults::tiny_layers(),
            heads: defaults::tiny_heads(),
            kv_heads: defaults::tiny_kv_heads(),
            intermediate_size: defaults::tiny_intermediate(),
            seed: 0,
        }
    }
}

/// The training data: a file, or the generated multi-step arithmetic task. Exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.path) != has(self.synthetic)").message("exactly one of path or synthetic must be set"),
    validation = Rule::new("has(self.path) || self.format == 'auto'").message("format applies to a dataset path only")
)]
#[serde(rename_all = "camelCase")]
pub struct Dataset {
    /// A JSON, JSONL or Parquet file: absolute, or relative to the workspace root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: Option<String>,
    /// `stratos` (Bespoke-Stratos conversations), `custom` (question, solution, optional
    /// reasoning_trace columns), or `auto` (detected from the first row).
    #[serde(default = "defaults::dataset_format")]
    pub format: DatasetFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticDataset>,
    /// Use only the first `limit` rows (all when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub limit: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Auto,
    Stratos,
    Custom,
}

/// Generated multi-step arithmetic questions with worked solutions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticDataset {
    /// Rows generated (arithmetic questions with their solutions and step-by-step traces).
    #[serde(default = "defaults::synthetic_rows")]
    #[schemars(range(min = 1, max = 1000000))]
    pub rows: u32,
    /// Seed of the generated rows and of the train/held-out split.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_SEED))]
    pub seed: u64,
}

impl Default for SyntheticDataset {
    fn default() -> Self {
        SyntheticDataset {
            rows: defaults::synthetic_rows(),
            seed: 0,
        }
    }
}

/// A read-only input volume: any volume source (a PersistentVolumeClaim with the models and
/// data, an NFS export, a CSI volume, ...), mounted read-only in every stage pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.mountPath.startsWith('/')").message("mountPath must be an absolute path"),
    validation = Rule::new("!['/workspace', '/etc/rlt', '/tmp', '/dev/shm', '/'].exists(p, self.mountPath == p || self.mountPath.startsWith(p + '/') && p != '/')").message("mountPath must not be /, or at or under /workspace, /etc/rlt, /tmp or /dev/shm (the stage pods' own mounts)")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = bound_integers)]
pub struct InputVolume {
    /// Where the stage pods see it, e.g. `/models`; `teacher.path: /models/Qwen2.5-7B-Instruct`
    /// then reads from it.
    #[schemars(length(min = 2, max = 512))]
    pub mount_path: String,
    /// The volume, as a pod's `volumes` entry: `name` (a DNS label, unique among the inputs)
    /// and exactly one source (`persistentVolumeClaim`, `nfs`, `csi`, `hostPath`, ...).
    #[serde(flatten)]
    pub volume: Volume,
}

/// What happens to a workspace claim the operator created when its run is deleted.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum RetainPolicy {
    /// The claim outlives the run (the trained models with it); a run re-created under the
    /// same name uses it again, in a directory of its own.
    #[default]
    Retain,
    /// The claim is deleted with the run (garbage-collected through its owner reference).
    Delete,
}

/// The shared workspace: an existing claim, or a claim the operator creates. Each run writes
/// under a directory of its own in it (`directory`), so a run deleted and created again under
/// the same name never picks up the earlier run's outputs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!has(self.claimName) || (!has(self.size) && !has(self.storageClassName))")
        .message("claimName (an existing PVC) excludes size and storageClassName (a PVC the operator creates)"),
    validation = Rule::new("!has(self.claimName) || self.retainPolicy == 'Retain'")
        .message("retainPolicy Delete applies to a claim the operator creates; a claim named by claimName is never deleted")
)]
#[serde(rename_all = "camelCase")]
pub struct Workspace {
    /// The run's directory in the workspace. Default: `<run name>-<first 8 characters of the
    /// run's UID>` on a cluster (a re-created run starts afresh), the run's name in a local
    /// `rlt-trainer pipeline`. Naming an earlier run's directory continues that run: its
    /// finished stages are kept and its unfinished one resumes from its checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
    )]
    pub directory: Option<String>,
    /// Whether a claim the operator created outlives the run (`Retain`, the default: trained
    /// models survive `kubectl delete rltrun`) or is deleted with it (`Delete`).
    #[serde(default)]
    pub retain_policy: RetainPolicy,
    /// Checkpoints of a stage kept once its final output is complete (0: deleted; the final
    /// output is all later stages need, and at 7B a checkpoint is tens of GB).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub keep_checkpoints: u32,
    /// Use this existing PersistentVolumeClaim. With several pods per stage on several
    /// nodes it must be ReadWriteMany.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub claim_name: Option<String>,
    /// Size of the claim the operator creates (default 10Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub size: Option<String>,
    /// Storage class of the claim the operator creates (default: the cluster's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub storage_class_name: Option<String>,
    /// Access modes of the claim the operator creates (default `[ReadWriteMany]`: every stage
    /// but warm-up runs several pods at once, which may land on different nodes). A
    /// single-node cluster whose storage has no ReadWriteMany (kind's) can ask for
    /// `[ReadWriteOnce]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub access_modes: Vec<AccessMode>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadWriteMany,
    ReadWriteOncePod,
}

/// Pod placement; every field optional. A stage's `scheduling` overrides the run's per field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Labels a node must have (the pod's `nodeSelector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate (the pod's `tolerations`), e.g. a GPU pool's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = bound_affinity_weights)]
    pub affinity: Option<Affinity>,
    /// The pods' PriorityClass (which pods the scheduler preempts first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub priority_class_name: Option<String>,
    /// The scheduler that places the pods (default: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub scheduler_name: Option<String>,
}

impl Scheduling {
    pub fn is_empty(&self) -> bool {
        *self == Scheduling::default()
    }

    /// `self` (a stage's) overriding `base` (the run's), field by field.
    pub fn over(&self, base: &Scheduling) -> Scheduling {
        Scheduling {
            node_selector: if self.node_selector.is_empty() {
                base.node_selector.clone()
            } else {
                self.node_selector.clone()
            },
            tolerations: if self.tolerations.is_empty() {
                base.tolerations.clone()
            } else {
                self.tolerations.clone()
            },
            affinity: self.affinity.clone().or_else(|| base.affinity.clone()),
            priority_class_name: self
                .priority_class_name
                .clone()
                .or_else(|| base.priority_class_name.clone()),
            scheduler_name: self
                .scheduler_name
                .clone()
                .or_else(|| base.scheduler_name.clone()),
        }
    }
}

/// System prompts. A model brought from elsewhere was trained with some prompt; set it here to
/// match it exactly. Unset, the trainer uses [`defaults::teacher_system`] and
/// [`defaults::student_system`] (our own wording), or their one-line versions for a tiny
/// teacher, whose byte-level tokens make every character cost a position.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SystemPrompts {
    /// The teacher's system prompt (warm-up, RL, collecting explanations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub teacher: Option<String>,
    /// The student's system prompt (scoring in RL, distillation). A Stratos row's own
    /// `system` field wins over it for that row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub student: Option<String>,
}

impl SystemPrompts {
    pub fn is_empty(&self) -> bool {
        *self == SystemPrompts::default()
    }
}

/// AdamW and gradient clipping of one stage. Each stage has its own recipe
/// ([`defaults::warmup_optimizer`], [`defaults::rl_optimizer`],
/// [`defaults::distillation_optimizer`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Optimizer {
    /// AdamW's first-moment decay.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta1: f64,
    /// AdamW's second-moment decay.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta2: f64,
    /// Decoupled weight decay (0 = none).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Gradients are scaled so their global L2 norm is at most this (0 = no clipping).
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub max_grad_norm: f64,
}

/// Warm-up: supervised fine-tuning of the teacher on the teacher format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmupStage {
    /// `false` skips warm-up: RL starts from `spec.teacher` as given.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Seconds an attempt of this stage may run (its Jobs' `activeDeadlineSeconds`): past it
    /// the attempt fails (`DeadlineExceeded`) and is retried under `failurePolicy`. A hang
    /// never holds GPUs longer. None: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u32>,
    /// Data-parallel pods (an Indexed Job); each runs one rank per GPU it requests. The ranks
    /// split every global batch and take one optimizer step together.
    #[serde(default = "defaults::one")]
    #[schemars(range(min = 1, max = 256))]
    pub replicas: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Passes over the training rows.
    #[serde(default = "defaults::warmup_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: u32,
    /// Peak learning rate (linear warm-up, then cosine).
    #[serde(default = "defaults::warmup_lr")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub learning_rate: f64,
    /// Rows per optimizer step, across every rank.
    #[serde(default = "defaults::batch16")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// Longest training sequence in tokens.
    #[serde(default = "defaults::max_length")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_length: u32,
    /// Recompute each decoder layer's activations in the backward pass (less memory, about a
    /// third more compute). Unset: on when `maxLength` is 4096 or more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_checkpointing: Option<bool>,
    /// Fraction of the steps over which the learning rate warms up linearly (then cosine).
    #[serde(default = "defaults::warmup_warmup_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warmup_ratio: f64,
    #[serde(default = "defaults::warmup_optimizer")]
    pub optimizer: Optimizer,
    /// Optimizer steps between resumable checkpoints.
    #[serde(default = "defaults::checkpoint_interval")]
    #[schemars(range(min = 1, max = MAX_INTERVAL))]
    pub checkpoint_interval: u32,
    #[serde(default, skip_serializing_if = "Scheduling::is_empty")]
    pub scheduling: Scheduling,
    /// Additions to the warm-up pods, on top of `spec.podTemplate`.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub pod_template: PodTemplate,
}

/// RL: GRPO with the RLT reward; parameter servers hold the teacher, learners sample and score.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.groupSize >= 2").message("rl.groupSize must be at least 2: advantages are relative to the group").field_path(".groupSize"))]
#[serde(rename_all = "camelCase")]
pub struct RlStage {
    /// Parameter-server shards (a StatefulSet behind a headless Service).
    #[serde(default = "defaults::one")]
    #[schemars(range(min = 1, max = 64))]
    pub param_servers: u32,
    /// Learner ranks (an Indexed Job).
    #[serde(default = "defaults::one")]
    #[schemars(range(min = 1, max = 1024))]
    pub learners: u32,
    /// Seconds an attempt of this stage may run (its Jobs' `activeDeadlineSeconds`): past it
    /// the attempt fails (`DeadlineExceeded`) and is retried under `failurePolicy`. A hang
    /// never holds GPUs longer. None: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u32>,
    /// Seconds RL may go without a new step (read from parameter server 0's figures) once the
    /// attempt's pods run: past it the attempt fails with reason `Stalled` and is retried under
    /// `failurePolicy` (from its last checkpoint). None: no progress deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<u32>,
    /// Seconds a running parameter-server pod may stay not Ready (its node unreachable, its
    /// process hung): past it the attempt ends and the next one starts with fresh pods (a
    /// StatefulSet never replaces a pod on an unreachable node), counted in `disruptions`, not
    /// as a failure. None: wait for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub param_server_not_ready_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_server_resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learner_resources: Option<ResourceRequirements>,
    /// The frozen student that scores explanations: the paper scores with a student trained on
    /// the thought/solution format (Bespoke-Stratos-7B for a Qwen2.5-7B teacher), never the
    /// teacher's untrained starting model. Required unless the teacher is `tiny` (then it
    /// defaults to the teacher, for demos). Must share the teacher's tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student: Option<ModelRef>,
    /// RL steps (optimizer steps of the teacher); each takes `batchSize` prompts.
    #[serde(default = "defaults::rl_steps")]
    #[schemars(range(min = 1, max = 1000000))]
    pub steps: u32,
    /// Learning rate of the teacher's AdamW on the parameter servers.
    #[serde(default = "defaults::rl_lr")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub learning_rate: f64,
    /// Prompts (question, solution) per step; each gets `groupSize` explanations.
    #[serde(default = "defaults::batch16")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// Explanations sampled per prompt; GRPO's advantages are relative to the group.
    #[serde(default = "defaults::group_size")]
    #[schemars(range(min = 1, max = 1024))]
    pub group_size: u32,
    /// Teacher sampling temperature.
    #[serde(default = "defaults::temperature")]
    #[schemars(range(min = 0.0, max = 10.0), extend("exclusiveMinimum" = true))]
    pub temperature: f64,
    /// Longest explanation the teacher may write; a longer one is cut and takes the format
    /// penalty (the reference generates up to 16,384 tokens).
    #[serde(default = "defaults::max_new_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_new_tokens: u32,
    /// Recompute each decoder layer's activations in the learners' policy-gradient pass over
    /// prompt and explanation (less memory, about a third more compute for that pass). Unset:
    /// on when `maxNewTokens` is 4096 or more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_checkpointing: Option<bool>,
    #[serde(default)]
    pub reward: RewardSpec,
    /// GRPO KL penalty towards the reference model.
    #[serde(default = "defaults::beta")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub beta: f64,
    #[serde(default)]
    pub reference_sync: ReferenceSync,
    #[serde(default = "defaults::rl_optimizer")]
    pub optimizer: Optimizer,
    /// Steps between parameter-server checkpoints.
    #[serde(default = "defaults::checkpoint_interval")]
    #[schemars(range(min = 1, max = MAX_INTERVAL))]
    pub checkpoint_interval: u32,
    /// Scheduling of the learners and, unless `paramServerScheduling` is given, of the
    /// parameter servers.
    #[serde(default, skip_serializing_if = "Scheduling::is_empty")]
    pub scheduling: Scheduling,
    /// Scheduling of the parameter servers (CPU and host memory only), replacing
    /// `rl.scheduling` for them, so they do not inherit the learners' GPU node selector and
    /// tolerations; `spec.scheduling` still applies under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_server_scheduling: Option<Scheduling>,
    /// Additions to the parameter-server pods, on top of `spec.podTemplate`.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub param_server_pod_template: PodTemplate,
    /// Additions to the learner pods, on top of `spec.podTemplate`.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub learner_pod_template: PodTemplate,
}

/// The RLT reward: solution term (student log-probs of the solution) minus KL term.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RewardSpec {
    /// Weight of the mean of the student's log-probabilities of the solution tokens.
    #[serde(default = "defaults::w_solution_mean")]
    #[schemars(range(min = 0.0))]
    pub solution_mean_weight: f64,
    /// Weight of their minimum (the hardest solution token).
    #[serde(default = "defaults::w_solution_min")]
    #[schemars(range(min = 0.0))]
    pub solution_min_weight: f64,
    /// Weight of the mean per-token KL term (teacher log-prob minus student log-prob over the
    /// explanation).
    #[serde(default = "defaults::w_kl_mean")]
    #[schemars(range(min = 0.0))]
    pub kl_mean_weight: f64,
    /// Weight of its maximum.
    #[serde(default = "defaults::w_kl_max")]
    #[schemars(range(min = 0.0))]
    pub kl_max_weight: f64,
    /// Added to the reward when the teacher's output does not parse into the expected tags.
    #[serde(default = "defaults::format_penalty")]
    #[schemars(range(max = 0.0))]
    pub format_penalty: f64,
    /// Temperature of the student's logits when scoring the solution.
    #[serde(default = "defaults::temperature")]
    #[schemars(range(min = 0.0, max = 10.0), extend("exclusiveMinimum" = true))]
    pub student_temperature: f64,
}

/// Soft re-sync of the GRPO reference model towards the policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceSync {
    /// Steps between re-syncs.
    #[serde(default = "defaults::sync_interval")]
    #[schemars(range(min = 1, max = MAX_INTERVAL))]
    pub interval: u32,
    /// reference = mix * policy + (1 - mix) * reference.
    #[serde(default = "defaults::sync_mix")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub mix: f64,
}

/// Distillation: the RL teacher writes explanations for the dataset; each student is
/// fine-tuned on them (one Job per student).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.traceSplitting.maxTokensPerTrace <= self.maxLength")
    .message("distillation.traceSplitting.maxTokensPerTrace must not exceed distillation.maxLength")
    .field_path(".traceSplitting.maxTokensPerTrace"))]
#[serde(rename_all = "camelCase")]
pub struct DistillationStage {
    /// `false` stops the run after RL.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Seconds an attempt of this stage may run (its Jobs' `activeDeadlineSeconds`): past it
    /// the attempt fails (`DeadlineExceeded`) and is retried under `failurePolicy`. A hang
    /// never holds GPUs longer. None: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u32>,
    /// The students distilled from the RL teacher's explanations, one Job each.
    #[serde(default)]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub students: Vec<Student>,
    /// Passes over the collected explanations.
    #[serde(default = "defaults::distill_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: u32,
    /// Peak learning rate (cosine schedule).
    #[serde(default = "defaults::distill_lr")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub learning_rate: f64,
    /// Rows per optimizer step, across every rank.
    #[serde(default = "defaults::distill_batch_size")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// Fraction of the steps over which the learning rate warms up linearly (then cosine).
    #[serde(default = "defaults::distill_warmup_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warmup_ratio: f64,
    #[serde(default = "defaults::distillation_optimizer")]
    pub optimizer: Optimizer,
    /// Longest training sequence of a student's fine-tune in tokens.
    #[serde(default = "defaults::max_length")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_length: u32,
    /// As `warmup.activationCheckpointing`, for the students' fine-tunes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_checkpointing: Option<bool>,
    /// Data-parallel pods per student (an Indexed Job); each runs one rank per GPU it
    /// requests. Every rank collects the teacher's explanations of its share of the rows, then
    /// the ranks split every global batch of the student's fine-tune.
    #[serde(default = "defaults::one")]
    #[schemars(range(min = 1, max = 256))]
    pub replicas: u32,
    #[serde(default)]
    pub trace_splitting: TraceSplitting,
    /// Optimizer steps between resumable checkpoints.
    #[serde(default = "defaults::checkpoint_interval")]
    #[schemars(range(min = 1, max = MAX_INTERVAL))]
    pub checkpoint_interval: u32,
    #[serde(default, skip_serializing_if = "Scheduling::is_empty")]
    pub scheduling: Scheduling,
    /// Additions to every student's pods, on top of `spec.podTemplate`.
    #[serde(default, skip_serializing_if = "PodTemplate::is_empty")]
    pub pod_template: PodTemplate,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Student {
    /// Names the student's Job and its workspace directory `distill/<name>/`.
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    pub model: ModelRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// How explanations are fitted to the student's context, as the method collects them: one
/// explanation per row, sampled again (up to `traces` samples) while it does not close within
/// the student's context (`maxTokensPerTrace` tokens of student chat); the first that fits is
/// the row's training example. A row none of whose samples fits keeps its first sample, cut to
/// the budget and marked incomplete.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TraceSplitting {
    /// The student's context: the longest student chat (question, explanation, solution).
    #[serde(default = "defaults::max_tokens_per_trace")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_tokens_per_trace: u32,
    /// Most samples per row until one closes and fits (the row still gets one example).
    #[serde(default = "defaults::one")]
    #[schemars(range(min = 1, max = 64))]
    pub traces: u32,
}

/// How often a failed stage is retried (each retry is a new attempt that resumes from the
/// stage's last checkpoint) before the run goes `Failed`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// Failed attempts of a stage retried before the run goes `Failed` (each retry resumes from
    /// the stage's last checkpoint).
    #[serde(default = "defaults::retries")]
    #[schemars(range(min = 0, max = 100))]
    pub retries: u32,
    /// Seconds a stage attempt may wait for all its pods to be running: past it the attempt is
    /// torn down (the GPUs its running pods hold are freed) and retried after as long again,
    /// not counted as a failure. Keeps a stage from holding part of its GPUs while the rest
    /// cannot be scheduled. None: wait as long as it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub scheduling_timeout_seconds: Option<u32>,
}

macro_rules! default_via {
    ($($t:ty => $f:path),* $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                $f()
            }
        }
    )*};
}
default_via!(
    WarmupStage => defaults::warmup,
    RlStage => defaults::rl,
    DistillationStage => defaults::distillation,
    RewardSpec => defaults::reward,
    ReferenceSync => defaults::reference_sync,
    TraceSplitting => defaults::trace_splitting,
    FailurePolicy => defaults::failure_policy,
);

/// The defaults, one function each, shared by serde and the schema. Where the paper gives a
/// number (Cetin, Zhao, Tang 2025), it is the paper's.
pub mod defaults {
    use super::*;

    pub fn yes() -> bool {
        true
    }
    pub fn one() -> u32 {
        1
    }
    pub fn pull_policy() -> PullPolicy {
        PullPolicy::IfNotPresent
    }
    pub fn device() -> Device {
        Device::Auto
    }
    pub fn precision() -> Precision {
        Precision::Auto
    }
    pub fn dataset_format() -> DatasetFormat {
        DatasetFormat::Auto
    }
    pub fn synthetic_rows() -> u32 {
        256
    }
    pub fn tiny_hidden() -> u32 {
        64
    }
    pub fn tiny_layers() -> u32 {
        2
    }
    pub fn tiny_heads() -> u32 {
        4
    }
    pub fn tiny_kv_heads() -> u32 {
        2
    }
    pub fn tiny_intermediate() -> u32 {
        128
    }
    pub fn workspace() -> Workspace {
        Workspace::default()
    }
    pub fn warmup_epochs() -> u32 {
        10
    }
    pub fn warmup_lr() -> f64 {
        1e-5
    }
    pub fn batch16() -> u32 {
        16
    }
    pub fn max_length() -> u32 {
        16384
    }
    pub fn checkpoint_interval() -> u32 {
        50
    }
    pub fn rl_steps() -> u32 {
        125
    }
    pub fn rl_lr() -> f64 {
        1e-6
    }
    pub fn group_size() -> u32 {
        64
    }
    pub fn temperature() -> f64 {
        0.7
    }
    /// The reference implementation's generation limit.
    pub fn max_new_tokens() -> u32 {
        16384
    }
    pub fn beta() -> f64 {
        0.04
    }
    pub fn w_solution_mean() -> f64 {
        1.0
    }
    pub fn w_solution_min() -> f64 {
        0.01
    }
    pub fn w_kl_mean() -> f64 {
        3.0
    }
    pub fn w_kl_max() -> f64 {
        0.03
    }
    pub fn format_penalty() -> f64 {
        -1.0
    }
    pub fn sync_interval() -> u32 {
        32
    }
    pub fn sync_mix() -> f64 {
        0.9
    }
    /// Warm-up: linear warm-up over 5% of the steps, then cosine.
    pub fn warmup_warmup_ratio() -> f64 {
        0.05
    }
    /// The warm-up recipe: betas (0.9, 0.95), weight decay 1e-4, clipping at 1.
    pub fn warmup_optimizer() -> Optimizer {
        Optimizer {
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 1e-4,
            max_grad_norm: 1.0,
        }
    }
    /// The RL recipe (TRL's defaults, which the reference trainer inherits): betas
    /// (0.9, 0.999), no weight decay, clipping at 1 over the whole gradient.
    pub fn rl_optimizer() -> Optimizer {
        Optimizer {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
    /// The reference students' recipe: betas (0.9, 0.999), no weight decay, clipping at 1.
    pub fn distillation_optimizer() -> Optimizer {
        Optimizer {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
    pub fn distill_epochs() -> u32 {
        3
    }
    pub fn distill_lr() -> f64 {
        1e-5
    }
    pub fn distill_batch_size() -> u32 {
        96
    }
    /// Distillation: linear warm-up over 10% of the steps, then cosine.
    pub fn distill_warmup_ratio() -> f64 {
        0.1
    }
    /// The teacher's system prompt when `spec.prompts.teacher` is unset (our own wording).
    pub fn teacher_system() -> String {
        "You are a teacher. You are given a question and its correct solution. First restate the \
         solution in the Solution section, then write a clear step-by-step explanation in the Explanation \
         section that shows how to reach that solution from the question, so that a student who reads it \
         can solve the question themselves. Format: <|begin_of_solution|> solution <|end_of_solution|> \
         then <|begin_of_explanation|> explanation <|end_of_explanation|>."
            .into()
    }
    /// The student's system prompt when `spec.prompts.student` is unset (our own wording, in
    /// the thought/solution format of Stratos-style students).
    pub fn student_system() -> String {
        "Your role as an assistant involves thoroughly exploring questions through a systematic \
         long thinking process before providing the final precise and accurate solutions. Structure your \
         response into two main sections: Thought and Solution. In the Thought section, detail your \
         reasoning in the format <|begin_of_thought|> thought <|end_of_thought|>. In the Solution section, \
         present the final solution in the format <|begin_of_solution|> solution <|end_of_solution|>."
            .into()
    }
    /// One-line teacher prompt for tiny byte-level models.
    pub fn tiny_teacher_system() -> String {
        "Teach: solution, then explanation.".into()
    }
    /// One-line student prompt for tiny byte-level models.
    pub fn tiny_student_system() -> String {
        "Think, then solve.".into()
    }
    pub fn max_tokens_per_trace() -> u32 {
        16384
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn warmup() -> WarmupStage {
        WarmupStage {
            enabled: true,
            active_deadline_seconds: None,
            replicas: 1,
            resources: None,
            epochs: warmup_epochs(),
            learning_rate: warmup_lr(),
            batch_size: batch16(),
            max_length: max_length(),
            activation_checkpointing: None,
            warmup_ratio: warmup_warmup_ratio(),
            optimizer: warmup_optimizer(),
            checkpoint_interval: checkpoint_interval(),
            scheduling: Scheduling::default(),
            pod_template: PodTemplate::default(),
        }
    }
    pub fn rl() -> RlStage {
        RlStage {
            param_servers: 1,
            learners: 1,
            active_deadline_seconds: None,
            progress_deadline_seconds: None,
            param_server_not_ready_seconds: None,
            param_server_resources: None,
            learner_resources: None,
            student: None,
            steps: rl_steps(),
            learning_rate: rl_lr(),
            batch_size: batch16(),
            group_size: group_size(),
            temperature: temperature(),
            max_new_tokens: max_new_tokens(),
            activation_checkpointing: None,
            reward: reward(),
            beta: beta(),
            reference_sync: reference_sync(),
            optimizer: rl_optimizer(),
            checkpoint_interval: checkpoint_interval(),
            scheduling: Scheduling::default(),
            param_server_scheduling: None,
            param_server_pod_template: PodTemplate::default(),
            learner_pod_template: PodTemplate::default(),
        }
    }
    pub fn reward() -> RewardSpec {
        RewardSpec {
            solution_mean_weight: w_solution_mean(),
            solution_min_weight: w_solution_min(),
            kl_mean_weight: w_kl_mean(),
            kl_max_weight: w_kl_max(),
            format_penalty: format_penalty(),
            student_temperature: temperature(),
        }
    }
    pub fn reference_sync() -> ReferenceSync {
        ReferenceSync {
            interval: sync_interval(),
            mix: sync_mix(),
        }
    }
    pub fn distillation() -> DistillationStage {
        DistillationStage {
            enabled: true,
            active_deadline_seconds: None,
            students: Vec::new(),
            epochs: distill_epochs(),
            learning_rate: distill_lr(),
            batch_size: distill_batch_size(),
            warmup_ratio: distill_warmup_ratio(),
            optimizer: distillation_optimizer(),
            max_length: max_length(),
            activation_checkpointing: None,
            replicas: 1,
            trace_splitting: trace_splitting(),
            checkpoint_interval: checkpoint_interval(),
            scheduling: Scheduling::default(),
            pod_template: PodTemplate::default(),
        }
    }
    pub fn trace_splitting() -> TraceSplitting {
        TraceSplitting {
            max_tokens_per_trace: max_tokens_per_trace(),
            traces: 1,
        }
    }
    pub fn failure_policy() -> FailurePolicy {
        FailurePolicy {
            retries: retries(),
            scheduling_timeout_seconds: None,
        }
    }
}

impl RltRunSpec {
    /// The model RL scores explanations with: `rl.student`, or (a tiny teacher only; the schema
    /// requires `rl.student` otherwise) the teacher as given.
    pub fn rl_student(&self) -> &ModelRef {
        self.rl.student.as_ref().unwrap_or(&self.teacher)
    }

    /// The (teacher, student) system prompts: `spec.prompts`, else the defaults (one-line ones
    /// for a tiny teacher).
    pub fn system_prompts(&self) -> (String, String) {
        let tiny = self.teacher.tiny.is_some();
        let teacher = self.prompts.teacher.clone().unwrap_or_else(|| {
            if tiny {
                defaults::tiny_teacher_system()
            } else {
                defaults::teacher_system()
            }
        });
        let student = self.prompts.student.clone().unwrap_or_else(|| {
            if tiny {
                defaults::tiny_student_system()
            } else {
                defaults::student_system()
            }
        });
        (teacher, student)
    }
}
