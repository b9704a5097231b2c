//! What every scenario needs: the cluster of the current kubeconfig, the operator installed by
//! its Helm chart, RltRuns as the user writes them, waiting with a deadline, and (on the local
//! control plane) the API server's audit log.
//!
//! Provider knobs, all optional (the local cluster and kind set what they need):
//! - `RLT_E2E_NAMESPACE`: where the runs go (default `rlt-e2e`);
//! - `RLT_E2E_OPERATOR_IMAGE` / `RLT_E2E_TRAINER_IMAGE`: images to use instead of the
//!   chart's and the samples' (kind loads locally built ones);
//! - `RLT_E2E_SHELL_IMAGE`: a busybox-like image for the scenarios' own helper pods (default
//!   `busybox:1.36`; the local cluster builds one from Debian's busybox-static);
//! - `RLT_E2E_AUDIT_LOG`: the API server's audit log (JSON lines); scenarios that count the
//!   operator's writes need it and say so when it is absent.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Client;
use serde_json::{json, Value};

pub const RELEASE: &str = "rlt-operator";
pub const OPERATOR_NAMESPACE: &str = "rlt-system";
/// The user the operator authenticates as: the chart's ServiceAccount.
pub const OPERATOR_USER: &str = "system:serviceaccount:rlt-system:rlt-operator";
pub const TINY_RUN: &str = include_str!("../../../manifests/tiny-cpu.yaml");

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn namespace() -> String {
    std::env::var("RLT_E2E_NAMESPACE").unwrap_or_else(|_| "rlt-e2e".into())
}

/// The image of the scenarios' helper pods (a shell with busybox's tools).
pub fn shell_image() -> String {
    std::env::var("RLT_E2E_SHELL_IMAGE").unwrap_or_else(|_| "busybox:1.36".into())
}

pub async fn client() -> Result<Client> {
    let client = Client::try_default()
        .await
        .context("no cluster: set KUBECONFIG")?;
    let ns: Api<Namespace> = Api::all(client.clone());
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace()}});
    ns.patch(
        &namespace(),
        &PatchParams::apply("rlt-e2e"),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(client)
}

/// Runs a command line tool (helm, kubectl) with the test's KUBECONFIG; fails with its output.
pub fn tool(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .with_context(|| format!("running {program} (is it on PATH?)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}):\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `helm upgrade --install` of the chart in this repository (idempotent), waiting for the
/// operator to be ready. `extra` are further `--set`/`-f` arguments.
pub fn install_operator(extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "upgrade",
        "--install",
        RELEASE,
        "charts/rlt-operator",
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--set",
        "logging.format=text",
        "--set",
        "logging.level=info\\,rlt_operator=debug",
        "--wait",
        "--timeout",
        "3m",
    ];
    let image = std::env::var("RLT_E2E_OPERATOR_IMAGE").ok();
    let (repo, tag);
    if let Some(image) = &image {
        let (r, t) = image
            .rsplit_once(':')
            .context("RLT_E2E_OPERATOR_IMAGE needs a tag")?;
        repo = format!("image.repository={r}");
        tag = format!("image.tag={t}");
        args.extend(["--set", &repo, "--set", &tag]);
    }
    args.extend_from_slice(extra);
    tool("helm", &args).map(|_| ())
}

pub fn rltruns(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("rlt.dev", "v1alpha1", "RltRun");
    Api::namespaced_with(client.clone(), &namespace(), &ApiResource::from_gvk(&gvk))
}

/// An RltRun document (YAML text) as an object in the test namespace, with the provider's
/// trainer image when it has one.
pub fn run_from_yaml(text: &str, name: &str) -> Result<DynamicObject> {
    let mut obj: DynamicObject = serde_yaml::from_str(text).context("RltRun YAML")?;
    obj.metadata.name = Some(name.to_string());
    obj.metadata.namespace = Some(namespace());
    if let Ok(image) = std::env::var("RLT_E2E_TRAINER_IMAGE") {
        obj.data["spec"]["image"] = Value::String(image);
        obj.data["spec"]["imagePullPolicy"] = Value::String("IfNotPresent".into());
    }
    Ok(obj)
}

pub fn tiny_run(name: &str) -> Result<DynamicObject> {
    run_from_yaml(TINY_RUN, name)
}

/// Server-side apply with strict field validation, as `kubectl apply --server-side` does.
pub async fn apply_run(api: &Api<DynamicObject>, run: &DynamicObject) -> Result<DynamicObject> {
    let name = run.metadata.name.clone().context("run without a name")?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply("rlt-e2e").validation_strict(),
            &Patch::Apply(run),
        )
        .await?)
}

