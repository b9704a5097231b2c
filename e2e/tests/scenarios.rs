//! The operator against a real cluster: one set of scenarios for any kubeconfig. `scripts/dev
//! e2e` runs them against a local cluster of upstream components (control plane, kubelet,
//! containerd, runc, kube-proxy, CoreDNS) whose pods run the images built here,
//! `e2e/kind.sh` against kind. They are `#[ignore]`d so `cargo test`
//! never needs a cluster, and they share one operator, so they run one at a time
//! (`--test-threads 1`); names are prefixed so they run in the order a user meets things.
mod support;

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolumeClaim, Pod, ResourceQuota, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use support::*;

const CRD: &str = "rltruns.rlt.dev";
/// A memory limit far below what the trainer's process takes to start: loading libtorch alone
/// makes it about 480 MiB resident (`rlt-trainer --help`), so the kernel stops it before the
/// memory preflight (which would refuse the limit as a bad configuration) ever runs.
const OOM_LIMIT: &str = "64Mi";

async fn crd_established(client: &Client) -> Result<CustomResourceDefinition> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for("the RltRun CRD to be Established", secs(60), async || {
        let crd = crds.get_opt(CRD).await?;
        Ok(crd.filter(|c| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        }))
    })
    .await
}

fn printer_columns(crd: &CustomResourceDefinition) -> Vec<String> {
    crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s01_helm_installs_upgrades_and_uninstall_keeps_the_crd() -> Result<()> {
    let client = client().await?;
    // An older chart whose CRD lacks the Reward column, then the real chart: the upgrade
    // must update the CRD (it is a template, not a crds/ file that Helm never upgrades).
    let old = tempdir("old-chart")?;
    tool("cp", &["-r", "charts/rlt-operator", old.to_str().unwrap()])?;
    let crd_file = old.join("rlt-operator/templates/crd.yaml");
    let text = std::fs::read_to_string(&crd_file)?;
    let reward =
        "    - jsonPath: .status.training.meanReward\n      name: Reward\n      type: number\n";
    ensure!(
        text.contains(reward),
        "the chart's CRD has no Reward column to drop"
    );
    std::fs::write(&crd_file, text.replace(reward, ""))?;
    let _ = tool(
        "helm",
        &["uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE],
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds.delete(CRD, &DeleteParams::default()).await;
    wait_for("the old CRD to be gone", secs(60), async || {
        Ok(crds.get_opt(CRD).await?.is_none().then_some(()))
    })
    .await?;
    tool(
        "helm",
        &[
            "install",
            RELEASE,
            old.join("rlt-operator").to_str().unwrap(),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--set",
            "replicaCount=1",
        ],
    )?;
    let crd = crd_established(&client).await?;
    ensure!(!printer_columns(&crd).contains(&"Reward".to_string()));

    install_operator(&[])?;
    let crd = crd_established(&client).await?;
    let columns = printer_columns(&crd);
    for want in [
        "Phase",
        "Reason",
        "Stage Progress",
        "Reward",
        "Attempt",
        "Age",
    ] {
        ensure!(
            columns.iter().any(|c| c == want),
            "after helm upgrade the CRD lacks column {want}: {columns:?}"
        );
    }

    // Uninstall keeps the CRD (and so every user's runs).
    tool(
        "helm",
        &["uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE],
    )?;
    ensure!(
        crds.get_opt(CRD).await?.is_some(),
        "helm uninstall deleted the CRD"
    );

    // The kustomize base is accepted by the server as well (dry run: it is the same operator).
    tool(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=rlt-e2e",
            "-k",
            "manifests/kustomize/base",
        ],
    )?;

    install_operator(&[])?;
    Ok(())
}

/// Which fields a client-side validation names, split by whether the CRD can say it.
fn client_errors(text: &str) -> (Vec<String>, Vec<String>) {
    let errors = rlt_api::validate::parse_yaml(text).expect_err("a bad sample passed the client");
    let (semantic, schema): (Vec<_>, Vec<_>) =
        errors.into_iter().partition(|e| e.check == "semantic");
    (
        schema.into_iter().map(|e| e.field).collect(),
        semantic.into_iter().map(|e| e.field).collect(),
    )
}

/// The fields an API server error message names (`spec.rl.steps`, `.spec.env`, `metadata.name`).
fn fields_named(message: &str) -> Vec<String> {
    let re =
        regex::Regex::new(r#"(?:^|[\s*])\.?((?:spec|metadata)(?:\.[A-Za-z0-9]+|\[[^\]\s]*\])*)"#)
            .unwrap();
    let mut out: Vec<String> = re
        .captures_iter(message)
        .map(|c| c[1].to_string())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One field names the other or an element or parent of it (`spec.distillation.students`
/// and `spec.distillation.students[1]`).
fn same_field(a: &str, b: &str) -> bool {
    let under = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
    };
    under(a, b) || under(b, a)
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s02_the_api_server_and_the_client_validator_agree() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let api = rltruns(&client);
    let mut failures = Vec::new();
    let mut dir: Vec<_> = std::fs::read_dir(root().join("api/tests/bad"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    dir.sort();
    for path in dir {
        let text = std::fs::read_to_string(&path)?;
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let (schema_fields, semantic_fields) = client_errors(&text);
        let value: Value = serde_yaml::from_str(&text)?;
        let name = value["metadata"]["name"].as_str().unwrap_or("").to_string();
        let mut obj = run_from_yaml(&text, &name)?;
        obj.data["spec"]["image"] = value["spec"]["image"].clone();
        match apply_run(&api, &obj).await {
            Err(e) => {
                let msg = match e.downcast_ref::<kube::Error>() {
                    Some(kube::Error::Api(status)) => status.message.clone(),
                    _ => e.to_string(),
                };
                // The server stops at its first failing layer (a typed-patch error such as an
                // unknown field hides the schema's), so it must name at least one field the
                // client names, and nothing the client does not.
                let expected = if schema_fields.is_empty() {
                    &semantic_fields // e.g. metadata.name, which the server checks itself
                } else {
                    &schema_fields
                };
                let named = fields_named(&msg);
                if !named
                    .iter()
                    .any(|s| expected.iter().any(|c| same_field(s, c)))
                {
                    failures.push(format!(
                        "{file}: the server's refusal names none of {expected:?}: {msg}"
                    ));
                }
                for s in &named {
                    if !expected.iter().any(|c| same_field(s, c)) {
                        failures.push(format!(
                            "{file}: the server names {s}, the client only {expected:?}: {msg}"
                        ));
                    }
                }
            }
            Ok(_) if !schema_fields.is_empty() => {
                failures.push(format!(
                    "{file}: accepted by the server, but the client refuses {schema_fields:?}"
                ));
                delete_run(&client, &name).await?;
            }
            Ok(_) => {
                // The operator must mark it InvalidSpec naming the field, and create nothing.
                let run = wait_for(&format!("{file}: InvalidSpec=True"), secs(60), async || {
                    let run = api.get(&name).await?;
                    Ok(condition_true(&run, "InvalidSpec").then_some(run))
                })
                .await?;
                let message = condition(&run, "InvalidSpec").unwrap()["message"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                for f in &semantic_fields {
                    if !message.contains(f.as_str()) {
                        failures.push(format!("{file}: InvalidSpec does not name {f}: {message}"));
                    }
                }
                let jobs = jobs_of(&client, &name).await?;
                if !jobs.is_empty() {
                    failures.push(format!("{file}: an invalid run created Jobs"));
                }
                // What `kubectl get rltruns` shows: PHASE Invalid, REASON InvalidSpec.
                let reason = run.data["status"]["reason"].as_str().unwrap_or_default();
                ensure!(
                    phase(&run) == "Invalid" && reason == "InvalidSpec",
                    "{file}: phase {}, reason {reason:?}",
                    phase(&run)
                );
                delete_run(&client, &name).await?;
            }
        }
    }

    // Every good sample and every manifest is accepted (dry run: they are not meant to run here).
    let mut good: Vec<_> = std::fs::read_dir(root().join("api/tests/good"))?
        .chain(std::fs::read_dir(root().join("manifests"))?)
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    good.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    good.sort();
    for path in good {
        let text = std::fs::read_to_string(&path)?;
        let value: Value = serde_yaml::from_str(&text)?;
        let obj = run_from_yaml(&text, value["metadata"]["name"].as_str().unwrap_or("x"))?;
        let name = obj.metadata.name.clone().unwrap();
        let pp = PatchParams::apply("rlt-e2e").validation_strict().dry_run();
        if let Err(e) = api.patch(&name, &pp, &Patch::Apply(&obj)).await {
            failures.push(format!("{}: refused: {e}", path.display()));
        }
    }
    if !failures.is_empty() {
        bail!("validation parity:\n{}", failures.join("\n"));
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s03_tiny_run_walks_every_phase_and_leaves_every_artifact() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-tiny";
    delete_run(&client, name).await?;
    let mut run = tiny_run(name)?;
    // Long enough that RL is seen moving (figures are polled every 15 s) and a learner pod
    // can be deleted mid-stage.
    run.data["spec"]["rl"]["steps"] = json!(120);
    let api = rltruns(&client);
    apply_run(&api, &run).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let mut phases: Vec<String> = Vec::new();
    let mut rl_rows: Vec<(String, Option<f64>)> = Vec::new();
    let mut deleted_learner = false;
    let done =
        wait_for("the tiny run to finish", secs(900), async || {
            let run = api.get(name).await?;
            let p = phase(&run).to_string();
            if !p.is_empty() && phases.last() != Some(&p) {
                eprintln!("{name}: {p}");
                phases.push(p.clone());
            }
            if p == "RL" {
                let row = (
                    run.data["status"]["progress"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    run.data["status"]["training"]["meanReward"].as_f64(),
                );
                if rl_rows.last() != Some(&row) {
                    eprintln!("{name}: RL {row:?}");
                    rl_rows.push(row);
                }
                // Mid-RL, lose a learner: the Job's retry must carry the run to Succeeded.
                if !deleted_learner && rl_rows.len() >= 2 {
                    let lp = ListParams::default()
                        .labels(&format!("rlt.dev/run={name},rlt.dev/role=learner"));
                    if let Some(pod) = pods.list(&lp).await?.items.into_iter().find(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    }) {
                        let pod_name = pod.metadata.name.unwrap();
                        eprintln!("{name}: deleting learner pod {pod_name} mid-RL");
                        pods.delete(&pod_name, &DeleteParams::default()).await?;
                        deleted_learner = true;
                    }
                }
            }
            match p.as_str() {
                "Succeeded" => Ok(Some(run)),
                "Failed" => bail!(
                    "{name} failed: {}",
                    serde_json::to_string_pretty(&run.data["status"])?
                ),
                _ => Ok(None),
            }
        })
        .await?;

    ensure!(
        phases == ["Pending", "WarmUp", "RL", "Distillation", "Succeeded"]
            || phases == ["WarmUp", "RL", "Distillation", "Succeeded"],
        "phases out of order or missing: {phases:?}"
    );
    ensure!(
        deleted_learner,
        "RL ended before a learner pod was seen Running: nothing was deleted"
    );
    let progress: Vec<&str> = rl_rows.iter().map(|r| r.0.as_str()).collect();
    ensure!(
        progress
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 2,
        "STAGE PROGRESS never moved during RL: {rl_rows:?}"
    );
    ensure!(
        rl_rows.iter().filter_map(|r| r.1).count() >= 1,
        "REWARD never shown during RL: {rl_rows:?}"
    );
    let columns = tool("kubectl", &["get", "rltruns", name, "-n", &namespace()])?;
    eprintln!("{columns}");
    for column in [
        "NAME",
        "PHASE",
        "REASON",
        "STAGE PROGRESS",
        "REWARD",
        "ATTEMPT",
        "AGE",
    ] {
        ensure!(
            columns.contains(column),
            "kubectl get rltruns lacks {column}:\n{columns}"
        );
    }

    let missing = missing_in_workspace(
        &client,
        &done,
        &[
            "warmup/final/config.json",
            "warmup/final/tokenizer.json",
            "warmup/final/model.safetensors",
            "rl/final/config.json",
            "rl/final/model.safetensors",
            "distill/student/traces.jsonl",
            "distill/student/final/config.json",
            "distill/student/final/model.safetensors",
        ],
    )
    .await?;
    ensure!(
        missing.is_empty(),
        "artifacts missing from the workspace: {missing:?}"
    );

    // Terminal is sticky: deleting a finished run's Jobs brings nothing back.
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &namespace());
    for job in jobs_of(&client, name).await? {
        jobs.delete(&job.metadata.name.unwrap(), &DeleteParams::background())
            .await?;
    }
    tokio::time::sleep(secs(10)).await;
    ensure!(phase(&api.get(name).await?) == "Succeeded");
    ensure!(
        jobs_of(&client, name).await?.is_empty(),
        "a finished run recreated its Jobs"
    );
    // Deleting the run removes every child through the garbage collector, but the workspace
    // claim it created: retainPolicy Retain (the default) keeps the trained models.
    let api_del = api.delete(name, &DeleteParams::background()).await;
    ensure!(api_del.is_ok(), "deleting the run: {api_del:?}");
    let claim = workspace_claim(&done);
    wait_for(
        "every child of the run but its workspace to be collected",
        secs(120),
        async || {
            let mut left = children_by_kind(&client, name).await?;
            let claims = left.remove("PersistentVolumeClaim").unwrap_or_default();
            Ok((left.values().all(Vec::is_empty) && claims == [claim.clone()]).then_some(()))
        },
    )
    .await?;
    let missing = missing_in_workspace(&client, &done, &["rl/final/model.safetensors"]).await?;
    ensure!(
        missing.is_empty(),
        "the retained workspace lost the models of the deleted run: {missing:?}"
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace());
    claims.delete(&claim, &DeleteParams::default()).await?;
    Ok(())
}

/// The tiny run exactly as shipped (RL of 8 steps, shorter than one poll of the figures), as a
/// user watches it: it ends with its last reward in status and nothing alarming on the run or
/// its pods (a parameter server that exits once the stage is done would be restarted by its
/// StatefulSet, and the kubelet's back-off would become a Warning).
#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s03b_a_healthy_tiny_run_keeps_its_final_reward_and_raises_no_warning() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-healthy";
    delete_run(&client, name).await?;
    let api = rltruns(&client);
    let run = tiny_run(name)?;
    let steps = run.data["spec"]["rl"]["steps"]
        .as_u64()
        .context("rl.steps")?;
    apply_run(&api, &run).await?;
    let done = wait_phase(&client, name, "Succeeded", secs(600)).await?;
    eprintln!(
        "{}",
        tool("kubectl", &["get", "rltruns", name, "-n", &namespace()])?
    );
    eprintln!(
        "{}",
        tool("kubectl", &["describe", "rltrun", name, "-n", &namespace()])?
    );
    let training = &done.data["status"]["training"];
    ensure!(
        training["step"].as_u64() == Some(steps)
            && training["totalSteps"].as_u64() == Some(steps)
            && training["meanReward"].is_f64()
            && training["solutionTerm"].is_f64()
            && training["klTerm"].is_f64(),
        "the final figures of RL are not in status: {training}"
    );
    // Events about the run and about each of its children and their pods. One kind of pod
    // Warning is Kubernetes telling the truth about a healthy run: the kubelet records every
    // failed probe as a Warning, and a parameter server is not Ready (its `rpc` port refuses)
    // while it loads the teacher, which is what its readiness probe is for (s11).
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client.clone(), &namespace());
    let prefix = format!("{name}-");
    let param_server = format!("{name}-ps-");
    let created = done.metadata.creation_timestamp.clone();
    let loading = |e: &k8s_openapi::api::core::v1::Event| {
        let about = e.involved_object.name.as_deref().unwrap_or_default();
        let text = event_text(e);
        about.starts_with(&param_server)
            && text.starts_with("Warning Unhealthy: Readiness probe failed:")
            && text.trim_end().ends_with("connect: connection refused")
    };
    let warnings: Vec<String> = events
        .list(&ListParams::default().fields("type=Warning"))
        .await?
        .items
        .iter()
        .filter(|e| {
            let about = e.involved_object.name.as_deref().unwrap_or_default();
            (about == name || about.starts_with(&prefix))
                && e.metadata.creation_timestamp >= created
                && !loading(e)
        })
        .map(|e| {
            format!(
                "{}/{}: {}",
                e.involved_object.kind.as_deref().unwrap_or_default(),
                e.involved_object.name.as_deref().unwrap_or_default(),
                event_text(e)
            )
        })
        .collect();
    ensure!(
        warnings.is_empty(),
        "a healthy run raised Warnings: {warnings:#?}"
    );
    delete_run(&client, name).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace());
    claims
        .delete(&workspace_claim(&done), &DeleteParams::default())
        .await?;
    Ok(())
}

fn stage_message(run: &kube::api::DynamicObject) -> String {
    run.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}: {}",
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s04_a_failing_stage_is_retried_then_fails_the_run_with_the_pods_reason() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let api = rltruns(&client);

    // A bad configuration (a dataset that does not exist): the trainer says why in its
    // termination message and exits 2, which the operator does not retry.
    let name = "e2e-badconfig";
    delete_run(&client, name).await?;
    let mut run = tiny_run(name)?;
    run.data["spec"]["dataset"] = json!({"path": "missing/rows.jsonl"});
    run.data["spec"]["failurePolicy"] = json!({"retries": 2});
    apply_run(&api, &run).await?;
    let failed = wait_phase(&client, name, "Failed", secs(300)).await?;
    let message = stage_message(&failed);
    ensure!(
        message.contains("missing/rows.jsonl"),
        "the run's conditions do not carry the trainer's reason: {message}"
    );
    ensure!(
        jobs_of(&client, name).await?.len() == 1,
        "a bad configuration was retried"
    );
    delete_run(&client, name).await?;

    // A crash (exit 1) is retried as a new attempt, then fails the run with the pod's message.
    // What crashes it is real: the run's directory in its workspace is a file (a workspace
    // some other tool left in a bad state), so the trainer cannot write its inputs there.
    let name = "e2e-crashloop";
    delete_run(&client, name).await?;
    let claim = format!("{name}-ws");
    create_claim(&client, &claim).await?;
    run_on_claim(
        &client,
        &format!("{name}-spoil"),
        &claim,
        r#"echo "not a directory" >"/workspace/$RUN" && echo spoiled >"$REPORT""#,
        &[("RUN", name.to_string())],
    )
    .await?;
    let mut run = tiny_run(name)?;
    // The run's directory named as the spoiled path (a directory named by hand continues an
    // earlier run's).
    run.data["spec"]["workspace"] = json!({ "claimName": claim, "directory": name });
    run.data["spec"]["failurePolicy"] = json!({"retries": 1});
    apply_run(&api, &run).await?;
    let failed = wait_phase(&client, name, "Failed", secs(300)).await?;
    let message = stage_message(&failed);
    ensure!(
        message.contains("Not a directory") && message.contains("exited with code 1"),
        "the run's conditions do not carry the pod's exit code and termination message: {message}"
    );
    ensure!(
        failed.data["status"]["stages"]["warmup"]["failures"] == json!(2),
        "expected 2 failed attempts (1 retry): {}",
        failed.data["status"]
    );
    // Each attempt is its own Job, kept for its logs.
    let jobs = jobs_of(&client, name).await?;
    ensure!(
        jobs.len() == 2,
        "expected one Job per attempt, found {}",
        jobs.len()
    );
    let events: Vec<String> = events_about(&client, name)
        .await?
        .iter()
        .map(event_text)
        .collect();
    ensure!(
        events
            .iter()
            .any(|e| e.starts_with("Warning") && e.contains("Not a directory")),
        "no Warning Event with the reason: {events:#?}"
    );
    delete_run(&client, name).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace());
    claims.delete(&claim, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s05_oomkilled_and_unschedulable_pods_show_in_the_condition_and_an_event() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let api = rltruns(&client);

    // Unschedulable: more GPUs than any node has.
    let name = "e2e-nogpu";
    delete_run(&client, name).await?;
    let mut run = tiny_run(name)?;
    run.data["spec"]["device"] = json!("cpu");
    run.data["spec"]["warmup"]["resources"] =
        json!({"requests": {"nvidia.com/gpu": 64}, "limits": {"nvidia.com/gpu": 64}});
    apply_run(&api, &run).await?;
    let run = wait_for(
        "Unschedulable in the run's condition",
        secs(120),
        async || {
            let run = api.get(name).await?;
            Ok(stage_message(&run).contains("nschedulable").then_some(run))
        },
    )
    .await?;
    ensure!(phase(&run) == "WarmUp", "phase {}", phase(&run));
    let events = events_about(&client, name).await?;
    ensure!(
        events
            .iter()
            .any(|e| event_text(e).contains("nschedulable")),
        "no Unschedulable Event: {:#?}",
        events.iter().map(event_text).collect::<Vec<_>>()
    );
    delete_run(&client, name).await?;

    // OOMKilled: a memory limit the warm-up's process outgrows (loading libtorch alone takes
    // more), enforced by the node's cgroup; no retries.
    let name = "e2e-oom";
    delete_run(&client, name).await?;
    let mut run = tiny_run(name)?;
    run.data["spec"]["warmup"]["resources"] = json!({"limits": {"memory": OOM_LIMIT}});
    run.data["spec"]["failurePolicy"] = json!({"retries": 0});
    apply_run(&api, &run).await?;
    let failed = wait_phase(&client, name, "Failed", secs(300)).await?;
    let pods = pods_of(&client, &format!("rlt.dev/run={name},rlt.dev/stage=warmup")).await?;
    let terminated = pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.clone())
        .context("no terminated warm-up container")?;
    ensure!(
        terminated.reason.as_deref() == Some("OOMKilled") && terminated.exit_code == 137,
        "the warm-up container ended {:?} with exit code {}, not OOMKilled (137)",
        terminated.reason,
        terminated.exit_code
    );
    ensure!(
        stage_message(&failed).contains("OOMKilled"),
        "OOMKilled not in the conditions: {}",
        stage_message(&failed)
    );
    let events = events_about(&client, name).await?;
    ensure!(
        events.iter().any(|e| event_text(e).contains("OOMKilled")),
        "no OOMKilled Event: {:#?}",
        events.iter().map(event_text).collect::<Vec<_>>()
    );
    delete_run(&client, name).await
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s05b_a_job_whose_pods_are_refused_by_a_quota_shows_why_in_the_condition() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-quota";
    delete_run(&client, name).await?;
    // No pods at all in the namespace: the Job controller's pod creation is refused by the
    // ResourceQuota admission plugin, and the Job itself has no condition saying so.
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &namespace());
    let quota = json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "e2e-no-pods"},
        "spec": {"hard": {"pods": "0"}},
    });
    quotas
        .patch(
            "e2e-no-pods",
            &PatchParams::apply("rlt-e2e"),
            &Patch::Apply(&quota),
        )
        .await?;
    let api = rltruns(&client);
    apply_run(&api, &tiny_run(name)?).await?;
    let seen = wait_for(
        "the quota refusal in the run's condition",
        secs(120),
        async || {
            let run = api.get(name).await?;
            Ok(stage_message(&run)
                .contains("exceeded quota")
                .then_some(run))
        },
    )
    .await;
    quotas
        .delete("e2e-no-pods", &DeleteParams::default())
        .await?;
    let run = seen?;
    eprintln!("{name}: {}", stage_message(&run));
    let events = events_about(&client, name).await?;
    ensure!(
        events
            .iter()
            .any(|e| event_text(e).contains("exceeded quota")),
        "no Event about the quota: {:#?}",
        events.iter().map(event_text).collect::<Vec<_>>()
    );
    // With the quota gone the Job creates its pods and the run goes on.
    wait_phase(&client, name, "Succeeded", secs(600)).await?;
    delete_run(&client, name).await
}

