//! The pod template every stage pod shares: one `trainer` container running
//! `rlt-trainer <role>` with the stage contract's environment, the run configuration, the
//! workspace and two scratch volumes, hardened for a restricted namespace. One builder per
//! concern: [`env`], [`container`], [`volumes`], [`security`].
use super::{names, Ctx, Stage, CONTAINER, LABEL_RANK, LABEL_STUDENT, RUN_AS};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, LocalObjectReference, ObjectFieldSelector, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rlt_api::contract::{self, EnvValue, Role, StageEnv};
use rlt_api::spec::{PodTemplate, Scheduling, Student};

/// Size of the `/dev/shm` volume when the pod has no memory limit (a memory-backed emptyDir
/// counts against the pod's memory; with a limit, the limit bounds it).
pub const DEFAULT_SHM_SIZE: &str = "8Gi";
/// Scratch directory (HOME, TMPDIR, caches) under the read-only root filesystem.
pub const SCRATCH_DIR: &str = "/tmp";

/// What distinguishes one role's pods: the rest of the pod is the same for every role.
pub(super) struct PodParts<'a> {
    pub stage: Stage,
    pub role: Role,
    pub attempt: u32,
    pub resources: Option<&'a ResourceRequirements>,
    pub scheduling: &'a Scheduling,
    /// The role's additions, on top of the run's `podTemplate`.
    pub template: &'a PodTemplate,
    pub replicas: u32,
    /// How the pod learns its index: a value, or a downward-API field.
    pub index: EnvValue,
    pub student: Option<&'a Student>,
    pub restart_policy: &'static str,
    pub rpc_port: bool,
    /// The Job of a data-parallel role (warm-up, a student's distillation): its ranks meet
    /// in a collective, one rank per GPU of each pod.
    pub job: Option<String>,
}

pub(super) fn plain(name: &str, value: impl ToString) -> EnvVar {
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

/// Whether the pods of this role form one data-parallel group over several pods: their ranks
/// then find each other by DNS, through the run's ranks Service ([`names::ranks`]).
pub(super) fn spans_pods(p: &PodParts) -> bool {
    p.job.is_some() && p.replicas > 1
}

/// Where the ranks of a data-parallel role meet (`MASTER_ADDR`, `MASTER_PORT`): pod 0 by its
/// DNS name when the ranks span pods, loopback when they all live in this pod, nowhere for a
/// single rank.
fn rendezvous(ctx: &Ctx, p: &PodParts, ranks_per_pod: u32) -> Option<(String, u16)> {
    let port = contract::DEFAULT_COLLECTIVE_PORT;
    let job = p.job.as_deref()?;
    if spans_pods(p) {
        Some((names::rank_host(&ctx.name, &ctx.namespace, job, 0), port))
    } else {
        (ranks_per_pod > 1).then(|| ("127.0.0.1".to_string(), port))
    }
}

/// The container's environment, one entry per name (the API server refuses a pod template
/// whose `env`, a list-map keyed by name, repeats one): the stage contract, then the
/// operator's `HOME`/`TMPDIR` unless the run sets them, then the run's `env` (a later entry
/// of the same name replaces an earlier one; `RLT_*` never replaces the contract: validation
/// refuses it, and it is dropped here too).
pub(super) fn env(ctx: &Ctx, p: &PodParts) -> Vec<EnvVar> {
    let spec = &ctx.run.spec;
    let gpus = contract::gpus(p.resources);
    let ranks_per_pod = if p.job.is_some() { gpus.max(1) } else { 1 };
    let stage_env = StageEnv {
        run_name: ctx.name.clone(),
        workspace: contract::WORKSPACE_MOUNT_DIR.into(),
        config: format!("{}/{}", contract::CONFIG_MOUNT_DIR, contract::CONFIG_FILE),
        attempt: p.attempt,
        replica_index: p.index.clone(),
        replicas: p.replicas,
        rpc_port: Some(contract::DEFAULT_RPC_PORT),
        metrics_port: contract::DEFAULT_METRICS_PORT,
        device: contract::device_choice(spec.device, Some(gpus > 0)),
        termination_log: Some(contract::TERMINATION_LOG_PATH.into()),
        param_servers: (p.stage == Stage::Rl).then(|| {
            names::param_server_addresses(
                &ctx.name,
                &ctx.namespace,
                p.attempt,
                spec.rl.param_servers,
                contract::DEFAULT_RPC_PORT,
            )
        }),
        student: p.student.map(|s| s.name.clone()),
        ranks_per_pod,
        rendezvous: rendezvous(ctx, p, ranks_per_pod),
    };
    let contract_env: Vec<EnvVar> = stage_env
        .vars()
        .into_iter()
        .map(|(name, value)| match value {
            EnvValue::Literal(v) => plain(name, v),
            EnvValue::PodField(path) => from_field(name, path),
        })
        .collect();
    // The root filesystem is read-only: caches and temp files go to the scratch volume.
    let defaults = [plain("HOME", SCRATCH_DIR), plain("TMPDIR", SCRATCH_DIR)];
    let mut out = contract_env;
    for e in defaults.into_iter().chain(
        spec.env
            .iter()
            .filter(|e| !e.name.starts_with("RLT_"))
            .cloned(),
    ) {
        match out.iter_mut().find(|o| o.name == e.name) {
            Some(existing) => *existing = e,
            None => out.push(e),
        }
    }
    out
}

/// The `trainer` container.
pub(super) fn container(ctx: &Ctx, p: &PodParts) -> Container {
    let spec = &ctx.run.spec;
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.into()),
        container_port: port as i32,
        // Server-side apply merges `ports` by (containerPort, protocol): both must be set.
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![port("metrics", contract::DEFAULT_METRICS_PORT)];
    if p.rpc_port {
        ports.insert(0, port("rpc", contract::DEFAULT_RPC_PORT));
    }
    if spans_pods(p) {
        ports.push(port("collective", contract::DEFAULT_COLLECTIVE_PORT));
    }
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    Container {
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
        env: Some(env(ctx, p)),
        ports: Some(ports),
        resources: p.resources.cloned(),
        volume_mounts: Some(
            [
                mount("config", contract::CONFIG_MOUNT_DIR, true),
                mount("workspace", contract::WORKSPACE_MOUNT_DIR, false),
                mount("tmp", SCRATCH_DIR, false),
                mount("shm", "/dev/shm", false),
            ]
            .into_iter()
            .chain(
                spec.inputs
                    .iter()
                    .map(|i| mount(&input_volume(&i.volume.name), &i.mount_path, true)),
            )
            .collect(),
        ),
        // The trainer writes its final error here (RLT_TERMINATION_LOG); a crash that wrote
        // nothing leaves the log's tail instead. Either way the run's condition says why.
        termination_message_path: Some(contract::TERMINATION_LOG_PATH.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
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
    }
}

/// The pod's name of an input volume (apart from the operator's own volumes).
fn input_volume(name: &str) -> String {
    format!("in-{name}")
}

/// The run configuration (read-only), the workspace claim, the scratch directory,
/// `/dev/shm` (memory-backed, bounded by the memory limit or [`DEFAULT_SHM_SIZE`]), and the
/// run's input volumes (mounted read-only).
pub(super) fn volumes(ctx: &Ctx, p: &PodParts) -> Vec<Volume> {
    let shm_size = p
        .resources
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .cloned()
        .unwrap_or_else(|| Quantity(DEFAULT_SHM_SIZE.into()));
    vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config_map(&ctx.name, p.stage, p.attempt),
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
                size_limit: Some(shm_size),
            }),
            ..Default::default()
        },
    ]
    .into_iter()
    .chain(ctx.run.spec.inputs.iter().map(|i| Volume {
        name: input_volume(&i.volume.name),
        ..i.volume.clone()
    }))
    .collect()
}

