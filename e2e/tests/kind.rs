//! The tiny RltRun on a real cluster: phases in order, artifacts in the workspace, a learner
//! pod deleted mid-RL does not fail the run, an invalid run is rejected naming the field.
//!
//! Run by `e2e/kind.sh` (or by hand against any cluster with the operator installed):
//! `cargo test -p rlt-e2e --release -- --ignored --test-threads=1`.
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::Value;

const TINY_RUN: &str = include_str!("../../manifests/tiny-cpu.yaml");
const PHASES: [&str; 5] = ["Pending", "WarmUp", "RL", "Distillation", "Succeeded"];

fn namespace() -> String {
    std::env::var("RLT_E2E_NAMESPACE").unwrap_or_else(|_| "default".into())
}

fn timeout() -> Duration {
    let secs = std::env::var("RLT_E2E_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    Duration::from_secs(secs.unwrap_or(1800))
}

fn rltruns(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("rlt.dev", "v1alpha1", "RltRun");
    Api::namespaced_with(client.clone(), &namespace(), &ApiResource::from_gvk(&gvk))
}

fn tiny_run(name: &str) -> Result<DynamicObject> {
    let mut obj: DynamicObject =
        serde_yaml::from_str(TINY_RUN).context("manifests/tiny-cpu.yaml")?;
    obj.metadata.name = Some(name.to_string());
    obj.metadata.namespace = Some(namespace());
    // The kind script loads the locally built CPU trainer image under this name.
    if let Ok(image) = std::env::var("RLT_E2E_TRAINER_IMAGE") {
        obj.data["spec"]["image"] = Value::String(image);
        obj.data["spec"]["imagePullPolicy"] = Value::String("IfNotPresent".into());
    }
    Ok(obj)
}

fn phase(obj: &DynamicObject) -> String {
    obj.data["status"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

async fn create_fresh(api: &Api<DynamicObject>, obj: &DynamicObject) -> Result<()> {
    let name = obj.metadata.name.clone().unwrap();
    let _ = api.delete(&name, &DeleteParams::foreground()).await;
    let started = Instant::now();
    while api.get_opt(&name).await?.is_some() {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("old run {name} was not deleted in 2 minutes");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    api.create(&PostParams::default(), obj).await?;
    Ok(())
}

/// Polls the run until it is terminal, calling `each` on every observation; returns the
/// distinct phases in the order they were seen.
async fn watch_phases(
    api: &Api<DynamicObject>,
    name: &str,
    mut each: impl AsyncFnMut(&DynamicObject) -> Result<()>,
) -> Result<Vec<String>> {
    let started = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let run = api.get(name).await?;
        let p = phase(&run);
        if !p.is_empty() && seen.last() != Some(&p) {
            eprintln!("[{:>5}s] {name}: {p}", started.elapsed().as_secs());
            seen.push(p.clone());
        }
        each(&run).await?;
        if p == "Succeeded" || p == "Failed" {
            if p == "Failed" {
                bail!(
                    "run {name} failed: {}",
                    serde_json::to_string_pretty(&run.data["status"])?
                );
            }
            return Ok(seen);
        }
        if started.elapsed() > timeout() {
            bail!(
                "run {name} not finished after {:?}; phases seen {seen:?}",
                timeout()
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

fn assert_phase_order(seen: &[String]) {
    let idx: Vec<usize> = seen
        .iter()
        .map(|p| {
            PHASES
                .iter()
                .position(|q| q == p)
                .unwrap_or_else(|| panic!("unexpected phase {p}"))
        })
        .collect();
    assert!(
        idx.windows(2).all(|w| w[0] < w[1]),
        "phases out of order: {seen:?}"
    );
    for needed in ["WarmUp", "RL", "Distillation", "Succeeded"] {
        assert!(
            seen.iter().any(|p| p == needed),
            "phase {needed} never seen: {seen:?}"
        );
    }
}

/// Lists the run's workspace from inside the cluster with a short-lived pod on the same PVC.
async fn workspace_listing(client: &Client, run: &DynamicObject) -> Result<String> {
    let name = run.metadata.name.clone().unwrap();
    let claim = run.data["status"]["workspaceClaim"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            run.data["spec"]["workspace"]["claimName"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{name}-workspace"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let pod_name = format!("{name}-inspect");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "ls", "image": "busybox:1.36",
                "command": ["sh", "-c", format!("find /workspace/{name} -maxdepth 4 | sort")],
                "volumeMounts": [{"name": "ws", "mountPath": "/workspace"}]}],
            "volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": claim}}]
        }
    }))?;
    let _ = pods.delete(&pod_name, &DeleteParams::default()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    pods.create(&PostParams::default(), &pod).await?;
    let started = Instant::now();
    loop {
        let p = pods.get(&pod_name).await?;
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("inspector pod did not finish");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let logs = pods.logs(&pod_name, &LogParams::default()).await?;
    pods.delete(&pod_name, &DeleteParams::default()).await?;
    Ok(logs)
}

#[tokio::test]
#[ignore = "needs a cluster with the operator installed (e2e/kind.sh)"]
async fn tiny_run_succeeds_with_artifacts_despite_a_lost_learner() -> Result<()> {
    let client = Client::try_default().await?;
    let api = rltruns(&client);
    let name = "e2e-tiny";
    let mut run = tiny_run(name)?;
    // Long enough (a few minutes on a kind node) that a learner pod is surely seen running.
    run.data["spec"]["rl"]["steps"] = Value::from(200);
    create_fresh(&api, &run).await?;

    // Mid-RL, delete one learner pod: the Job's retry (within the failure policy) must carry
    // the run to Succeeded anyway.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let mut deleted = false;
    let seen =
        watch_phases(&api, name, async |run: &DynamicObject| {
            if !deleted && phase(run) == "RL" {
                let lp = ListParams::default()
                    .labels(&format!("rlt.dev/run={name},rlt.dev/role=learner"));
                if let Some(pod) =
                    pods.list(&lp).await?.items.into_iter().find(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                {
                    let pod_name = pod.metadata.name.unwrap();
                    eprintln!("deleting learner pod {pod_name} mid-RL");
                    pods.delete(&pod_name, &DeleteParams::default()).await?;
                    deleted = true;
                }
            }
            Ok(())
        })
        .await?;
    assert!(
        deleted,
        "RL ended before a learner pod was seen Running: nothing was deleted"
    );
    assert_phase_order(&seen);

    let run = api.get(name).await?;
    let listing = workspace_listing(&client, &run).await?;
    for artifact in [
        "warmup/final/config.json",
        "warmup/final/tokenizer.json",
        "rl/final/config.json",
        "rl/final/model.safetensors",
    ] {
        assert!(
            listing.contains(&format!("/{name}/{artifact}")),
            "{artifact} missing:\n{listing}"
        );
    }
    assert!(
        listing.contains("/traces.jsonl"),
        "no distillation traces:\n{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.contains("/distill/") && l.ends_with("/final")),
        "no distilled student:\n{listing}"
    );

    // Terminal state is sticky: deleting a finished Job does not bring the stage back.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace());
    let lp = ListParams::default().labels(&format!("rlt.dev/run={name}"));
    for job in jobs.list(&lp).await?.items {
        jobs.delete(&job.metadata.name.unwrap(), &DeleteParams::background())
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(phase(&api.get(name).await?), "Succeeded");
    assert!(
        jobs.list(&lp).await?.items.is_empty(),
        "a finished run recreated its Jobs"
    );
    api.delete(name, &DeleteParams::foreground()).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster with the operator installed (e2e/kind.sh)"]
async fn invalid_run_is_rejected_naming_the_field() -> Result<()> {
    let client = Client::try_default().await?;
    let api = rltruns(&client);
    let mut bad = tiny_run("e2e-invalid")?;
    bad.data["spec"]["rl"]["learningRate"] = serde_json::json!(-1.0);
    let err = api
        .patch(
            "e2e-invalid",
            &PatchParams::apply("rlt-e2e"),
            &Patch::Apply(&bad),
        )
        .await
        .expect_err("an RltRun with a negative learning rate was accepted");
    let msg = err.to_string();
    assert!(
        msg.contains("spec.rl.learningRate"),
        "the rejection does not name the field: {msg}"
    );
    Ok(())
}