/// The operator's pods (the chart's Deployment).
async fn operator_pods(client: &Client) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let lp = ListParams::default().labels("app.kubernetes.io/name=rlt-operator");
    Ok(pods
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Deletes an operator pod with no grace period; the Deployment starts a new one. A real kubelet
/// still stops the container gracefully (SIGTERM, then SIGKILL after its minimum grace of 2 s),
/// so the operator releases its Lease on the way out.
async fn delete_operator_pod(client: &Client, pod: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    pods.delete(pod, &DeleteParams::default().grace_period(0))
        .await?;
    Ok(())
}

/// Crashes an operator: SIGKILL to its process (no shutdown, no Lease release), found on this
/// machine's `/proc`; the kubelet restarts the container in the same pod. Where the node's
/// processes are not visible (a remote cluster) the pod is deleted instead. Returns how.
async fn crash_operator(client: &Client, pod: &Pod) -> Result<&'static str> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    match node_process(&uid, "rlt-operator") {
        Some(pid) => {
            let killed = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
            ensure!(killed.success(), "kill -KILL {pid} failed");
            Ok("SIGKILL")
        }
        None => {
            delete_operator_pod(client, &name).await?;
            Ok("pod deleted")
        }
    }
}

/// The names of a run's children of one kind (found by the run's label).
async fn names_of<K>(client: &Client, name: &str) -> Result<Vec<String>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &namespace());
    Ok(api
        .list(&run_selector(name))
        .await?
        .items
        .into_iter()
        .filter_map(|o| o.meta().name.clone())
        .collect())
}

