//! The children as the API server will see them: what it would refuse (duplicate list-map
//! keys, ports without a protocol under server-side apply, names and labels that are not DNS
//! labels) and the pod hardening every stage pod gets.
use super::*;
use crate::observe::{Observed, ObservedChild, ObservedPod};
use k8s_openapi::api::core::v1::{EnvVar, PodSpec, PodTemplateSpec};
use rlt_api::contract::env;

const TINY: &str = include_str!("../../../api/tests/good/tiny-cpu.yaml");

fn run_from(yaml: &str) -> RltRun {
    let mut run = rlt_api::parse_yaml(yaml).unwrap();
    run.metadata.namespace = Some("ml".into());
    run.metadata.uid = Some("uid-1".into());
    run
}

fn tiny() -> RltRun {
    run_from(TINY)
}

/// Every child a run ever has (all stages, attempt 3).
fn all_children(run: &RltRun) -> Vec<Child> {
    let ctx = Ctx::new(run);
    let mut out = vec![
        config_map(&ctx, Stage::Rl, 3),
        warmup_job(&ctx, 3),
        learner_job(&ctx, 3),
        param_server_set(&ctx, 3),
        param_server_service(&ctx),
        ranks_service(&ctx),
    ];
    out.extend(workspace_pvc(&ctx));
    out.extend(
        run.spec
            .distillation
            .students
            .iter()
            .map(|s| distill_job(&ctx, s, 3)),
    );
    out
}

fn template(child: &Child) -> Option<&PodTemplateSpec> {
    match child {
        Child::Job(j) => Some(&j.spec.as_ref()?.template),
        Child::StatefulSet(s) => Some(&s.spec.as_ref()?.template),
        _ => None,
    }
}

fn pod(child: &Child) -> &PodSpec {
    template(child).and_then(|t| t.spec.as_ref()).unwrap()
}

fn pods(run: &RltRun) -> Vec<(String, PodSpec)> {
    all_children(run)
        .iter()
        .filter(|c| template(c).is_some())
        .map(|c| (c.name().to_string(), pod(c).clone()))
        .collect()
}

fn env_of<'a>(pod: &'a PodSpec, name: &str) -> Vec<&'a EnvVar> {
    pod.containers[0]
        .env
        .iter()
        .flatten()
        .filter(|e| e.name == name)
        .collect()
}

fn value<'a>(pod: &'a PodSpec, name: &str) -> Option<&'a str> {
    match env_of(pod, name).as_slice() {
        [one] => one.value.as_deref(),
        [] => None,
        many => panic!("{name} set {} times", many.len()),
    }
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))))
}

#[test]
fn server_side_apply_gets_every_list_map_key_and_no_duplicates() {
    for child in all_children(&tiny()) {
        if let Child::Service(svc) = &child {
            for p in svc.spec.as_ref().unwrap().ports.iter().flatten() {
                assert_eq!(
                    p.protocol.as_deref(),
                    Some("TCP"),
                    "{} {:?}",
                    child.name(),
                    p.name
                );
            }
        }
        let Some(t) = template(&child) else { continue };
        let spec = t.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        for p in c.ports.iter().flatten() {
            // `ports` merges by (containerPort, protocol): an absent protocol is an SSA error.
            assert_eq!(
                p.protocol.as_deref(),
                Some("TCP"),
                "{} {:?}",
                child.name(),
                p.name
            );
        }
        let mut names: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count, "{}: duplicate env names", child.name());
        let volumes: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        for m in c.volume_mounts.iter().flatten() {
            assert!(volumes.contains(&m.name.as_str()), "{}", m.name);
        }
    }
}

#[test]
fn names_and_labels_are_what_the_api_server_accepts() {
    let yaml = TINY
        .replace("name: tiny-cpu", &format!("name: {}", "r".repeat(24)))
        .replace(
            "students: [{name: student,",
            &format!("students: [{{name: {},", "s".repeat(20)),
        );
    let run = run_from(&yaml);
    for child in all_children(&run) {
        assert!(child.name().len() <= 63, "{}", child.name());
        let mut labels: Vec<&BTreeMap<String, String>> = child.meta().labels.iter().collect();
        if let Some(t) = template(&child) {
            labels.extend(t.metadata.as_ref().and_then(|m| m.labels.as_ref()));
        }
        for (k, v) in labels.into_iter().flatten() {
            assert!(label_value_ok(v), "{}: label {k}={v}", child.name());
        }
    }
}

