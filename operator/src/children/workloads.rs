//! The stage workloads: an Indexed Job per warm-up, learner and distillation attempt; per
//! RL attempt a parameter-server StatefulSet behind the run's headless Service.
use super::pod::{pod_template, PodParts};
use super::{hashed, names, Child, Ctx, Stage, LABEL_ATTEMPT, LABEL_RANK, LABEL_ROLE, LABEL_RUN};
use crate::observe::Observed;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{Probe, Service, ServicePort, ServiceSpec, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rlt_api::contract::{self, EnvValue, Role};
use rlt_api::spec::{RltRun, Student};
use std::collections::BTreeMap;

/// A run-to-completion Job. The operator owns retries (each retry is a new attempt, fencing
/// checkpoints), so the Job itself fails on the first pod failure; pods evicted or preempted
/// (DisruptionTarget) are replaced by the Job without counting as a failure.
fn job(ctx: &Ctx, name: String, parts: PodParts) -> Child {
    let labels = ctx.labels(Some(parts.stage), Some(parts.role), Some(parts.attempt));
    let replicas = parts.replicas as i32;
    let spec = &ctx.run.spec;
    let deadline = match parts.stage {
        Stage::Warmup => spec.warmup.active_deadline_seconds,
        Stage::Rl => spec.rl.active_deadline_seconds,
        Stage::Distillation => spec.distillation.active_deadline_seconds,
    };
    let template = pod_template(ctx, parts);
    let job = Job {
        metadata: ctx.meta(name, labels),
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(replicas),
            parallelism: Some(replicas),
            backoff_limit: Some(0),
            active_deadline_seconds: deadline.map(i64::from),
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
fn job_index() -> EnvValue {
    EnvValue::PodField(contract::JOB_COMPLETION_INDEX_FIELD)
}

pub fn warmup_job(ctx: &Ctx, attempt: u32) -> Child {
    let w = &ctx.run.spec.warmup;
    let name = names::warmup_job(&ctx.name, attempt);
    job(
        ctx,
        name.clone(),
        PodParts {
            stage: Stage::Warmup,
            role: Role::Warmup,
            attempt,
            resources: w.resources.as_ref(),
            scheduling: &w.scheduling,
            template: &w.pod_template,
            replicas: w.replicas,
            index: job_index(),
            student: None,
            restart_policy: "Never",
            rpc_port: false,
            job: Some(name),
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
            template: &rl.learner_pod_template,
            replicas: rl.learners,
            index: job_index(),
            student: None,
            restart_policy: "Never",
            rpc_port: false,
            job: None,
        },
    )
}

pub fn distill_job(ctx: &Ctx, student: &Student, attempt: u32) -> Child {
    let d = &ctx.run.spec.distillation;
    let name = names::distill_job(&ctx.name, &student.name, attempt);
    job(
        ctx,
        name.clone(),
        PodParts {
            stage: Stage::Distillation,
            role: Role::Distill,
            attempt,
            resources: student.resources.as_ref(),
            scheduling: &d.scheduling,
            template: &d.pod_template,
            replicas: d.replicas,
            index: job_index(),
            student: Some(student),
            restart_policy: "Never",
            rpc_port: false,
            job: Some(name),
        },
    )
}

/// The labels every parameter-server pod of the run carries (the headless Service selects
/// them across attempts: each attempt's pods have their own DNS names).
fn param_server_selector(ctx: &Ctx) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_RUN.to_string(), ctx.name.clone()),
        (
            LABEL_ROLE.to_string(),
            Role::ParamServer.subcommand().to_string(),
        ),
    ])
}