/// Every kind of child a run has, with the names of those that exist (a duplicate shows as
/// two names for one stage attempt).
async fn children_by_kind(
    client: &Client,
    name: &str,
) -> Result<BTreeMap<&'static str, Vec<String>>> {
    Ok(BTreeMap::from([
        ("ConfigMap", names_of::<ConfigMap>(client, name).await?),
        (
            "PersistentVolumeClaim",
            names_of::<PersistentVolumeClaim>(client, name).await?,
        ),
        (
            "Job",
            names_of::<k8s_openapi::api::batch::v1::Job>(client, name).await?,
        ),
        ("StatefulSet", names_of::<StatefulSet>(client, name).await?),
        ("Service", names_of::<Service>(client, name).await?),
    ]))
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s06_an_operator_killed_at_every_phase_boundary_leaves_no_duplicates() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-crash";
    delete_run(&client, name).await?;
    let api = rltruns(&client);
    apply_run(&api, &tiny_run(name)?).await?;
    let mut last = String::new();
    let mut kills = 0;
    wait_for(
        "the run to succeed across operator kills",
        secs(900),
        async || {
            let run = api.get(name).await?;
            let p = phase(&run).to_string();
            if p != last {
                if p != "Succeeded" && p != "Failed" {
                    for pod in operator_pods(&client).await? {
                        let how = crash_operator(&client, &pod).await?;
                        eprintln!("{name}: {p}: operator pod {:?}: {how}", pod.metadata.name);
                        kills += 1;
                    }
                }
                last = p.clone();
            }
            match p.as_str() {
                "Succeeded" => Ok(Some(())),
                "Failed" => bail!("{name} failed: {}", run.data["status"]),
                _ => Ok(None),
            }
        },
    )
    .await?;
    ensure!(kills >= 3, "the operator was killed only {kills} times");
    let children = children_by_kind(&client, name).await?;
    eprintln!("{name}: children {children:?}");
    // One Job per stage (and student), attempt 0: no duplicates, no extra attempts.
    let jobs = &children["Job"];
    ensure!(
        jobs.len() == 3 && jobs.iter().all(|j| j.ends_with("-0")),
        "duplicate or extra Jobs after operator restarts: {jobs:?}"
    );
    // One configuration snapshot per stage attempt, kept with its Jobs.
    let mut configs = children["ConfigMap"].clone();
    configs.sort();
    ensure!(
        configs == ["distillation", "rl", "warmup"].map(|s| format!("{name}-config-{s}-0")),
        "{children:?}"
    );
    delete_run(&client, name).await
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s07_with_two_replicas_the_standby_takes_over_and_only_the_leader_writes() -> Result<()> {
    let client = client().await?;
    install_operator(&["--set", "replicaCount=2"])?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let holder = |l: &Lease| {
        l.spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default()
    };
    let first = wait_for("a leader", secs(60), async || {
        Ok(leases
            .get_opt(RELEASE)
            .await?
            .map(|l| holder(&l))
            .filter(|h| !h.is_empty()))
    })
    .await?;
    let duration = leases
        .get(RELEASE)
        .await?
        .spec
        .unwrap()
        .lease_duration_seconds
        .unwrap_or(15);
    eprintln!("leader {first}, lease {duration}s");

    let since = now_rfc3339();
    let name = "e2e-ha";
    delete_run(&client, name).await?;
    let api = rltruns(&client);
    apply_run(&api, &tiny_run(name)?).await?;
    wait_phase(&client, name, "RL", secs(300)).await?;

    delete_operator_pod(&client, &first).await?;
    let killed = std::time::Instant::now();
    let second = wait_for("another leader", secs(duration as u64 * 3), async || {
        let h = leases.get(RELEASE).await.map(|l| holder(&l))?;
        Ok((!h.is_empty() && h != first).then_some(h))
    })
    .await?;
    let took = killed.elapsed();
    eprintln!("{second} took over after {took:?}");
    ensure!(
        took.as_secs() <= duration as u64 + 5,
        "takeover took {took:?}, lease is {duration}s"
    );
    wait_phase(&client, name, "Succeeded", secs(600)).await?;

    if let Some(log) = audit_log() {
        // Each replica authenticates with a token bound to its pod, so the audit log says
        // which replica wrote: the first leader only before the second acquired the Lease,
        // the second only after, nobody else. Lease writes are the election itself.
        let acquired = leases
            .get(RELEASE)
            .await?
            .spec
            .unwrap()
            .acquire_time
            .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
        let acquired = acquired.context("the Lease has no acquireTime")?;
        let writes: Vec<_> = audit_entries(&log, &since)?
            .into_iter()
            .filter(|e| e.user == OPERATOR_USER && is_write(&e.verb) && e.code < 400)
            .filter(|e| !e.uri.contains("/leases/"))
            .collect();
        let mut by_pod: BTreeMap<&str, usize> = BTreeMap::new();
        for w in &writes {
            *by_pod.entry(w.pod.as_str()).or_default() += 1;
            let ok = (w.pod == first && w.at.as_str() <= acquired.as_str())
                || (w.pod == second && w.at.as_str() >= acquired.as_str());
            ensure!(
                ok,
                "a write by {} outside its leadership ({second} acquired the Lease at {acquired}): {w:?}",
                w.pod
            );
        }
        eprintln!("operator writes by replica: {by_pod:?}");
        ensure!(
            by_pod.contains_key(second.as_str()),
            "the new leader never wrote"
        );
    } else {
        eprintln!("no audit log on this provider: single-writer check skipped");
    }
    install_operator(&["--set", "replicaCount=1"])?;
    delete_run(&client, name).await
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s08_suspend_during_rl_removes_the_pods_and_resume_continues_as_a_new_attempt() -> Result<()>
{
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-suspend";
    delete_run(&client, name).await?;
    let api = rltruns(&client);
    let mut run = tiny_run(name)?;
    run.data["spec"]["rl"]["steps"] = json!(200);
    apply_run(&api, &run).await?;
    wait_for("RL past its first checkpoint", secs(300), async || {
        let run = api.get(name).await?;
        let step = run.data["status"]["training"]["step"].as_u64().unwrap_or(0);
        Ok((phase(&run) == "RL" && step >= 5).then_some(()))
    })
    .await?;
    // Mid-run the API server refuses what the run trains with (immutable) and where its pods
    // run (only while suspended), naming the field.
    let edited_template = json!({"labels": {"example.com/edited-while-suspended": "resumed"}});
    for (patch, refusal) in [
        (
            json!({"spec": {"rl": {"steps": 300}}}),
            "spec.rl is immutable",
        ),
        (
            json!({"spec": {"rl": {"learnerPodTemplate": edited_template}}}),
            "may change only while the run is suspended",
        ),
    ] {
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(status)) if status.message.contains(refusal) => {}
            other => bail!("{patch}: expected a refusal saying `{refusal}`, got {other:?}"),
        }
    }
    let patch = json!({"spec": {"suspend": true}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_phase(&client, name, "Suspended", secs(60)).await?;
    wait_for("the RL pods to be gone", secs(120), async || {
        let pods = pods_of(&client, &format!("rlt.dev/run={name},rlt.dev/stage=rl")).await?;
        Ok(pods.is_empty().then_some(()))
    })
    .await?;
    let suspended = api.get(name).await?;
    let attempt_before = suspended.data["status"]["stages"]["rl"]["attempt"]
        .as_u64()
        .unwrap_or(0);
    let step_before = suspended.data["status"]["training"]["step"]
        .as_u64()
        .unwrap_or(0);
    // Resuming and re-shaping the learners' pods in one write: the new attempt has them.
    let patch = json!({"spec": {"suspend": false, "rl": {"learnerPodTemplate": edited_template}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let resumed = wait_for("RL to resume as a new attempt", secs(120), async || {
        let run = api.get(name).await?;
        let a = run.data["status"]["stages"]["rl"]["attempt"]
            .as_u64()
            .unwrap_or(0);
        Ok((phase(&run) == "RL" && a == attempt_before + 1).then_some(run))
    })
    .await?;
    eprintln!(
        "{name}: suspended at step {step_before}, resumed as attempt {}",
        attempt(&resumed)
    );
    let learners = format!(
        "rlt.dev/run={name},rlt.dev/role=learner,rlt.dev/attempt={}",
        attempt_before + 1
    );
    let pods = wait_for("the resumed attempt's learner pods", secs(60), async || {
        let pods = pods_of(&client, &learners).await?;
        Ok((!pods.is_empty()).then_some(pods))
    })
    .await?;
    for pod in pods {
        ensure!(
            pod.labels()
                .get("example.com/edited-while-suspended")
                .map(String::as_str)
                == Some("resumed"),
            "{} lacks the label edited while suspended",
            pod.name_any()
        );
    }
    // Its own configuration snapshot, with the edit; the suspended attempt's is gone.
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace());
    let snapshot = configs
        .get(&format!("{name}-config-rl-{}", attempt_before + 1))
        .await?;
    ensure!(snapshot.immutable == Some(true), "a mutable snapshot");
    let config = &snapshot.data.unwrap_or_default()[rlt_api::contract::CONFIG_FILE];
    ensure!(
        config.contains("example.com/edited-while-suspended"),
        "the snapshot lacks the edit"
    );
    wait_for(
        "the suspended attempt's snapshot to go",
        secs(60),
        async || {
            let old = format!("{name}-config-rl-{attempt_before}");
            Ok(configs.get_opt(&old).await?.is_none().then_some(()))
        },
    )
    .await?;
    // Continuing from the last checkpoint: the first figures of the new attempt are past 0.
    let first_step = wait_for("figures of the resumed attempt", secs(180), async || {
        let run = api.get(name).await?;
        if phase(&run) != "RL" {
            return Ok(Some(u64::MAX));
        }
        Ok(run.data["status"]["training"]["step"]
            .as_u64()
            .filter(|s| *s > 0))
    })
    .await?;
    ensure!(first_step > 0, "resumed from scratch");
    wait_phase(&client, name, "Succeeded", secs(600)).await?;
    delete_run(&client, name).await
}

/// Writes by the operator's user in the audit log since `since` that touch `name`.
fn operator_writes(log: &std::path::Path, since: &str, name: &str) -> Result<Vec<String>> {
    Ok(audit_entries(log, since)?
        .into_iter()
        .filter(|e| e.user == OPERATOR_USER && is_write(&e.verb))
        .filter(|e| e.uri.contains(name))
        .map(|e| format!("{} {} {} {}", e.at, e.verb, e.uri, e.code))
        .collect())
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s09_the_operator_is_quiet_when_nothing_changes() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let api = rltruns(&client);
    // A finished run, and one whose warm-up runs for a long time.
    let done = "e2e-idle-done";
    let waiting = "e2e-idle-wait";
    for n in [done, waiting] {
        delete_run(&client, n).await?;
    }
    // A warm-up of 200 epochs, held to a tenth of a core (a CFS quota) so that the idle minute
    // does not starve the rest of this small machine.
    let mut long = tiny_run(waiting)?;
    long.data["spec"]["warmup"]["epochs"] = json!(200);
    long.data["spec"]["warmup"]["resources"] = json!({"limits": {"cpu": "100m"}});
    apply_run(&api, &tiny_run(done)?).await?;
    apply_run(&api, &long).await?;
    wait_phase(&client, done, "Succeeded", secs(600)).await?;
    wait_phase(&client, waiting, "WarmUp", secs(60)).await?;
    // Let the last status writes and pod churn settle (debounce, Job controller).
    tokio::time::sleep(secs(10)).await;
    let rv = |o: &kube::api::DynamicObject| o.metadata.resource_version.clone();
    let before = [rv(&api.get(done).await?), rv(&api.get(waiting).await?)];
    let since = now_rfc3339();
    tokio::time::sleep(secs(60)).await;
    let after = [rv(&api.get(done).await?), rv(&api.get(waiting).await?)];
    ensure!(
        before == after,
        "a run's resourceVersion changed while idle: {before:?} -> {after:?}"
    );
    match audit_log() {
        Some(log) => {
            for n in [done, waiting] {
                let writes = operator_writes(&log, &since, n)?;
                ensure!(
                    writes.is_empty(),
                    "the operator wrote for idle run {n} in 60 s:\n{}",
                    writes.join("\n")
                );
            }
        }
        None => eprintln!("no audit log on this provider: checked resourceVersions only"),
    }
    for n in [done, waiting] {
        delete_run(&client, n).await?;
    }
    Ok(())
}

fn tempdir(label: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("rlt-e2e-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).context("temp dir")?;
    Ok(dir)
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s10_data_parallel_warmup_and_distillation_span_pods_that_find_each_other() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-dp";
    delete_run(&client, name).await?;
    let mut run = tiny_run(name)?;
    // Two pods each: their ranks meet by DNS name through the run's ranks Service (headless:
    // the cluster DNS answers `<pod hostname>.<service>.<namespace>.svc` with the pod's IP,
    // from the Service's EndpointSlices). The pods have no other way to find each other.
    run.data["spec"]["warmup"]["replicas"] = json!(2);
    run.data["spec"]["distillation"]["replicas"] = json!(2);
    let api = rltruns(&client);
    apply_run(&api, &run).await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace());
    let by_service =
        ListParams::default().labels(&format!("kubernetes.io/service-name={name}-ranks"));
    // (hostname, address) of every endpoint the ranks Service published, as seen while it ran.
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    let done = wait_for("the data-parallel run to succeed", secs(900), async || {
        for slice in slices.list(&by_service).await?.items {
            for e in slice.endpoints {
                if let (Some(host), Some(addr)) = (e.hostname, e.addresses.first()) {
                    published.insert(host, addr.clone());
                }
            }
        }
        let run = api.get(name).await?;
        match phase(&run) {
            "Succeeded" => Ok(Some(run)),
            "Failed" => bail!("{name} failed: {}", run.data["status"]),
            _ => Ok(None),
        }
    })
    .await?;
    eprintln!("{name}: the ranks Service published {published:?}");

    let services: Api<Service> = Api::namespaced(client.clone(), &namespace());
    let ranks = services.get(&format!("{name}-ranks")).await?;
    let spec = ranks.spec.unwrap_or_default();
    ensure!(
        spec.cluster_ip.as_deref() == Some("None"),
        "the ranks Service is not headless: {:?}",
        spec.cluster_ip
    );
    let warmup = pods_of(&client, &format!("rlt.dev/run={name},rlt.dev/stage=warmup")).await?;
    ensure!(warmup.len() == 2, "{} warm-up pods, want 2", warmup.len());
    for p in &warmup {
        let s = p.spec.as_ref().unwrap();
        ensure!(
            s.subdomain.as_deref() == Some(&format!("{name}-ranks")) && s.hostname.is_some(),
            "warm-up pod {:?} has no DNS name under the ranks Service",
            p.metadata.name
        );
        // Rank 0 is found by its DNS name, never an address: the store the ranks met at is
        // where DNS said.
        let master = s.containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "MASTER_ADDR")
            .and_then(|e| e.value.clone())
            .context("no MASTER_ADDR")?;
        ensure!(
            master.ends_with(&format!("-0.{name}-ranks.{}.svc", namespace())),
            "MASTER_ADDR is not rank 0's DNS name: {master}"
        );
        // Each rank's pod was published under its hostname with the address it ran at.
        let host = s.hostname.clone().unwrap();
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
        ensure!(
            ip.is_some() && published.get(&host) == ip.as_ref(),
            "rank {host} (pod IP {ip:?}) was not published by the ranks Service: {published:?}"
        );
    }
    // Every rank's share of the optimizer state went into the checkpoints; both stages ended.
    let missing = missing_in_workspace(
        &client,
        &done,
        &[
            "warmup/final/model.safetensors",
            "distill/student/final/model.safetensors",
        ],
    )
    .await?;
    ensure!(missing.is_empty(), "artifacts missing: {missing:?}");
    api.delete(name, &DeleteParams::background()).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s11_a_parameter_server_not_yet_serving_fails_its_readiness_probe() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-probe";
    delete_run(&client, name).await?;
    // Straight to RL, with parameter servers held to 2% of a core: loading libtorch and the
    // teacher takes them many probe periods, during which the kubelet's TCP probe of their
    // `rpc` port is refused and the pod stays NotReady.
    let mut run = tiny_run(name)?;
    run.data["spec"]["warmup"] = json!({"enabled": false});
    run.data["spec"]["rl"]["paramServerResources"] = json!({"limits": {"cpu": "20m"}});
    let api = rltruns(&client);
    apply_run(&api, &run).await?;
    wait_phase(&client, name, "RL", secs(120)).await?;
    let selector = format!("rlt.dev/run={name},rlt.dev/role=param-server");
    let (pod, event) = wait_for("a failed readiness probe", secs(180), async || {
        for p in pods_of(&client, &selector).await? {
            let pod = p.metadata.name.clone().unwrap_or_default();
            if let Some(e) = events_about(&client, &pod)
                .await?
                .into_iter()
                .map(|e| event_text(&e))
                .find(|e| e.contains("Readiness probe failed"))
            {
                return Ok(Some((p, e)));
            }
        }
        Ok(None)
    })
    .await?;
    eprintln!("{name}: {:?}: {event}", pod.metadata.name);
    ensure!(
        event.starts_with("Warning Unhealthy"),
        "not the kubelet's probe Event: {event}"
    );
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    ensure!(
        ready.as_deref() != Some("True"),
        "the parameter server is Ready while its probe fails: {ready:?}"
    );
    delete_run(&client, name).await
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s12_inputs_from_a_claim_and_a_re_created_run_trains_afresh() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-inputs";
    delete_run(&client, name).await?;
    // The models and the dataset come in on a claim populated beforehand (here by the
    // trainer image itself), mounted read-only where the run's paths point.
    let inputs = format!("{name}-data");
    create_claim(&client, &inputs).await?;
    let image = tiny_run(name)?.data["spec"]["image"]
        .as_str()
        .context("the sample's image")?
        .to_string();
    for (pod, args) in [
        ("model", "init-tiny --out /workspace/models/teacher"),
        ("data", "synth --out /workspace/data --count 64"),
    ] {
        let mut command = vec!["rlt-trainer".to_string()];
        command.extend(args.split(' ').map(String::from));
        run_image_on_claim(
            &client,
            &format!("{name}-{pod}"),
            &inputs,
            &image,
            &command,
            &[],
        )
        .await?;
    }
    let mut run = tiny_run(name)?;
    let spec = &mut run.data["spec"];
    spec["inputs"] = json!([{"name": "data", "mountPath": "/inputs",
        "persistentVolumeClaim": {"claimName": inputs, "readOnly": true}}]);
    spec["teacher"] = json!({"path": "/inputs/models/teacher"});
    spec["dataset"] = json!({"path": "/inputs/data/train.jsonl", "format": "custom"});
    spec["rl"]["student"] = json!({"path": "/inputs/models/teacher"});
    // A model brought on a path gets the full-length system prompts unless the run names its
    // own; this one is the tiny byte-level model, whose context fits only the one-line ones.
    use rlt_api::spec::defaults;
    spec["prompts"] = json!({"teacher": defaults::tiny_teacher_system(),
        "student": defaults::tiny_student_system()});
    spec["distillation"] = json!({"enabled": false});
    spec["rl"]["steps"] = json!(8);
    // A platform team's additions: the run's own label and a pod template reach the pods,
    // which the kubelet runs under the named RuntimeClass.
    let runtime_class = "e2e-runc";
    let classes: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(client.clone());
    let class = json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": runtime_class}, "handler": "runc"});
    classes
        .patch(
            runtime_class,
            &PatchParams::apply("rlt-e2e").force(),
            &Patch::Apply(class),
        )
        .await?;
    run.metadata.labels = Some(BTreeMap::from([("team".into(), "ml".into())]));
    spec["podTemplate"] = json!({"labels": {"cost-centre": "42"},
        "annotations": {"sidecar.istio.io/inject": "false"},
        "runtimeClassName": runtime_class});
    let api = rltruns(&client);
    apply_run(&api, &run).await?;
    let first = wait_phase(&client, name, "Succeeded", secs(600)).await?;
    let warmup = pods_of(&client, &format!("rlt.dev/run={name},rlt.dev/stage=warmup")).await?;
    ensure!(!warmup.is_empty(), "no warm-up pod left to look at");
    for pod in &warmup {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().context("pod spec")?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        ensure!(
            labels.get("team").map(String::as_str) == Some("ml")
                && labels.get("cost-centre").map(String::as_str) == Some("42")
                && annotations
                    .get("sidecar.istio.io/inject")
                    .map(String::as_str)
                    == Some("false")
                && spec.runtime_class_name.as_deref() == Some(runtime_class)
                && phase == Some("Succeeded"),
            "the warm-up pod lacks the run's additions or did not succeed under them: \
             {labels:?} {annotations:?} {:?} {phase:?}",
            spec.runtime_class_name
        );
    }
    let missing = missing_in_workspace(
        &client,
        &first,
        &[
            "warmup/final/model.safetensors",
            "rl/final/model.safetensors",
        ],
    )
    .await?;
    ensure!(missing.is_empty(), "artifacts missing: {missing:?}");

    // Deleted and created again under the same name (the usual edit-and-rerun): the retained
    // workspace is used again, in a directory of the new run's own, and it trains afresh
    // instead of finding the first run's final models.
    delete_run(&client, name).await?;
    // This time its children go 5 s after it finished (the claim stays, retained).
    run.data["spec"]["ttlSecondsAfterFinished"] = json!(5);
    apply_run(&api, &run).await?;
    let second = wait_phase(&client, name, "Succeeded", secs(600)).await?;
    wait_for(
        "the children collected after the TTL",
        secs(120),
        async || {
            let jobs = jobs_of(&client, name).await?;
            // The attempts' configuration snapshots too.
            let configs: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace());
            let configs = configs.list(&run_selector(name)).await?.items;
            Ok((jobs.is_empty() && configs.is_empty()).then_some(()))
        },
    )
    .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace());
    ensure!(
        claims.get_opt(&workspace_claim(&second)).await?.is_some(),
        "the TTL took the retained workspace claim"
    );
    ensure!(phase(&api.get(name).await?) == "Succeeded");
    let (a, b) = (run_directory(&first), run_directory(&second));
    ensure!(a != b, "the re-created run reused {a}");
    ensure!(
        workspace_claim(&first) == workspace_claim(&second),
        "the re-created run did not take the retained claim"
    );
    let started = |r: &Value| r["status"]["stages"]["warmup"]["startTime"].clone();
    ensure!(started(&second.data) != started(&first.data));
    let missing =
        missing_in_workspace(&client, &second, &["warmup/final/trainer_state.json"]).await?;
    ensure!(
        missing.is_empty(),
        "the second run has no warm-up of its own: {missing:?}"
    );
    // ... and the first run's outputs are still there beside it.
    let missing = missing_in_workspace(&client, &first, &["rl/final/model.safetensors"]).await?;
    ensure!(
        missing.is_empty(),
        "the first run's models went: {missing:?}"
    );
    delete_run(&client, name).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace());
    for claim in [workspace_claim(&first), inputs] {
        claims.delete(&claim, &DeleteParams::default()).await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s13_gpu_hours_are_the_pods_gpus_times_their_running_time() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-gpu-hours";
    delete_run(&client, name).await?;
    // The node advertises two GPUs as an extended resource (as a device plugin would), so the
    // warm-up pod is admitted holding one; the trainer computes on the CPU (`device: cpu`).
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.list(&ListParams::default()).await?.items[0].name_any();
    let gpus = |n: Option<&str>| json!({"status": {"capacity": {"nvidia.com/gpu": n}, "allocatable": {"nvidia.com/gpu": n}}});
    nodes
        .patch_status(
            &node,
            &PatchParams::default(),
            &Patch::Merge(&gpus(Some("2"))),
        )
        .await?;
    let mut run = tiny_run(name)?;
    run.data["spec"]["device"] = json!("cpu");
    run.data["spec"]["warmup"]["resources"] = json!({"limits": {"nvidia.com/gpu": "1"}});
    run.data["spec"]["rl"]["steps"] = json!(2);
    run.data["spec"]["distillation"]["enabled"] = json!(false);
    let api = rltruns(&client);
    apply_run(&api, &run).await?;
    let done = wait_phase(&client, name, "Succeeded", secs(600)).await;
    nodes
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&gpus(None)))
        .await?;
    let done = done?;
    // What the warm-up pod held: one GPU from its start to its container's end.
    let pods = pods_of(&client, &format!("rlt.dev/run={name},rlt.dev/stage=warmup")).await?;
    ensure!(pods.len() == 1, "{} warm-up pods", pods.len());
    let status = pods[0].status.clone().unwrap_or_default();
    let started = status.start_time.context("no startTime")?.0;
    let finished = status.container_statuses.unwrap_or_default()[0]
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.finished_at.clone())
        .context("no finishedAt")?
        .0;
    let held = finished.duration_since(started).as_secs_f64() / 3600.0;
    let expected = (held * 1000.0).round() / 1000.0;
    let stages = &done.data["status"]["stages"];
    eprintln!(
        "{name}: the warm-up pod held 1 GPU for {:.0} s; status: {}",
        held * 3600.0,
        done.data["status"]["gpuHours"]
    );
    ensure!(
        stages["warmup"]["gpuHours"].as_f64() == Some(expected) && expected > 0.0,
        "warm-up gpuHours {} != {expected}",
        stages["warmup"]["gpuHours"]
    );
    ensure!(
        stages["rl"]["gpuHours"].as_f64() == Some(0.0),
        "RL's CPU pods cost GPU-hours: {}",
        stages["rl"]["gpuHours"]
    );
    ensure!(done.data["status"]["gpuHours"].as_f64() == Some(expected));
    // `kubectl get rltruns -o wide` shows it.
    let wide = tool(
        "kubectl",
        &["get", "rltruns", name, "-n", &namespace(), "-o", "wide"],
    )?;
    eprintln!("{wide}");
    ensure!(
        wide.contains("GPU-HOURS") && wide.contains(&expected.to_string()),
        "kubectl get rltruns -o wide lacks the GPU-hours:\n{wide}"
    );
    delete_run(&client, name).await
}