#[test]
fn every_stage_pod_is_hardened() {
    for (name, pod) in pods(&tiny()) {
        let c = &pod.containers[0];
        assert_eq!(
            c.termination_message_path.as_deref(),
            Some(contract::TERMINATION_LOG_PATH),
            "{name}"
        );
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(
            value(&pod, env::TERMINATION_LOG),
            Some(contract::TERMINATION_LOG_PATH)
        );
        let sc = pod.security_context.as_ref().unwrap();
        assert_eq!(sc.fs_group_change_policy.as_deref(), Some("OnRootMismatch"));
        assert_eq!(pod.automount_service_account_token, Some(false), "{name}");
        assert_eq!(pod.enable_service_links, Some(false));
        let shm = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "shm")
            .and_then(|v| v.empty_dir.as_ref())
            .unwrap();
        assert_eq!(shm.medium.as_deref(), Some("Memory"));
        assert_eq!(shm.size_limit, Some(Quantity(DEFAULT_SHM_SIZE.into())));
        // The operator never sets the bind address: the trainer's default, or the e2e agent.
        assert_eq!(value(&pod, env::BIND_ADDRESS), None);
    }
}

#[test]
fn shm_is_bounded_by_the_memory_limit_and_a_named_account_gets_its_token() {
    let yaml = TINY.replace(
        "  rl: {steps: 4,",
        "  serviceAccountName: trainer\n  rl: {learnerResources: {limits: {memory: 3Gi}}, steps: 4,",
    );
    let run = run_from(&yaml);
    let ctx = Ctx::new(&run);
    let learner = learner_job(&ctx, 0);
    let pod = pod(&learner);
    let shm = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "shm")
        .unwrap();
    assert_eq!(
        shm.empty_dir.as_ref().unwrap().size_limit,
        Some(Quantity("3Gi".into()))
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("trainer"));
    assert_eq!(pod.automount_service_account_token, None);
}

#[test]
fn the_runs_env_replaces_home_and_tmpdir_never_the_contract_and_merges_by_name() {
    let mut run = tiny();
    let var = |n: &str, v: &str| EnvVar {
        name: n.into(),
        value: Some(v.into()),
        ..Default::default()
    };
    run.spec.env = vec![
        var("HOME", "/workspace/home"),
        var("HF_HOME", "/workspace/hf"),
        var("RLT_ATTEMPT", "9"),
        var("HF_HOME", "/workspace/hf2"),
    ];
    for (name, pod) in pods(&run) {
        assert_eq!(value(&pod, "HOME"), Some("/workspace/home"), "{name}");
        assert_eq!(value(&pod, "TMPDIR"), Some(SCRATCH_DIR));
        assert_eq!(value(&pod, "HF_HOME"), Some("/workspace/hf2"));
        assert_eq!(value(&pod, env::ATTEMPT), Some("3"));
    }
    // Without the run's HOME, the operator's.
    for (_, pod) in pods(&tiny()) {
        assert_eq!(value(&pod, "HOME"), Some(SCRATCH_DIR));
    }
}

#[test]
fn pull_secrets_are_listed_once() {
    let mut run = tiny();
    let secret = |n: &str| k8s_openapi::api::core::v1::LocalObjectReference { name: n.into() };
    run.spec.image_pull_secrets = vec![secret("a"), secret("b"), secret("a")];
    for (_, pod) in pods(&run) {
        assert_eq!(pod.image_pull_secrets, Some(vec![secret("a"), secret("b")]));
    }
}

#[test]
fn the_workspace_claim_is_read_write_many_unless_the_run_says_otherwise() {
    let run = tiny();
    let modes = |run: &RltRun| match workspace_pvc(&Ctx::new(run)) {
        Some(Child::Pvc(p)) => p.spec.unwrap().access_modes.unwrap(),
        other => panic!("{other:?}"),
    };
    // RL always runs parameter servers and learners at once, maybe on different nodes.
    assert_eq!(modes(&run), vec!["ReadWriteMany".to_string()]);
    let run = run_from(&TINY.replace(
        "workspace: {size: 1Gi}",
        "workspace: {size: 1Gi, accessModes: [ReadWriteOnce]}",
    ));
    assert_eq!(modes(&run), vec!["ReadWriteOnce".to_string()]);
}