/// Parameter servers of one RL attempt: a StatefulSet (stable identity per shard; a crashed
/// shard restarts and reloads its shard checkpoint) named after the attempt
/// ([`names::param_server_set`]). A new attempt is a new set with new shard addresses, never
/// a rolling update of the old set under running learners; the reconciler deletes the sets
/// of other attempts ([`stale_param_server_sets`]).
pub fn param_server_set(ctx: &Ctx, attempt: u32) -> Child {
    let rl = &ctx.run.spec.rl;
    let mut template = pod_template(
        ctx,
        PodParts {
            stage: Stage::Rl,
            role: Role::ParamServer,
            attempt,
            resources: rl.param_server_resources.as_ref(),
            scheduling: rl
                .param_server_scheduling
                .as_ref()
                .unwrap_or(&rl.scheduling),
            template: &rl.param_server_pod_template,
            replicas: rl.param_servers,
            index: EnvValue::PodField(contract::STATEFULSET_POD_INDEX_FIELD),
            student: None,
            restart_policy: "Always",
            rpc_port: true,
            job: None,
        },
    );
    // Ready once the shard is loaded and serving gRPC: `kubectl get pods` then tells a
    // shard still loading a 7B checkpoint from one that is up (learners connect either way).
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
    let mut selector = param_server_selector(ctx);
    selector.insert(LABEL_ATTEMPT.to_string(), attempt.to_string());
    let sts = StatefulSet {
        metadata: ctx.meta(
            names::param_server_set(&ctx.name, attempt),
            ctx.labels(Some(Stage::Rl), Some(Role::ParamServer), Some(attempt)),
        ),
        spec: Some(StatefulSetSpec {
            service_name: Some(names::param_servers(&ctx.name)),
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

/// The observed parameter-server StatefulSets of the run other than attempt `keep`'s (all of
/// them when `keep` is `None`): what a new RL attempt, a suspend and the end of RL delete.
pub fn stale_param_server_sets(run: &str, obs: &Observed, keep: Option<u32>) -> Vec<String> {
    obs.children
        .iter()
        .filter(|c| c.kind == super::Kind::StatefulSet && !c.deleting)
        .filter(|c| names::param_server_set_attempt(&c.name, run).is_some_and(|a| Some(a) != keep))
        .map(|c| c.name.clone())
        .collect()
}

/// Headless Service giving each shard a stable DNS name; addresses are published before the
/// shards are ready so learners can connect (and retry) while the shards load.
pub fn param_server_service(ctx: &Ctx) -> Child {
    let port = |n: &str, p: u16| ServicePort {
        name: Some(n.into()),
        port: p as i32,
        target_port: Some(IntOrString::Int(p as i32)),
        // Server-side apply merges `ports` by (port, protocol): both must be set.
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let svc = Service {
        metadata: ctx.meta(
            names::param_servers(&ctx.name),
            ctx.labels(Some(Stage::Rl), Some(Role::ParamServer), None),
        ),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(param_server_selector(ctx)),
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

/// Whether the run has a data-parallel stage whose ranks span pods (the ranks Service's reason
/// to exist).
pub fn needs_ranks_service(run: &RltRun) -> bool {
    let s = &run.spec;
    (s.warmup.enabled && s.warmup.replicas > 1)
        || (s.distillation.enabled && s.distillation.replicas > 1)
}

/// Headless Service whose name is the subdomain of every data-parallel pod spanning pods
/// (warm-up and distillation Jobs): pod `i` of Job `j` resolves as
/// `<j>-<i>.<run>-ranks.<namespace>.svc` ([`names::rank_addresses`]). Published before the
/// pods are ready: ranks dial each other while they start.
pub fn ranks_service(ctx: &Ctx) -> Child {
    let port = contract::DEFAULT_COLLECTIVE_PORT as i32;
    let svc = Service {
        metadata: ctx.meta(names::ranks(&ctx.name), ctx.labels(None, None, None)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([
                (LABEL_RUN.to_string(), ctx.name.clone()),
                (LABEL_RANK.to_string(), "true".to_string()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("collective".into()),
                port,
                target_port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Child::Service(hashed(svc))
}

/// URL of parameter server 0's training figures in the current RL attempt: its pod IP when
/// the observed pod has one (reachable from an operator outside the cluster's DNS, e.g. run
/// locally against a remote cluster), else its stable DNS name.
pub fn status_url(run: &RltRun, obs: &Observed) -> String {
    let name = run.metadata.name.clone().unwrap_or_default();
    let namespace = run
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let attempt = run
        .status
        .as_ref()
        .and_then(|s| s.stages.rl.as_ref())
        .map_or(0, |rl| rl.attempt);
    let pod = names::param_server_pod(&name, attempt, 0);
    let host = obs
        .pods
        .iter()
        .find(|p| p.name == pod && !p.deleting)
        .and_then(|p| p.ip.as_deref())
        .map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_string()
            }
        })
        .unwrap_or_else(|| names::param_server_host(&name, &namespace, attempt, 0));
    format!(
        "http://{host}:{}{}",
        contract::DEFAULT_METRICS_PORT,
        contract::STATUS_PATH
    )
}
