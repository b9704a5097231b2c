//! The child objects of a run, built from its spec and the stage contract
//! (`rlt_api::contract`). Pure functions: the same run and attempt always give the same
//! objects, with deterministic names and a content hash the reconciler compares instead of
//! diffing against server-defaulted objects.
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use rlt_api::contract::{self, env, Role};
use rlt_api::spec::{Device, RltRun, Scheduling, Student};
use serde::Serialize;
use std::collections::BTreeMap;

pub const LABEL_RUN: &str = "rlt.dev/run";
pub const LABEL_STAGE: &str = "rlt.dev/stage";
pub const LABEL_ROLE: &str = "rlt.dev/role";
pub const LABEL_ATTEMPT: &str = "rlt.dev/attempt";
pub const LABEL_STUDENT: &str = "rlt.dev/student";
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
}

/// A child to server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    ConfigMap(ConfigMap),
    Pvc(PersistentVolumeClaim),
    Job(Job),
    StatefulSet(StatefulSet),
    Service(Service),
}

impl Child {
    pub fn kind(&self) -> Kind {
        match self {
            Child::ConfigMap(_) => Kind::ConfigMap,
            Child::Pvc(_) => Kind::PersistentVolumeClaim,
            Child::Job(_) => Kind::Job,
            Child::StatefulSet(_) => Kind::StatefulSet,
            Child::Service(_) => Kind::Service,
        }
    }
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Child::ConfigMap(o) => &o.metadata,
            Child::Pvc(o) => &o.metadata,
            Child::Job(o) => &o.metadata,
            Child::StatefulSet(o) => &o.metadata,
            Child::Service(o) => &o.metadata,
        }
    }
    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }
    pub fn hash(&self) -> Option<&str> {
        self.meta()
            .annotations
            .as_ref()?
            .get(ANNOTATION_HASH)
            .map(String::as_str)
    }
}