/// Kueue's objects for the queueing scenarios (e2e/kueue/kueue.sh runs Kueue itself): a
/// flavor placing pods on this node by its hostname label, a ClusterQueue with one GPU of
/// quota (preempting lower priorities), the LocalQueue `team`, a high priority class. The
/// node advertises GPUs as an extended resource (as in s13).
async fn gpu_queue(client: &Client) -> Result<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.list(&ListParams::default()).await?.items[0].name_any();
    let gpus = json!({"status": {"capacity": {"nvidia.com/gpu": "2"}, "allocatable": {"nvidia.com/gpu": "2"}}});
    nodes
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&gpus))
        .await?;
    let ns = namespace();
    let objects = format!(
        r#"
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: e2e-node}}
spec:
  nodeLabels: {{kubernetes.io/hostname: {node}}}
  tolerations: [{{key: example.com/gpu-pool, operator: Exists, effect: NoSchedule}}]
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {{name: e2e-one-gpu}}
spec:
  namespaceSelector: {{}}
  preemption: {{withinClusterQueue: LowerPriority}}
  resourceGroups:
  - coveredResources: ["cpu", "memory", "nvidia.com/gpu"]
    flavors:
    - name: e2e-node
      resources:
      - {{name: cpu, nominalQuota: "64"}}
      - {{name: memory, nominalQuota: 256Gi}}
      - {{name: nvidia.com/gpu, nominalQuota: "1"}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {{name: team, namespace: {ns}}}
spec: {{clusterQueue: e2e-one-gpu}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata: {{name: e2e-high}}
value: 1000
"#
    );
    let path = std::env::temp_dir().join("rlt-e2e-kueue.yaml");
    std::fs::write(&path, objects)?;
    tool("kubectl", &["apply", "-f", path.to_str().unwrap()])?;
    Ok(node)
}