#[test]
fn a_retained_workspace_claim_has_no_owner_and_a_deleted_one_is_owned_by_the_run() {
    let owners = |run: &RltRun| match workspace_pvc(&Ctx::new(run)) {
        Some(Child::Pvc(p)) => p.metadata.owner_references.unwrap_or_default().len(),
        other => panic!("{other:?}"),
    };
    // Retain is the default: deleting the run does not collect the trained models.
    assert_eq!(owners(&tiny()), 0);
    let run = run_from(&TINY.replace(
        "workspace: {size: 1Gi}",
        "workspace: {size: 1Gi, retainPolicy: Delete}",
    ));
    assert_eq!(owners(&run), 1);
    // A later run of the same name takes the retained claim as its own, never another's.
    let claim = ObjectMeta {
        name: Some(names::workspace("tiny-cpu")),
        labels: Some(BTreeMap::from([(LABEL_RUN.into(), "tiny-cpu".into())])),
        ..Default::default()
    };
    let again = tiny();
    assert!(crate::cache::retained_workspace(
        &again,
        Kind::PersistentVolumeClaim,
        &claim
    ));
    let mut other = tiny();
    other.metadata.name = Some("other".into());
    assert!(!crate::cache::retained_workspace(
        &other,
        Kind::PersistentVolumeClaim,
        &claim
    ));
    let owned = ObjectMeta {
        owner_references: Some(vec![OwnerReference::default()]),
        ..claim
    };
    assert!(!crate::cache::retained_workspace(
        &again,
        Kind::PersistentVolumeClaim,
        &owned
    ));
}

#[test]
fn input_volumes_are_mounted_read_only_in_every_stage_pod() {
    let run = run_from(&TINY.replace(
        "workspace: {size: 1Gi}",
        "workspace: {size: 1Gi}\n  inputs:\n    - {name: models, mountPath: /models, persistentVolumeClaim: {claimName: hf-models}}",
    ));
    assert_eq!(
        run.spec.inputs.len(),
        1,
        "the sample changed: {:?}",
        run.spec
    );
    for (name, pod) in pods(&run) {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "in-models")
            .unwrap_or_else(|| panic!("{name}: no input volume"));
        assert_eq!(
            volume.persistent_volume_claim.as_ref().unwrap().claim_name,
            "hf-models"
        );
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "in-models")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/models", Some(true)),
            "{name}"
        );
    }
}

/// A platform team's additions reach the pods of the role they are given for, over the
/// run's; the run's labels reach every child; parameter servers are placed on their own.
#[test]
fn pod_templates_and_the_runs_labels_reach_the_pods_of_their_roles() {
    let mut run = run_from(&TINY.replace(
        "workspace: {size: 1Gi}",
        r#"workspace: {size: 1Gi}
  podTemplate:
    labels: {team: ml, tier: batch}
    annotations: {sidecar.istio.io/inject: "false"}
    runtimeClassName: nvidia
    volumes: [{name: cache, emptyDir: {}}]
    volumeMounts: [{name: cache, mountPath: /cache}]
  scheduling:
    nodeSelector: {pool: shared}"#,
    ));
    run.spec.rl.learner_pod_template = serde_json::from_value(serde_json::json!({
        "labels": {"tier": "gpu"},
        "initContainers": [{"name": "warm-cache", "image": "busybox", "command": ["true"]}],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway"}],
        "securityContext": {"runAsNonRoot": true},
    }))
    .unwrap();
    run.spec.rl.scheduling.node_selector = BTreeMap::from([("gpu".into(), "h100".into())]);
    run.spec.rl.param_server_scheduling = Some(rlt_api::spec::Scheduling {
        node_selector: BTreeMap::from([("pool".into(), "cpu".into())]),
        ..Default::default()
    });
    run.metadata.labels = Some(BTreeMap::from([
        ("cost-centre".into(), "42".into()),
        ("tier".into(), "from-the-run".into()),
        (LABEL_RUN.into(), "spoofed".into()),
    ]));
    for child in all_children(&run) {
        let labels = child.meta().labels.clone().unwrap_or_default();
        assert_eq!(labels["cost-centre"], "42", "{}", child.name());
        assert_eq!(labels[LABEL_RUN], run.name_any(), "{}", child.name());
        let Some(t) = template(&child) else { continue };
        let (meta, pod) = (t.metadata.as_ref().unwrap(), t.spec.as_ref().unwrap());
        let labels = meta.labels.as_ref().unwrap();
        let role = labels[LABEL_ROLE].as_str();
        let name = child.name();
        assert_eq!(labels["team"], "ml", "{name}");
        assert_eq!(labels["cost-centre"], "42", "{name}");
        let learner = role == Role::Learner.subcommand();
        assert_eq!(
            labels["tier"],
            if learner { "gpu" } else { "batch" },
            "{name}"
        );
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations["sidecar.istio.io/inject"], "false", "{name}");
        assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"), "{name}");
        assert!(
            pod.volumes.iter().flatten().any(|v| v.name == "cache"),
            "{name}"
        );
        let mounts = pod.containers[0].volume_mounts.iter().flatten();
        assert!(mounts.clone().any(|m| m.mount_path == "/cache"), "{name}");
        assert!(
            mounts.clone().any(|m| m.mount_path == "/workspace"),
            "{name}"
        );
        assert_eq!(pod.init_containers.is_some(), learner, "{name}");
        assert_eq!(pod.topology_spread_constraints.is_some(), learner, "{name}");
        let security = pod.security_context.as_ref().unwrap();
        // The learner's own security context replaces the operator's whole (OpenShift: the
        // SCC picks the UIDs); the others keep the operator's fixed ones.
        assert_eq!(security.run_as_user.is_none(), learner, "{name}");
        let selector = pod.node_selector.clone().unwrap_or_default();
        let wanted = match role {
            r if r == Role::ParamServer.subcommand() => ("pool", "cpu"),
            r if r == Role::Learner.subcommand() => ("gpu", "h100"),
            _ => ("pool", "shared"),
        };
        assert_eq!(
            selector.get(wanted.0).map(String::as_str),
            Some(wanted.1),
            "{name}"
        );
    }
}