/// Deletes a run (if present) and waits until it and its children are gone.
pub async fn delete_run(client: &Client, name: &str) -> Result<()> {
    let api = rltruns(client);
    let _ = api.delete(name, &DeleteParams::foreground()).await;
    wait_for(&format!("run {name} deleted"), secs(120), async || {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Polls `probe` every second until it yields a value; fails naming `what` after `timeout`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let started = Instant::now();
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub fn phase(run: &DynamicObject) -> &str {
    run.data["status"]["phase"].as_str().unwrap_or("")
}

pub fn attempt(run: &DynamicObject) -> u64 {
    run.data["status"]["attempt"].as_u64().unwrap_or(0)
}

pub fn condition<'a>(run: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    run.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

pub fn condition_true(run: &DynamicObject, type_: &str) -> bool {
    condition(run, type_).is_some_and(|c| c["status"] == "True")
}

/// Waits for the run to reach `want` (fails early when it reaches another terminal phase).
pub async fn wait_phase(
    client: &Client,
    name: &str,
    want: &str,
    timeout: Duration,
) -> Result<DynamicObject> {
    let api = rltruns(client);
    wait_for(&format!("run {name} to be {want}"), timeout, async || {
        let run = api.get(name).await?;
        let p = phase(&run);
        if p == want {
            return Ok(Some(run));
        }
        if (p == "Succeeded" || p == "Failed") && p != want {
            bail!(
                "run {name} ended {p} while waiting for {want}: {}",
                serde_json::to_string_pretty(&run.data["status"])?
            );
        }
        Ok(None)
    })
    .await
}

pub fn run_selector(name: &str) -> ListParams {
    ListParams::default().labels(&format!("rlt.dev/run={name}"))
}

pub async fn jobs_of(client: &Client, name: &str) -> Result<Vec<Job>> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace());
    Ok(jobs.list(&run_selector(name)).await?.items)
}

pub async fn pods_of(client: &Client, selector: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    Ok(pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

/// The Events (core/v1 view) about one object, oldest first.
pub async fn events_about(client: &Client, name: &str) -> Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace());
    let mut list = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await?
        .items;
    list.sort_by_key(|e| e.metadata.creation_timestamp.clone());
    Ok(list)
}

pub fn event_text(e: &Event) -> String {
    format!(
        "{} {}: {}",
        e.type_.as_deref().unwrap_or(""),
        e.reason.as_deref().unwrap_or(""),
        e.message.as_deref().unwrap_or("")
    )
}

/// The claim holding a run's workspace: the one the run names, or the one the operator made.
pub fn workspace_claim(run: &DynamicObject) -> String {
    let name = run.metadata.name.clone().unwrap_or_default();
    run.data["status"]["workspaceClaim"]
        .as_str()
        .or_else(|| run.data["spec"]["workspace"]["claimName"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{name}-workspace"))
}

/// A ReadWriteOnce claim of 1Gi in the test namespace (what a user brings with
/// `spec.workspace.claimName`), made with the cluster's default storage.
pub async fn create_claim(client: &Client, name: &str) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace());
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))?;
    claims
        .patch(name, &PatchParams::apply("rlt-e2e"), &Patch::Apply(&claim))
        .await?;
    Ok(())
}

/// Runs `script` (sh) in a short-lived pod of the shell image with `claim` mounted at
/// `/workspace` and `env`, as root; returns what it wrote to `$REPORT` (its termination
/// message: no `kubectl logs` needed, so it works on every provider alike).
pub async fn run_on_claim(
    client: &Client,
    pod_name: &str,
    claim: &str,
    script: &str,
    env: &[(&str, String)],
) -> Result<String> {
    let command = ["sh", "-c", script].map(String::from).to_vec();
    run_image_on_claim(client, pod_name, claim, &shell_image(), &command, env).await
}