/// A run of RL only whose learner holds one GPU, queued in LocalQueue `team` when `queued`.
fn one_gpu_rl(name: &str, steps: u32, queued: bool) -> Result<DynamicObject> {
    let mut run = tiny_run(name)?;
    if queued {
        run.metadata.labels = Some(BTreeMap::from([(
            "kueue.x-k8s.io/queue-name".to_string(),
            "team".to_string(),
        )]));
    }
    run.data["spec"]["device"] = json!("cpu");
    run.data["spec"]["warmup"]["enabled"] = json!(false);
    run.data["spec"]["distillation"]["enabled"] = json!(false);
    run.data["spec"]["rl"]["steps"] = json!(steps);
    run.data["spec"]["rl"]["learnerResources"] = json!({"limits": {"nvidia.com/gpu": "1"}});
    Ok(run)
}

fn workloads(client: &Client) -> Api<DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", "Workload");
    Api::namespaced_with(
        client.clone(),
        &namespace(),
        &kube::api::ApiResource::from_gvk(&gvk),
    )
}

fn stage_counter(run: &DynamicObject, field: &str) -> u64 {
    run.data["status"]["stages"]["rl"][field]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
#[ignore = "needs a cluster with Kueue (scripts/dev e2e)"]
async fn s14_kueue_admits_whole_stages_and_queues_the_rest_without_creating_pods() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let node = gpu_queue(&client).await?;
    let (a, b, d) = ("e2e-queue-a", "e2e-queue-b", "e2e-queue-default");
    for n in [a, b, d] {
        delete_run(&client, n).await?;
    }
    let api = rltruns(&client);
    apply_run(&api, &one_gpu_rl(a, 4, true)?).await?;
    wait_phase(&client, a, "RL", secs(180)).await?;
    // A is admitted whole: one Workload, its parameter servers and learners as two pod sets.
    let wl = workloads(&client).get(&format!("{a}-rl")).await?;
    let sets: Vec<(String, u64)> = wl.data["spec"]["podSets"]
        .as_array()
        .context("podSets")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_string(),
                p["count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    ensure!(
        sets == [
            ("param-servers".to_string(), 1),
            ("learners".to_string(), 1)
        ],
        "{sets:?}"
    );
    // B fits alone, not beside A: Queued, and nothing of it exists but its Workload.
    apply_run(&api, &one_gpu_rl(b, 4, true)?).await?;
    wait_phase(&client, b, "Queued", secs(60)).await?;
    // Why, in Kueue's words, once it has looked at the Workload.
    let why = wait_for("Kueue's reason in the condition", secs(60), async || {
        let run = api.get(b).await?;
        let c = condition(&run, "RLComplete").cloned().unwrap_or_default();
        let quota = c["message"].as_str().unwrap_or("").contains("quota");
        Ok((phase(&run) == "Queued" && c["reason"] == "Queued" && quota).then_some(c))
    })
    .await?;
    eprintln!("{b}: {}", why["message"]);
    ensure!(
        jobs_of(&client, b).await?.is_empty(),
        "a queued run has Jobs"
    );
    ensure!(pods_of(&client, &format!("rlt.dev/run={b}"))
        .await?
        .is_empty());
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace());
    ensure!(sets.list(&run_selector(b)).await?.items.is_empty());
    let table = tool("kubectl", &["get", "rltruns", "-n", &namespace()])?;
    eprintln!("{table}");
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with(b) && l.contains("Queued")),
        "{table}"
    );
    // A's pods run where the flavor puts them, with its toleration.
    let learners = pods_of(&client, &format!("rlt.dev/run={a},rlt.dev/role=learner")).await?;
    let spec = learners
        .first()
        .and_then(|p| p.spec.clone())
        .context("no learner pod")?;
    ensure!(
        spec.node_selector
            .unwrap_or_default()
            .get("kubernetes.io/hostname")
            == Some(&node)
    );
    ensure!(spec
        .tolerations
        .unwrap_or_default()
        .iter()
        .any(|t| t.key.as_deref() == Some("example.com/gpu-pool")));
    // A finishes and frees the GPU: B is admitted and runs to the end.
    wait_phase(&client, a, "Succeeded", secs(300)).await?;
    let finished = workloads(&client).get(&format!("{a}-rl")).await?;
    ensure!(
        finished.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Finished" && c["status"] == "True"),
        "A's Workload is not Finished: {}",
        finished.data["status"]
    );
    wait_phase(&client, b, "Succeeded", secs(300)).await?;

    // A namespace with a LocalQueue named `default`: a run naming no queue is queued in it as
    // one unit, and Kueue does not capture its Jobs one by one.
    let default_queue = format!(
        "apiVersion: kueue.x-k8s.io/v1beta2\nkind: LocalQueue\nmetadata: {{name: default, namespace: {}}}\nspec: {{clusterQueue: e2e-one-gpu}}\n",
        namespace()
    );
    let path = std::env::temp_dir().join("rlt-e2e-default-queue.yaml");
    std::fs::write(&path, default_queue)?;
    tool("kubectl", &["apply", "-f", path.to_str().unwrap()])?;
    // The operator's cache sees the queue before the run.
    tokio::time::sleep(secs(2)).await;
    apply_run(&api, &one_gpu_rl(d, 4, false)?).await?;
    wait_phase(&client, d, "RL", secs(180)).await?;
    let wl = workloads(&client).get(&format!("{d}-rl")).await?;
    ensure!(
        wl.data["spec"]["queueName"] == "default",
        "{}",
        wl.data["spec"]
    );
    for job in jobs_of(&client, d).await? {
        ensure!(
            !job.labels().contains_key("kueue.x-k8s.io/queue-name"),
            "Kueue labelled {}",
            job.name_any()
        );
        ensure!(
            job.spec.as_ref().and_then(|s| s.suspend) != Some(true),
            "Kueue suspended {}",
            job.name_any()
        );
    }
    wait_phase(&client, d, "Succeeded", secs(300)).await?;
    tool("kubectl", &["delete", "-f", path.to_str().unwrap()])?;
    for n in [a, b, d] {
        delete_run(&client, n).await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster with Kueue (scripts/dev e2e)"]
async fn s15_a_preempted_run_resumes_from_its_checkpoint_without_counting_a_failure() -> Result<()>
{
    let client = client().await?;
    install_operator(&[])?;
    gpu_queue(&client).await?;
    let (low, high) = ("e2e-preempted", "e2e-preemptor");
    for n in [low, high] {
        delete_run(&client, n).await?;
    }
    let api = rltruns(&client);
    // Far more steps than the scenario waits for: it is preempted mid-stage (tiny steps take
    // a fifth of a second).
    apply_run(&api, &one_gpu_rl(low, 5000, true)?).await?;
    wait_for(
        "the low-priority run past its first checkpoint",
        secs(300),
        async || {
            let run = api.get(low).await?;
            let step = run.data["status"]["training"]["step"].as_u64().unwrap_or(0);
            Ok((phase(&run) == "RL" && step >= 5).then_some(step))
        },
    )
    .await?;
    let mut urgent = one_gpu_rl(high, 4, true)?;
    urgent
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("kueue.x-k8s.io/priority-class".into(), "e2e-high".into());
    apply_run(&api, &urgent).await?;
    // Kueue preempts the low run: its pods stop, it waits Queued, no failure counted.
    let evicted = wait_for("the low-priority run evicted", secs(120), async || {
        let run = api.get(low).await?;
        Ok((phase(&run) == "Queued" && stage_counter(&run, "evictions") == 1).then_some(run))
    })
    .await?;
    ensure!(
        stage_counter(&evicted, "failures") == 0,
        "{}",
        evicted.data["status"]
    );
    let step_evicted = evicted.data["status"]["training"]["step"]
        .as_u64()
        .unwrap_or(0);
    let events = events_about(&client, low).await?;
    ensure!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Evicted")),
        "no Evicted Event"
    );
    wait_phase(&client, high, "Succeeded", secs(300)).await?;
    // Admitted again: a new attempt that continues from the last checkpoint (the first
    // figures it reports are past the checkpoint at step 4, not a restart from step 1).
    let resumed = wait_for("figures of the resumed attempt", secs(240), async || {
        let run = api.get(low).await?;
        let step = run.data["status"]["training"]["step"].as_u64().unwrap_or(0);
        let moved = phase(&run) == "RL" && attempt(&run) == 1 && step != step_evicted;
        Ok(moved.then_some(run))
    })
    .await?;
    let first = resumed.data["status"]["training"]["step"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "{low}: evicted at step {step_evicted}, resumed as attempt 1 at step {first}; failures {}",
        stage_counter(&resumed, "failures")
    );
    ensure!(first >= 4, "resumed from scratch (step {first})");
    // Its parameter server says so: it loaded the checkpoint the preempted attempt wrote.
    let logs = tool(
        "kubectl",
        &["logs", "-n", &namespace(), &format!("{low}-ps-1-0")],
    )?;
    let resumed_line = logs
        .lines()
        .find(|l| l.contains("resumed shard from checkpoint"))
        .with_context(|| format!("attempt 1's parameter server did not resume:\n{logs}"))?;
    eprintln!("{low}: {resumed_line}");
    ensure!(stage_counter(&resumed, "failures") == 0);
    for n in [low, high] {
        delete_run(&client, n).await?;
    }
    Ok(())
}