#[test]
fn each_rl_attempt_gets_its_own_parameter_servers() {
    let run = tiny();
    let ctx = Ctx::new(&run);
    let Child::StatefulSet(sts) = param_server_set(&ctx, 2) else {
        panic!()
    };
    assert_eq!(sts.metadata.name.as_deref(), Some("tiny-cpu-ps-2"));
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.service_name.as_deref(), Some("tiny-cpu-ps"));
    let selector = spec.selector.match_labels.as_ref().unwrap();
    assert_eq!(selector[LABEL_ATTEMPT], "2");
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "selector {k} matches the template"
        );
    }
    // The learners of attempt 2 talk to attempt 2's shards, by their own DNS names.
    let learner = learner_job(&ctx, 2);
    assert_eq!(
        value(pod(&learner), env::PARAM_SERVERS),
        Some("tiny-cpu-ps-2-0.tiny-cpu-ps.ml.svc:50051")
    );
    // The headless Service is the run's, across attempts.
    let Child::Service(svc) = param_server_service(&ctx) else {
        panic!()
    };
    assert_eq!(svc.metadata.name.as_deref(), Some("tiny-cpu-ps"));
    assert!(!svc
        .spec
        .unwrap()
        .selector
        .unwrap()
        .contains_key(LABEL_ATTEMPT));

    let observed = |name: &str, deleting: bool| ObservedChild {
        kind: Kind::StatefulSet,
        name: name.into(),
        hash: None,
        deleting,
    };
    let obs = Observed {
        children: vec![
            observed("tiny-cpu-ps-0", true),
            observed("tiny-cpu-ps-1", false),
            observed("tiny-cpu-ps-2", false),
            observed("tiny-cpu-other", false),
        ],
        ..Default::default()
    };
    assert_eq!(
        stale_param_server_sets("tiny-cpu", &obs, Some(2)),
        vec!["tiny-cpu-ps-1".to_string()]
    );
    assert_eq!(
        stale_param_server_sets("tiny-cpu", &obs, None),
        vec!["tiny-cpu-ps-1".to_string(), "tiny-cpu-ps-2".to_string()]
    );
}

#[test]
fn figures_are_read_at_parameter_server_0s_pod_ip_when_observed() {
    let mut run = tiny();
    run.status = Some(
        serde_json::from_value(serde_json::json!({"stages": {"rl": {"attempt": 2}}})).unwrap(),
    );
    let ps = |name: &str, ip: Option<&str>, deleting: bool| ObservedPod {
        name: name.into(),
        stage: Some(Stage::Rl),
        attempt: Some(2),
        ip: ip.map(Into::into),
        deleting,
        ..Default::default()
    };
    let url = |pods: Vec<ObservedPod>| {
        status_url(
            &run,
            &Observed {
                pods,
                ..Default::default()
            },
        )
    };
    let dns = "http://tiny-cpu-ps-2-0.tiny-cpu-ps.ml.svc:9090/status";
    assert_eq!(url(vec![]), dns);
    assert_eq!(url(vec![ps("tiny-cpu-ps-2-0", None, false)]), dns);
    assert_eq!(
        url(vec![ps("tiny-cpu-ps-2-0", Some("10.0.0.7"), true)]),
        dns
    );
    assert_eq!(
        url(vec![
            ps("tiny-cpu-ps-2-1", Some("10.0.0.8"), false),
            ps("tiny-cpu-ps-2-0", Some("10.0.0.7"), false)
        ]),
        "http://10.0.0.7:9090/status"
    );
    assert_eq!(
        url(vec![ps("tiny-cpu-ps-2-0", Some("fd00::7"), false)]),
        "http://[fd00::7]:9090/status"
    );
}