/// [`run_on_claim`] with any image and command (e.g. the trainer's, to write a model).
pub async fn run_image_on_claim(
    client: &Client,
    pod_name: &str,
    claim: &str,
    image: &str,
    command: &[String],
    env: &[(&str, String)],
) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace());
    let mut env: Vec<Value> = env
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    env.push(json!({"name": "REPORT", "value": "/dev/termination-log"}));
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{"name": "sh", "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": command,
                "env": env,
                "securityContext": {"runAsUser": 0},
                "volumeMounts": [{"name": "ws", "mountPath": "/workspace"}]}],
            "volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": claim}}]
        }
    }))?;
    let _ = pods
        .delete(pod_name, &DeleteParams::default().grace_period(0))
        .await;
    wait_for("old helper pod gone", secs(60), async || {
        Ok(pods.get_opt(pod_name).await?.is_none().then_some(()))
    })
    .await?;
    pods.create(&Default::default(), &pod).await?;
    let message = wait_for("helper pod to finish", secs(180), async || {
        let p = pods.get(pod_name).await?;
        let status = p.status.unwrap_or_default();
        match status.phase.as_deref() {
            Some("Succeeded") | Some("Failed") => {
                let msg = status
                    .container_statuses
                    .unwrap_or_default()
                    .into_iter()
                    .find_map(|c| c.state?.terminated?.message)
                    .unwrap_or_default();
                Ok(Some(msg))
            }
            _ => Ok(None),
        }
    })
    .await?;
    pods.delete(pod_name, &DeleteParams::default()).await?;
    Ok(message)
}

/// The run's directory in its workspace: `spec.workspace.directory`, else its name and the
/// start of its UID (`rlt_api::layout::run_directory`, which the operator renders).
pub fn run_directory(run: &DynamicObject) -> String {
    let name = run.metadata.name.clone().unwrap_or_default();
    match run.data["spec"]["workspace"]["directory"].as_str() {
        Some(dir) => dir.to_string(),
        None => rlt_api::layout::keyed_directory(&name, run.metadata.uid.as_deref().unwrap_or("")),
    }
}

/// Checks paths under the run's workspace directory from inside the cluster: a short-lived
/// pod on the run's claim reports the paths that do NOT exist.
pub async fn missing_in_workspace(
    client: &Client,
    run: &DynamicObject,
    paths: &[&str],
) -> Result<Vec<String>> {
    let name = run.metadata.name.clone().unwrap();
    let script = r#"cd "$RUN_DIR" || { echo "no run directory $RUN_DIR" >"$REPORT"; exit 0; }
: >"$REPORT"
for p in $CHECK; do [ -e "$p" ] || echo "$p" >>"$REPORT"; done
echo checked >>"$REPORT""#;
    let message = run_on_claim(
        client,
        &format!("{name}-inspect"),
        &workspace_claim(run),
        script,
        &[
            ("RUN_DIR", format!("/workspace/{}", run_directory(run))),
            ("CHECK", paths.join(" ")),
        ],
    )
    .await?;
    let lines: Vec<String> = message.lines().map(str::to_string).collect();
    if lines.last().map(String::as_str) != Some("checked") {
        bail!("the inspector did not check the workspace: {message:?}");
    }
    Ok(lines[..lines.len() - 1].to_vec())
}

/// The process of a pod's container on this machine, found in `/proc` (a node's containers are
/// processes of its host): the one named `comm` in the cgroup of the pod with this UID (the
/// kubelet names pod cgroups after the UID, with `-` or, under systemd, `_`). `None` where the
/// node's processes are not visible here.
pub fn node_process(pod_uid: &str, comm: &str) -> Option<u32> {
    let systemd = pod_uid.replace('-', "_");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
        (name.trim() == comm && (cgroup.contains(pod_uid) || cgroup.contains(&systemd)))
            .then_some(pid)
    })
}

/// One request of the audit log (the fields the scenarios look at).
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub user: String,
    /// The pod a bound service-account token belongs to (which operator replica wrote).
    pub pod: String,
    pub verb: String,
    pub uri: String,
    pub code: i64,
    pub at: String,
}

/// The local control plane's audit log, if this provider has one.
pub fn audit_log() -> Option<PathBuf> {
    std::env::var_os("RLT_E2E_AUDIT_LOG").map(PathBuf::from)
}

/// Audit entries (stage ResponseComplete) after `since` (an RFC 3339 timestamp as the API
/// server writes them; lexical order is time order).
pub fn audit_entries(path: &Path, since: &str) -> Result<Vec<AuditEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["stage"] == "ResponseComplete")
        .map(|v| AuditEntry {
            user: v["user"]["username"].as_str().unwrap_or("").to_string(),
            pod: v["user"]["extra"]["authentication.kubernetes.io/pod-name"][0]
                .as_str()
                .unwrap_or("")
                .to_string(),
            verb: v["verb"].as_str().unwrap_or("").to_string(),
            uri: v["requestURI"].as_str().unwrap_or("").to_string(),
            code: v["responseStatus"]["code"].as_i64().unwrap_or(0),
            at: v["requestReceivedTimestamp"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        })
        .filter(|e| e.at.as_str() > since)
        .collect())
}

pub fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// Now, as the API server writes audit timestamps.
pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}