/// Sets the GPUs the node advertises (an extended resource, as in s13); None removes them.
async fn node_gpus(client: &Client, n: Option<&str>) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.list(&ListParams::default()).await?.items[0].name_any();
    let gpus = json!({"status": {"capacity": {"nvidia.com/gpu": n}, "allocatable": {"nvidia.com/gpu": n}}});
    nodes
        .patch_status(&node, &PatchParams::default(), &Patch::Merge(&gpus))
        .await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e)"]
async fn s16_a_scheduling_timeout_frees_the_gpus_a_partial_attempt_holds() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-partial";
    delete_run(&client, name).await?;
    // One GPU on the node; a warm-up of two ranks asking for one each: one rank runs and
    // holds the GPU, the other cannot be scheduled.
    node_gpus(&client, Some("1")).await?;
    let mut run = tiny_run(name)?;
    run.data["spec"]["device"] = json!("cpu");
    run.data["spec"]["warmup"]["replicas"] = json!(2);
    run.data["spec"]["warmup"]["resources"] = json!({"limits": {"nvidia.com/gpu": "1"}});
    run.data["spec"]["distillation"]["enabled"] = json!(false);
    run.data["spec"]["failurePolicy"] = json!({"retries": 0, "schedulingTimeoutSeconds": 20});
    let api = rltruns(&client);
    apply_run(&api, &run).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let of_run = ListParams::default().labels(&format!("rlt.dev/run={name}"));
    // An attempt with one rank running (holding the GPU) and the other unschedulable (an
    // earlier attempt may have found the GPU still taken by another scenario's pod).
    let (partial, timeouts_before) = wait_for(
        "one rank running, the other unschedulable",
        secs(180),
        async || {
            let list = pods.list(&of_run).await?.items;
            let mut by_attempt: BTreeMap<String, (usize, usize)> = BTreeMap::new();
            for p in list
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                let attempt = p
                    .labels()
                    .get("rlt.dev/attempt")
                    .cloned()
                    .unwrap_or_default();
                let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                let e = by_attempt.entry(attempt).or_default();
                e.0 += 1;
                e.1 += usize::from(running);
            }
            let Some((attempt, _)) = by_attempt.into_iter().find(|(_, n)| *n == (2, 1)) else {
                return Ok(None);
            };
            let run = api.get(name).await?;
            let n = run.data["status"]["stages"]["warmup"]["schedulingTimeouts"]
                .as_u64()
                .unwrap_or(0);
            Ok(Some((attempt, n)))
        },
    )
    .await?;
    // Past the timeout the attempt is torn down, not failed.
    let timed_out = wait_for("the scheduling timeout", secs(90), async || {
        let run = api.get(name).await?;
        let n = run.data["status"]["stages"]["warmup"]["schedulingTimeouts"]
            .as_u64()
            .unwrap_or(0);
        Ok((n > timeouts_before).then_some(run))
    })
    .await?;
    let cond = condition(&timed_out, "WarmupComplete")
        .cloned()
        .unwrap_or_default();
    eprintln!("{name}: attempt {partial}: {}", cond["message"]);
    ensure!(cond["reason"] == "SchedulingTimeout", "{cond}");
    ensure!(
        phase(&timed_out) != "Failed",
        "a scheduling timeout failed the run"
    );
    ensure!(
        timed_out.data["status"]["stages"]["warmup"]["failures"]
            .as_u64()
            .unwrap_or(0)
            == 0
    );
    let selector = format!("rlt.dev/run={name},rlt.dev/attempt={partial}");
    wait_for("the partial attempt's pods gone", secs(60), async || {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        Ok(list.is_empty().then_some(()))
    })
    .await?;
    // The GPU it held is free for others meanwhile: a pod asking for it runs.
    let probe = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "e2e-gpu-probe", "namespace": namespace()},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "probe", "image": shell_image(), "command": ["sleep", "1"],
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}});
    let probe: Pod = serde_json::from_value(probe)?;
    let _ = pods
        .delete("e2e-gpu-probe", &DeleteParams::default().grace_period(0))
        .await;
    wait_for("the old probe gone", secs(30), async || {
        Ok(pods.get_opt("e2e-gpu-probe").await?.is_none().then_some(()))
    })
    .await?;
    pods.create(&Default::default(), &probe).await?;
    wait_for(
        "the probe scheduled on the freed GPU",
        secs(60),
        async || {
            let p = pods.get("e2e-gpu-probe").await?;
            let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            Ok(bound.then_some(()))
        },
    )
    .await?;
    pods.delete("e2e-gpu-probe", &DeleteParams::default().grace_period(0))
        .await?;
    delete_run(&client, name).await?;
    node_gpus(&client, None).await
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e)"]
async fn s17_a_stalled_rl_step_fails_the_attempt_and_the_next_one_resumes() -> Result<()> {
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-stalled";
    delete_run(&client, name).await?;
    let mut run = tiny_run(name)?;
    run.data["spec"]["warmup"]["enabled"] = json!(false);
    run.data["spec"]["distillation"]["enabled"] = json!(false);
    run.data["spec"]["rl"]["steps"] = json!(200);
    run.data["spec"]["rl"]["progressDeadlineSeconds"] = json!(40);
    let api = rltruns(&client);
    apply_run(&api, &run).await?;
    wait_for("RL past its first checkpoint", secs(300), async || {
        let run = api.get(name).await?;
        let step = run.data["status"]["training"]["step"].as_u64().unwrap_or(0);
        Ok((phase(&run) == "RL" && step >= 5).then_some(()))
    })
    .await?;
    // A hung learner: its process stopped (SIGSTOP), the pod still Running.
    let learners = pods_of(&client, &format!("rlt.dev/run={name},rlt.dev/role=learner")).await?;
    let uid = learners
        .first()
        .and_then(|p| p.metadata.uid.clone())
        .context("no learner pod")?;
    let Some(pid) = node_process(&uid, "rlt-trainer") else {
        eprintln!("{name}: the node's processes are not visible here; nothing to stop");
        return delete_run(&client, name).await;
    };
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()?;
    ensure!(stopped.success(), "kill -STOP {pid} failed");
    let stalled = wait_for("the stall noticed", secs(120), async || {
        let run = api.get(name).await?;
        let c = condition(&run, "RLComplete").cloned().unwrap_or_default();
        Ok((c["reason"] == "Stalled").then_some((run, c)))
    })
    .await?;
    eprintln!("{name}: {}", stalled.1["message"]);
    ensure!(stalled.1["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("Stalled: no RL step for"));
    ensure!(stage_counter(&stalled.0, "failures") == 1);
    // The next attempt gets fresh pods and moves on from the last checkpoint.
    let step_stalled = stalled.0.data["status"]["training"]["step"]
        .as_u64()
        .unwrap_or(0);
    let resumed = wait_for("the next attempt's steps", secs(240), async || {
        let run = api.get(name).await?;
        let step = run.data["status"]["training"]["step"].as_u64().unwrap_or(0);
        Ok((phase(&run) == "RL" && attempt(&run) == 1 && step > step_stalled).then_some(step))
    })
    .await?;
    eprintln!("{name}: stalled at step {step_stalled}, attempt 1 reached step {resumed}");
    delete_run(&client, name).await
}

#[tokio::test]
#[ignore = "needs a cluster (scripts/dev e2e or e2e/kind.sh)"]
async fn s18_one_failing_student_is_retried_alone_and_leaves_the_others_running() -> Result<()> {
    use k8s_openapi::api::batch::v1::Job;
    let client = client().await?;
    install_operator(&[])?;
    let name = "e2e-students";
    delete_run(&client, name).await?;
    let mut run = tiny_run(name)?;
    // Two students long enough to overlap, after a short RL stage.
    run.data["spec"]["warmup"]["enabled"] = json!(false);
    run.data["spec"]["distillation"]["epochs"] = json!(12);
    run.data["spec"]["distillation"]["students"] = json!([
        {"name": "steady", "model": {"tiny": {"seed": 2}}},
        {"name": "crashy", "model": {"tiny": {"seed": 3}}},
    ]);
    let api = rltruns(&client);
    apply_run(&api, &run).await?;
    let running = async |student: &str| -> Result<Option<Pod>> {
        let selector = format!("rlt.dev/run={name},rlt.dev/student={student}");
        let pods = pods_of(&client, &selector).await?;
        Ok(pods
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    };
    let (steady, crashy) = wait_for("both students training", secs(300), async || {
        Ok(match (running("steady").await?, running("crashy").await?) {
            (Some(s), Some(c)) => Some((s, c)),
            _ => None,
        })
    })
    .await?;
    let steady_uid = steady.metadata.uid.clone().context("pod without uid")?;
    // crashy's trainer dies (SIGKILL: the kernel's OOM killer, a segfault): its Job fails.
    let crashy_uid = crashy.metadata.uid.clone().context("pod without uid")?;
    let Some(pid) = node_process(&crashy_uid, "rlt-trainer") else {
        eprintln!("{name}: the node's processes are not visible here; nothing to kill");
        return delete_run(&client, name).await;
    };
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    ensure!(killed.success(), "kill -KILL {pid} failed");
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace());
    let retried = wait_for("crashy retried alone", secs(120), async || {
        let run = api.get(name).await?;
        let retry = jobs.get_opt(&format!("{name}-distill-crashy-1")).await?;
        Ok(retry.map(|_| run))
    })
    .await?;
    let c = condition(&retried, "DistillationComplete")
        .cloned()
        .unwrap_or_default();
    eprintln!("{name}: {}", c["message"]);
    let st = &retried.data["status"]["stages"]["distillation"];
    ensure!(
        st["failures"] == 1 && st["attempt"] == 0,
        "the stage's attempt and failures: {st}"
    );
    ensure!(
        st["students"] == json!({"crashy": {"attempt": 1, "failures": 1}}),
        "the students' own attempts: {}",
        st["students"]
    );
    // steady ran on, in the same pod, through crashy's failure and retry.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let now = pods.get(steady.metadata.name.as_deref().unwrap()).await?;
    let phase_now = now.status.as_ref().and_then(|s| s.phase.clone());
    ensure!(
        now.metadata.uid.as_deref() == Some(steady_uid.as_str())
            && now.metadata.deletion_timestamp.is_none()
            && phase_now.as_deref() == Some("Running"),
        "steady's pod was not left running: phase {phase_now:?}, deleting {:?}",
        now.metadata.deletion_timestamp
    );
    let done = wait_phase(&client, name, "Succeeded", secs(600)).await?;
    // Each student finished on its own attempt: steady on its first, crashy on its second.
    let complete = |job: Option<Job>| {
        job.and_then(|j| j.status?.conditions).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
        })
    };
    ensure!(complete(
        jobs.get_opt(&format!("{name}-distill-steady-0")).await?
    ));
    ensure!(complete(
        jobs.get_opt(&format!("{name}-distill-crashy-1")).await?
    ));
    ensure!(jobs
        .get_opt(&format!("{name}-distill-steady-1"))
        .await?
        .is_none());
    let missing = missing_in_workspace(
        &client,
        &done,
        &[
            "distill/steady/final/model.safetensors",
            "distill/crashy/final/model.safetensors",
        ],
    )
    .await?;
    ensure!(missing.is_empty(), "artifacts missing: {missing:?}");
    delete_run(&client, name).await
}