/// Non-root with the workspace group-writable for [`RUN_AS`]; the volume's ownership is
/// changed only when its root does not already match (a large workspace is not walked on
/// every pod start).
pub(super) fn security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A list field of the pod spec: absent when empty.
fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

/// Image pull secrets, one per name (a list-map in the pod spec).
fn pull_secrets(secrets: &[LocalObjectReference]) -> Option<Vec<LocalObjectReference>> {
    let mut out: Vec<LocalObjectReference> = Vec::new();
    for s in secrets {
        if !out.iter().any(|o| o.name == s.name) {
            out.push(s.clone());
        }
    }
    (!out.is_empty()).then_some(out)
}

pub(super) fn pod_template(ctx: &Ctx, p: PodParts) -> PodTemplateSpec {
    let spec = &ctx.run.spec;
    let sched = p.scheduling.over(&spec.scheduling);
    let added = p.template.over(&spec.pod_template);
    // The run's labels and the operator's, then the pod template's over the run's (never over
    // the operator's: validation refuses those keys, and they are skipped here too).
    let mut labels = ctx.labels(Some(p.stage), Some(p.role), Some(p.attempt));
    labels.extend(
        added
            .labels
            .iter()
            .filter(|(k, _)| !rlt_api::pod_template::is_reserved_key(k))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    if let Some(s) = p.student {
        labels.insert(LABEL_STUDENT.into(), s.name.clone());
    }
    let spans_pods = spans_pods(&p);
    if spans_pods {
        labels.insert(LABEL_RANK.into(), "true".into());
    }
    let mut trainer = container(ctx, &p);
    if let Some(mounts) = trainer.volume_mounts.as_mut() {
        mounts.extend(added.typed_volume_mounts());
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: (!added.annotations.is_empty()).then(|| added.annotations.clone()),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![trainer],
            init_containers: non_empty(added.typed_init_containers()),
            runtime_class_name: added.runtime_class_name.clone(),
            topology_spread_constraints: non_empty(added.typed_topology_spread_constraints()),
            restart_policy: Some(p.restart_policy.into()),
            service_account_name: spec.service_account_name.clone(),
            // The trainer never calls the API server: no token unless the run names an
            // account (whose token it then presumably wants, e.g. for workload identity).
            automount_service_account_token: spec.service_account_name.is_none().then_some(false),
            // A namespace with many Services would otherwise flood the environment.
            enable_service_links: Some(false),
            image_pull_secrets: pull_secrets(&spec.image_pull_secrets),
            node_selector: (!sched.node_selector.is_empty()).then_some(sched.node_selector),
            tolerations: (!sched.tolerations.is_empty()).then_some(sched.tolerations),
            affinity: sched.affinity,
            priority_class_name: sched.priority_class_name,
            scheduler_name: sched.scheduler_name,
            security_context: Some(added.typed_security_context().unwrap_or_else(security)),
            // Indexed Job pods are named `<job>-<index>`: with this subdomain (the ranks'
            // headless Service) each gets the DNS name its peers dial.
            subdomain: spans_pods.then(|| names::ranks(&ctx.name)),
            volumes: Some(
                volumes(ctx, &p)
                    .into_iter()
                    .chain(added.typed_volumes())
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}