pub mod names {
    use super::Stage;
    pub fn config_map(run: &str) -> String {
        format!("{run}-config")
    }
    pub fn workspace(run: &str) -> String {
        format!("{run}-workspace")
    }
    pub fn warmup_job(run: &str, attempt: u32) -> String {
        format!("{run}-warmup-{attempt}")
    }
    /// The parameter-server StatefulSet and its headless Service share this name.
    pub fn param_servers(run: &str) -> String {
        format!("{run}-ps")
    }
    pub fn learner_job(run: &str, attempt: u32) -> String {
        format!("{run}-learner-{attempt}")
    }
    pub fn distill_job(run: &str, student: &str, attempt: u32) -> String {
        format!("{run}-distill-{student}-{attempt}")
    }
    /// `host:port` of every parameter-server shard, in shard order (stable DNS of the
    /// StatefulSet pods behind the headless Service).
    pub fn param_server_addresses(run: &str, namespace: &str, shards: u32, port: u16) -> String {
        let svc = param_servers(run);
        (0..shards)
            .map(|i| format!("{svc}-{i}.{svc}.{namespace}.svc:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }
    pub fn stage_of_job(name: &str, run: &str) -> Option<Stage> {
        let rest = name.strip_prefix(run)?.strip_prefix('-')?;
        if rest.starts_with("warmup-") {
            Some(Stage::Warmup)
        } else if rest.starts_with("learner-") {
            Some(Stage::Rl)
        } else if rest.starts_with("distill-") {
            Some(Stage::Distillation)
        } else {
            None
        }
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
        let mut l = BTreeMap::from([
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

/// The ConfigMap's content hash, computed from the spec without rendering the YAML, so the
/// steady-state reconcile (config unchanged) never renders it.
pub fn config_hash(run: &RltRun) -> String {
    let mut spec = run.spec.clone();
    spec.suspend = false;
    fnv(
        &serde_json::to_vec(&(&run.metadata.name, &run.metadata.namespace, &spec))
            .expect("spec serializes"),
    )
}

pub fn config_map(ctx: &Ctx) -> Child {
    let cm = ConfigMap {
        metadata: ctx.meta(names::config_map(&ctx.name), ctx.labels(None, None, None)),
        data: Some(BTreeMap::from([(
            contract::CONFIG_FILE.to_string(),
            contract::render_config(ctx.run),
        )])),
        ..Default::default()
    };
    let mut cm = cm;
    cm.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_HASH.to_string(),
        config_hash(ctx.run),
    )]));
    Child::ConfigMap(cm)
}

/// The workspace claim, when the run does not name an existing one.
pub fn workspace_pvc(ctx: &Ctx) -> Option<Child> {
    let ws = &ctx.run.spec.workspace;
    if ws.claim_name.is_some() {
        return None;
    }
    let modes = if ws.access_modes.is_empty() {
        vec!["ReadWriteOnce".to_string()]
    } else {
        ws.access_modes
            .iter()
            .map(|m| {
                serde_json::to_value(m)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let pvc = PersistentVolumeClaim {
        metadata: ctx.meta(names::workspace(&ctx.name), ctx.labels(None, None, None)),
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

fn plain(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        ..Default::default()
    }
}

fn from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What distinguishes one role's pods: the rest of the pod is the same for every role.
struct PodParts<'a> {
    stage: Stage,
    role: Role,
    attempt: u32,
    resources: Option<&'a ResourceRequirements>,
    scheduling: &'a Scheduling,
    replicas: u32,
    /// How the pod learns its index: a fixed env, or a downward-API field.
    index: EnvVar,
    student: Option<&'a Student>,
    restart_policy: &'static str,
    rpc_port: bool,
}

fn wants_gpu(resources: Option<&ResourceRequirements>) -> bool {
    resources
        .map(|r| {
            [&r.limits, &r.requests]
                .into_iter()
                .flatten()
                .any(|m| m.contains_key("nvidia.com/gpu"))
        })
        .unwrap_or(false)
}

fn pod_template(ctx: &Ctx, p: PodParts) -> PodTemplateSpec {
    let spec = &ctx.run.spec;
    let device = match spec.device {
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
        Device::Auto if wants_gpu(p.resources) => "cuda",
        Device::Auto => "cpu",
    };
    let mut envs = vec![
        plain(env::RUN_NAME, &ctx.name),
        plain(env::WORKSPACE, contract::WORKSPACE_MOUNT_DIR),
        plain(
            env::CONFIG,
            format!("{}/{}", contract::CONFIG_MOUNT_DIR, contract::CONFIG_FILE),
        ),
        plain(env::ATTEMPT, p.attempt),
        p.index,
        plain(env::REPLICAS, p.replicas),
        plain(env::RPC_PORT, contract::DEFAULT_RPC_PORT),
        plain(env::METRICS_PORT, contract::DEFAULT_METRICS_PORT),
        plain(env::DEVICE, device),
        // The root filesystem is read-only: caches and temp files go to the /tmp volume.
        plain("HOME", "/tmp"),
        plain("TMPDIR", "/tmp"),
    ];
    if p.stage == Stage::Rl {
        envs.push(plain(
            env::PARAM_SERVERS,
            names::param_server_addresses(
                &ctx.name,
                &ctx.namespace,
                spec.rl.param_servers,
                contract::DEFAULT_RPC_PORT,
            ),
        ));
    }
    if let Some(s) = p.student {
        envs.push(plain(env::STUDENT, &s.name));
    }
    // The user's env comes last but may not shadow the contract (validation rejects RLT_*).
    envs.extend(
        spec.env
            .iter()
            .filter(|e| !e.name.starts_with("RLT_"))
            .cloned(),
    );

    let mut ports = vec![ContainerPort {
        name: Some("metrics".into()),
        container_port: contract::DEFAULT_METRICS_PORT as i32,
        ..Default::default()
    }];
    if p.rpc_port {
        ports.insert(
            0,
            ContainerPort {
                name: Some("rpc".into()),
                container_port: contract::DEFAULT_RPC_PORT as i32,
                ..Default::default()
            },
        );
    }
    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(
            serde_json::to_value(spec.image_pull_policy)
                .unwrap()
                .as_str()
                .unwrap()
                .into(),
        ),
        command: Some(vec![
            contract::TRAINER_BIN.into(),
            p.role.subcommand().into(),
        ]),
        env: Some(envs),
        ports: Some(ports),
        resources: p.resources.cloned(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: contract::CONFIG_MOUNT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "workspace".into(),
                mount_path: contract::WORKSPACE_MOUNT_DIR.into(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
            VolumeMount {
                name: "shm".into(),
                mount_path: "/dev/shm".into(),
                ..Default::default()
            },
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sched = p.scheduling.over(&spec.scheduling);
    let mut labels = ctx.labels(Some(p.stage), Some(p.role), Some(p.attempt));
    if let Some(s) = p.student {
        labels.insert(LABEL_STUDENT.into(), s.name.clone());
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some(p.restart_policy.into()),
            service_account_name: spec.service_account_name.clone(),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                .then(|| spec.image_pull_secrets.clone()),
            node_selector: (!sched.node_selector.is_empty()).then_some(sched.node_selector),
            tolerations: (!sched.tolerations.is_empty()).then_some(sched.tolerations),
            affinity: sched.affinity,
            priority_class_name: sched.priority_class_name,
            scheduler_name: sched.scheduler_name,
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volumes: Some(vec![
                Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: names::config_map(&ctx.name),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "workspace".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: ctx.claim_name(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
                Volume {
                    name: "shm".into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: Some("Memory".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
    }
}

/// A run-to-completion Job. The operator owns retries (each retry is a new attempt, fencing
/// checkpoints), so the Job itself fails on the first pod failure; pods evicted or preempted
/// (DisruptionTarget) are replaced by the Job without counting as a failure.
fn job(ctx: &Ctx, name: String, parts: PodParts) -> Child {
    let labels = ctx.labels(Some(parts.stage), Some(parts.role), Some(parts.attempt));
    let replicas = parts.replicas as i32;
    let template = pod_template(ctx, parts);
    let job = Job {
        metadata: ctx.meta(name, labels),
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(replicas),
            parallelism: Some(replicas),
            backoff_limit: Some(0),
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![PodFailurePolicyRule {
                    action: "Ignore".into(),
                    on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                        type_: "DisruptionTarget".into(),
                        status: "True".into(),
                    }]),
                    ..Default::default()
                }],
            }),
            template,
            ..Default::default()
        }),
        ..Default::default()
    };
    Child::Job(hashed(job))
}

/// Indexed Job pods learn their rank from the completion-index annotation.
fn job_index() -> EnvVar {
    from_field(
        env::REPLICA_INDEX,
        "metadata.annotations['batch.kubernetes.io/job-completion-index']",
    )
}

pub fn warmup_job(ctx: &Ctx, attempt: u32) -> Child {
    let w = &ctx.run.spec.warmup;
    job(
        ctx,
        names::warmup_job(&ctx.name, attempt),
        PodParts {
            stage: Stage::Warmup,
            role: Role::Warmup,
            attempt,
            resources: w.resources.as_ref(),
            scheduling: &w.scheduling,
            replicas: w.replicas,
            index: job_index(),
            student: None,
            restart_policy: "Never",
            rpc_port: false,
        },
    )
}

pub fn learner_job(ctx: &Ctx, attempt: u32) -> Child {
    let rl = &ctx.run.spec.rl;
    job(
        ctx,
        names::learner_job(&ctx.name, attempt),
        PodParts {
            stage: Stage::Rl,
            role: Role::Learner,
            attempt,
            resources: rl.learner_resources.as_ref(),
            scheduling: &rl.scheduling,
            replicas: rl.learners,
            index: job_index(),
            student: None,
            restart_policy: "Never",
            rpc_port: false,
        },
    )
}

pub fn distill_job(ctx: &Ctx, student: &Student, attempt: u32) -> Child {
    let d = &ctx.run.spec.distillation;
    job(
        ctx,
        names::distill_job(&ctx.name, &student.name, attempt),
        PodParts {
            stage: Stage::Distillation,
            role: Role::Distill,
            attempt,
            resources: student.resources.as_ref(),
            scheduling: &d.scheduling,
            replicas: 1,
            index: job_index(),
            student: Some(student),
            restart_policy: "Never",
            rpc_port: false,
        },
    )
}

/// Parameter servers: a StatefulSet (stable identity per shard; a crashed shard restarts and
/// reloads its shard checkpoint). The attempt is in the template, so a new RL attempt rolls
/// the shards onto the new fence.
pub fn param_server_set(ctx: &Ctx, attempt: u32) -> Child {
    let rl = &ctx.run.spec.rl;
    let name = names::param_servers(&ctx.name);
    let selector = BTreeMap::from([
        (LABEL_RUN.to_string(), ctx.name.clone()),
        (
            LABEL_ROLE.to_string(),
            Role::ParamServer.subcommand().to_string(),
        ),
    ]);
    let template = pod_template(
        ctx,
        PodParts {
            stage: Stage::Rl,
            role: Role::ParamServer,
            attempt,
            resources: rl.param_server_resources.as_ref(),
            scheduling: &rl.scheduling,
            replicas: rl.param_servers,
            index: from_field(
                env::REPLICA_INDEX,
                "metadata.labels['apps.kubernetes.io/pod-index']",
            ),
            student: None,
            restart_policy: "Always",
            rpc_port: true,
        },
    );
    // Ready once the shard is loaded and serving gRPC: `kubectl get pods` then tells a
    // shard still loading a 7B checkpoint from one that is up (learners connect either way).
    let mut template = template;
    if let Some(c) = template
        .spec
        .as_mut()
        .and_then(|s| s.containers.first_mut())
    {
        c.readiness_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("rpc".into()),
                ..Default::default()
            }),
            period_seconds: Some(5),
            ..Default::default()
        });
    }
    let sts = StatefulSet {
        metadata: ctx.meta(
            name.clone(),
            ctx.labels(Some(Stage::Rl), Some(Role::ParamServer), Some(attempt)),
        ),
        spec: Some(StatefulSetSpec {
            service_name: Some(name),
            replicas: Some(rl.param_servers as i32),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            template,
            ..Default::default()
        }),
        ..Default::default()
    };
    Child::StatefulSet(hashed(sts))
}

/// Headless Service giving each shard a stable DNS name; addresses are published before the
/// shards are ready so learners can connect (and retry) while the shards load.
pub fn param_server_service(ctx: &Ctx) -> Child {
    let name = names::param_servers(&ctx.name);
    let port = |n: &str, p: u16| ServicePort {
        name: Some(n.into()),
        port: p as i32,
        target_port: Some(IntOrString::Int(p as i32)),
        ..Default::default()
    };
    let svc = Service {
        metadata: ctx.meta(
            name,
            ctx.labels(Some(Stage::Rl), Some(Role::ParamServer), None),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([
                (LABEL_RUN.to_string(), ctx.name.clone()),
                (
                    LABEL_ROLE.to_string(),
                    Role::ParamServer.subcommand().to_string(),
                ),
            ])),
            ports: Some(vec![
                port("rpc", contract::DEFAULT_RPC_PORT),
                port("metrics", contract::DEFAULT_METRICS_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Child::Service(hashed(svc))
}

/// URL of parameter server 0's training figures.
pub fn status_url(run: &str, namespace: &str) -> String {
    let svc = names::param_servers(run);
    format!(
        "http://{svc}-0.{svc}.{namespace}.svc:{}{}",
        contract::DEFAULT_METRICS_PORT,
        contract::STATUS_PATH
    )
}
