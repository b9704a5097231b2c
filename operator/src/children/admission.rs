//! A stage's admission units (what Kueue admits at once, [`crate::kueue`]) and their
//! Workloads, built from the very Jobs and StatefulSet the unit runs, so Kueue counts what
//! the pods will ask for.
use super::{
    distill_job, hashed, learner_job, names, param_server_set, warmup_job, Child, Ctx, Stage,
    ANNOTATION_HASH, LABEL_ATTEMPT, LABEL_ROLE, LABEL_STUDENT,
};
use crate::kueue::{self, Placement, PodSet, PriorityClassRef, Workload, WorkloadSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use rlt_api::contract::Role;

/// Pod-set names: a warm-up's or a student's ranks; RL's two roles.
pub const TRAINERS: &str = "trainers";
pub const PARAM_SERVERS: &str = "param-servers";
pub const LEARNERS: &str = "learners";

/// One admission unit: what one Workload covers. RL's parameter servers and learners need
/// each other, as do a data-parallel Job's ranks; distillation students are independent, and
/// one unit each keeps a Workload within Kueue's 8 pod sets whatever the number of students.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub stage: Stage,
    pub student: Option<String>,
    /// The Workload's name ([`names::queue_workload`]).
    pub workload: String,
}

/// The admission units of a stage.
pub fn queue_units(ctx: &Ctx, stage: Stage) -> Vec<Unit> {
    let unit = |student: Option<&str>| Unit {
        stage,
        student: student.map(str::to_string),
        workload: names::queue_workload(&ctx.name, stage, student),
    };
    match stage {
        Stage::Warmup | Stage::Rl => vec![unit(None)],
        Stage::Distillation => ctx
            .run
            .spec
            .distillation
            .students
            .iter()
            .map(|s| unit(Some(&s.name)))
            .collect(),
    }
}

/// The pod set a stage child's pods belong to.
pub fn pod_set_of(child: &Child) -> &'static str {
    match child {
        Child::StatefulSet(_) => PARAM_SERVERS,
        Child::Job(j)
            if j.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ROLE))
                .map(String::as_str)
                == Some(Role::Learner.subcommand()) =>
        {
            LEARNERS
        }
        _ => TRAINERS,
    }
}

fn template_and_count(child: &Child) -> (PodTemplateSpec, i32) {
    match child {
        Child::Job(j) => {
            let spec = j.spec.clone().unwrap_or_default();
            (spec.template, spec.parallelism.unwrap_or(1))
        }
        Child::StatefulSet(s) => {
            let spec = s.spec.clone().unwrap_or_default();
            (spec.template, spec.replicas.unwrap_or(1))
        }
        _ => unreachable!("only Jobs and StatefulSets run pods"),
    }
}

/// The unit's Workload in LocalQueue `queue`, with the WorkloadPriorityClass `priority`
/// (name, value) when the run names one. Its pod sets come from `attempt`'s children, without
/// what differs between attempts ([`kueue::pod_set`]).
pub fn queue_workload(
    ctx: &Ctx,
    unit: &Unit,
    attempt: u32,
    queue: &str,
    priority: Option<(&str, i32)>,
) -> Child {
    let children = match (unit.stage, &unit.student) {
        (Stage::Warmup, _) => vec![warmup_job(ctx, attempt)],
        (Stage::Rl, _) => vec![param_server_set(ctx, attempt), learner_job(ctx, attempt)],
        (Stage::Distillation, student) => ctx
            .run
            .spec
            .distillation
            .students
            .iter()
            .filter(|s| Some(&s.name) == student.as_ref())
            .map(|s| distill_job(ctx, s, attempt))
            .collect(),
    };
    let pod_sets: Vec<PodSet> = children
        .iter()
        .map(|c| {
            let (template, count) = template_and_count(c);
            kueue::pod_set(pod_set_of(c), count, &template, LABEL_ATTEMPT)
        })
        .collect();
    let mut labels = ctx.labels(Some(unit.stage), None, None);
    if let Some(s) = &unit.student {
        labels.insert(LABEL_STUDENT.into(), s.clone());
    }
    let mut workload = Workload::new(
        &unit.workload,
        WorkloadSpec {
            queue_name: queue.into(),
            pod_sets,
            priority_class_ref: priority.map(|(name, _)| PriorityClassRef {
                group: "kueue.x-k8s.io".into(),
                kind: "WorkloadPriorityClass".into(),
                name: name.into(),
            }),
            priority: priority.map(|(_, value)| value),
        },
    );
    workload.metadata = ctx.meta(unit.workload.clone(), labels);
    Child::Workload(hashed(workload))
}

/// A unit's Job or StatefulSet with its admission's placement ([`kueue::place`]).
pub fn place(child: Child, placement: &Placement) -> Child {
    let pod_set = pod_set_of(&child);
    let unhashed = |meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        if let Some(a) = meta.annotations.as_mut() {
            a.remove(ANNOTATION_HASH);
        }
    };
    match child {
        Child::Job(mut j) => {
            unhashed(&mut j.metadata);
            if let Some(spec) = j.spec.as_mut() {
                kueue::place(&mut spec.template, pod_set, placement);
            }
            Child::Job(hashed(j))
        }
        Child::StatefulSet(mut s) => {
            unhashed(&mut s.metadata);
            if let Some(spec) = s.spec.as_mut() {
                kueue::place(&mut spec.template, pod_set, placement);
            }
            Child::StatefulSet(hashed(s))
        }
        other => other,
    }
}