#[test]
fn data_parallel_pods_get_one_rank_per_gpu_and_find_their_peers_by_dns() {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let gpus = |n: &str| ResourceRequirements {
        limits: Some(BTreeMap::from([(
            "nvidia.com/gpu".to_string(),
            Quantity(n.into()),
        )])),
        ..Default::default()
    };
    let mut run = tiny();
    run.spec.warmup.replicas = 2;
    run.spec.warmup.resources = Some(gpus("4"));
    run.spec.distillation.replicas = 1;
    run.spec.distillation.students[0].resources = Some(gpus("8"));
    assert!(needs_ranks_service(&run));
    let ctx = Ctx::new(&run);

    // Two pods of four GPUs: eight ranks, dialing each pod by its DNS name under the
    // ranks Service, which selects exactly those pods.
    let warmup = warmup_job(&ctx, 1);
    let t = template(&warmup).unwrap();
    let spec = pod(&warmup);
    assert_eq!(value(spec, env::RANKS_PER_POD), Some("4"));
    assert_eq!(value(spec, env::REPLICAS), Some("2"));
    assert_eq!(
        value(spec, env::MASTER_ADDR),
        Some("tiny-cpu-warmup-1-0.tiny-cpu-ranks.ml.svc")
    );
    assert_eq!(value(spec, env::MASTER_PORT), Some("29500"));
    assert_eq!(value(spec, env::WORLD_SIZE), Some("8"));
    assert_eq!(value(spec, env::LOCAL_WORLD_SIZE), Some("4"));
    // Each of a pod's four processes gets its own RANK from the trainer, not the pod.
    assert_eq!(value(spec, env::RANK), None);
    assert_eq!(spec.subdomain.as_deref(), Some("tiny-cpu-ranks"));
    let Child::Service(svc) = ranks_service(&ctx) else {
        panic!()
    };
    assert_eq!(svc.metadata.name.as_deref(), Some("tiny-cpu-ranks"));
    let svc = svc.spec.unwrap();
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
    let labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    for (k, v) in svc.selector.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "selector {k} matches the pods");
    }
    assert!(spec.containers[0]
        .ports
        .iter()
        .flatten()
        .any(|p| p.container_port == 29500));

    // One pod of eight GPUs: eight ranks on loopback, no DNS, not selected by the Service.
    let student = &run.spec.distillation.students[0];
    let distill = distill_job(&ctx, student, 1);
    let spec = pod(&distill);
    assert_eq!(value(spec, env::RANKS_PER_POD), Some("8"));
    assert_eq!(value(spec, env::MASTER_ADDR), Some("127.0.0.1"));
    assert_eq!(value(spec, env::WORLD_SIZE), Some("8"));
    assert_eq!(spec.subdomain, None);
    let labels = template(&distill)
        .unwrap()
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref();
    assert!(!labels.unwrap().contains_key(LABEL_RANK));

    // Learners and parameter servers are not a collective: one rank each, no peers.
    for child in [learner_job(&ctx, 1), param_server_set(&ctx, 1)] {
        let spec = pod(&child);
        assert_eq!(
            value(spec, env::RANKS_PER_POD),
            Some("1"),
            "{}",
            child.name()
        );
        assert_eq!(value(spec, env::MASTER_ADDR), None, "{}", child.name());
    }

    // A single-pod, CPU-only run needs none of it.
    let plain = tiny();
    assert!(!needs_ranks_service(&plain));
    let ctx = Ctx::new(&plain);
    let spec = pod(&warmup_job(&ctx, 0)).clone();
    assert_eq!(value(&spec, env::RANKS_PER_POD), Some("1"));
    assert_eq!(value(&spec, env::MASTER_ADDR), None);
}
