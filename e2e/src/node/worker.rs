//! One pod's life on a node: status from Pending to a terminal phase, init containers, the
//! first container as a process (or simulated), restarts with back-off, readiness, and the
//! kubelet's graceful teardown and final delete.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Preconditions};
use tokio::sync::watch;

use super::env::{self, FieldCtx, Rewriter, Sources};
use super::images::find_program;
use super::kubeapi::{self, is_not_found, now};
use super::status::{Reporter, State, View};
use super::volumes::{self, Volumes};
use super::{ip, probes, process, rules, termination, token, Agent};

/// The latest pod object; None once it is gone from the API.
pub type PodRx = watch::Receiver<Option<Arc<Pod>>>;

pub const HOST_IP: &str = "127.0.0.1";
const INITIAL_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const TOKEN_SECONDS: i64 = 3600;
const NO_IMAGE: &str = "rlt-e2e-node has no --image-map entry for it";

/// Why a worker stops what it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The pod has a deletionTimestamp.
    Deleting,
    /// The pod object is gone.
    Gone,
    /// The agent is stopping.
    Shutdown,
}

struct Signals {
    rx: PodRx,
    shutdown: watch::Receiver<bool>,
}

impl Signals {
    fn latest(&self) -> Option<Arc<Pod>> {
        self.rx.borrow().clone()
    }

    fn check(&self, deleting_stops: bool) -> Option<Stop> {
        if *self.shutdown.borrow() {
            return Some(Stop::Shutdown);
        }
        match &*self.rx.borrow() {
            None => Some(Stop::Gone),
            Some(p) if deleting_stops && p.metadata.deletion_timestamp.is_some() => {
                Some(Stop::Deleting)
            }
            _ => None,
        }
    }

    async fn until(&mut self, deleting_stops: bool) -> Stop {
        loop {
            if let Some(s) = self.check(deleting_stops) {
                return s;
            }
            tokio::select! {
                r = self.rx.changed() => if r.is_err() { return Stop::Gone },
                r = self.shutdown.changed() => if r.is_err() { return Stop::Shutdown },
            }
        }
    }

    /// Resolves once the pod is being deleted or gone, or the agent stops (cancel-safe).
    async fn stopped(&mut self) -> Stop {
        self.until(true).await
    }

    /// Resolves once the pod is gone or the agent stops.
    async fn gone(&mut self) -> Stop {
        self.until(false).await
    }
}

/// `fut`, unless the pod is deleted first.
async fn guard<T>(sig: &mut Signals, fut: impl std::future::Future<Output = T>) -> Result<T, Stop> {
    tokio::select! {
        s = sig.stopped() => Err(s),
        v = fut => Ok(v),
    }
}

/// Everything about the pod that does not change.
struct Cx {
    agent: Arc<Agent>,
    api: Api<Pod>,
    ns: String,
    name: String,
    uid: String,
    ip: Ipv4Addr,
    dir: PathBuf,
}

impl Cx {
    fn who(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
    fn log_file(&self, container: &str) -> PathBuf {
        self.agent
            .state_dir
            .join("logs")
            .join(format!("{}_{}_{container}.log", self.ns, self.name))
    }
}

/// Pod-level preparation done once, before the first process: volumes and credentials.
struct Prepared {
    volumes: Volumes,
    kubeconfig: Option<PathBuf>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Aborts a task when dropped.
struct TaskGuard(tokio::task::JoinHandle<()>);
impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a container cannot start yet.
struct Waiting {
    reason: &'static str,
    message: String,
    /// None: it never will (until the pod is deleted).
    retry: Option<Duration>,
}

impl Waiting {
    fn retry(reason: &'static str, e: impl std::fmt::Display, after: Duration) -> Waiting {
        Waiting {
            reason,
            message: e.to_string(),
            retry: Some(after),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Init(usize),
    Main,
}

fn slot_mut(view: &mut View, slot: Slot) -> &mut super::status::Container {
    match slot {
        Slot::Init(i) => &mut view.init[i],
        Slot::Main => &mut view.containers[0],
    }
}

/// Reports a container as ended, as a kubelet does (not ready, Terminated with its code,
/// reason and termination message).
fn terminate(
    view: &mut View,
    slot: Slot,
    code: i32,
    reason: &str,
    message: Option<String>,
    started_at: k8s_openapi::jiff::Timestamp,
) {
    let cs = slot_mut(view, slot);
    cs.ready = false;
    cs.state = State::Terminated {
        exit_code: code,
        reason: reason.into(),
        message,
        started_at: Some(started_at),
        finished_at: now(),
        container_id: cs.container_id.clone(),
    };
}

/// The containers after the first are not run: they are reported running and ready while
/// the first one runs.
fn extras_running(view: &mut View) {
    let at = now();
    for c in view.containers.iter_mut().skip(1) {
        if !matches!(c.state, State::Running { .. }) {
            c.state = State::Running { started_at: at };
            c.image_id = "rlt-e2e-node://not-run".into();
            c.ready = true;
        }
    }
}

/// Plays one pod until it is gone; returns its uid.
pub async fn run(agent: Arc<Agent>, pod: Arc<Pod>, rx: PodRx) -> String {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let ip = ip::pod_ip(
        &ns,
        &name,
        spec.hostname.as_deref(),
        spec.subdomain.as_deref(),
    );
    let mut sig = Signals {
        rx,
        shutdown: agent.shutdown.clone(),
    };
    let cx = Cx {
        api: Api::namespaced(agent.client.clone(), &ns),
        dir: agent
            .state_dir
            .join("pods")
            .join(format!("{ns}_{name}_{uid}")),
        agent,
        ns,
        name,
        uid: uid.clone(),
        ip,
    };
    let mut view = View::new(&pod, ip.to_string(), HOST_IP.to_string());
    let mut rep = Reporter::new(cx.api.clone(), &cx.name, &cx.uid);
    let mut prepared = None;
    let stop = lifecycle(&cx, &mut sig, &mut view, &mut rep, &mut prepared).await;
    drop(prepared);
    let stop = match stop {
        Stop::Deleting => {
            final_delete(&cx).await;
            sig.gone().await
        }
        s => s,
    };
    if stop == Stop::Gone {
        let _ = std::fs::remove_dir_all(&cx.dir);
    }
    tracing::debug!(pod = %cx.who(), ?stop, "worker done");
    uid
}

/// The kubelet's last word on a pod: delete it with grace 0 (the uid as precondition).
async fn final_delete(cx: &Cx) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(cx.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match kubeapi::retry(8, || cx.api.delete(&cx.name, &dp)).await {
        Ok(_) => tracing::info!(pod = %cx.who(), "deleted"),
        Err(e) if is_not_found(&e) || kubeapi::code(&e) == Some(409) => {}
        Err(e) => tracing::warn!(pod = %cx.who(), "final delete failed: {e}"),
    }
}

fn phase_of(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Runs the pod to a terminal phase (or until it is deleted, gone, or the agent stops) and
/// returns what stopped it.
async fn lifecycle(
    cx: &Cx,
    sig: &mut Signals,
    view: &mut View,
    rep: &mut Reporter,
    prepared: &mut Option<Prepared>,
) -> Stop {
    let Some(pod) = sig.latest() else {
        return Stop::Gone;
    };
    if matches!(phase_of(&pod), "Succeeded" | "Failed") {
        // Already over (e.g. before the agent restarted): wait for its deletion.
        return sig.stopped().await;
    }
    if let Some(stop) = sig.check(true) {
        return stop;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.containers.is_empty() {
        return sig.stopped().await;
    }
    rep.send(view).await;
    let policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            match run_container(cx, sig, view, rep, prepared, Slot::Init(i), c, &pod).await {
                Ok(0) => break,
                Ok(_) if policy == "Never" => {
                    view.phase = "Failed".into();
                    for c in view.containers.iter_mut() {
                        c.state = State::waiting("PodInitializing", None);
                    }
                    rep.send(view).await;
                    tracing::info!(pod = %cx.who(), "failed (init container {})", c.name);
                    return sig.stopped().await;
                }
                Ok(_) => {
                    if let Err(stop) =
                        crash_backoff(cx, sig, view, rep, Slot::Init(i), &mut backoff).await
                    {
                        return teardown(view, rep, stop).await;
                    }
                }
                Err(stop) => return teardown(view, rep, stop).await,
            }
        }
    }
    let main = &spec.containers[0];
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match run_container(cx, sig, view, rep, prepared, Slot::Main, main, &pod).await {
            Ok(code) => {
                let restart = match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => code != 0,
                    _ => true,
                };
                if !restart {
                    end_extras(view, 0);
                    view.phase = if code == 0 { "Succeeded" } else { "Failed" }.into();
                    rep.send(view).await;
                    tracing::info!(pod = %cx.who(), phase = %view.phase, "pod finished");
                    return sig.stopped().await;
                }
                if let Err(stop) = crash_backoff(cx, sig, view, rep, Slot::Main, &mut backoff).await
                {
                    return teardown(view, rep, stop).await;
                }
            }
            Err(stop) => return teardown(view, rep, stop).await,
        }
    }
}

fn end_extras(view: &mut View, exit_code: i32) {
    let at = now();
    for c in view.containers.iter_mut().skip(1) {
        if let State::Running { started_at } = c.state {
            c.state = State::Terminated {
                exit_code,
                reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
                message: None,
                started_at: Some(started_at),
                finished_at: at,
                container_id: c.container_id.clone(),
            };
            c.ready = false;
        }
    }
}

/// A deleted pod's last status: every container ended, phase from their exit codes.
async fn teardown(view: &mut View, rep: &mut Reporter, stop: Stop) -> Stop {
    if stop != Stop::Deleting {
        return stop;
    }
    end_extras(view, 143);
    for c in view.init.iter_mut().chain(view.containers.iter_mut()) {
        c.ready = false;
        if let State::Waiting { .. } = c.state {
            c.state = match c.last.take() {
                Some(last) => last,
                None => State::Terminated {
                    exit_code: 137,
                    reason: "ContainerStatusUnknown".into(),
                    message: Some(
                        "The container could not be located when the pod was terminated".into(),
                    ),
                    started_at: None,
                    finished_at: now(),
                    container_id: None,
                },
            };
        }
    }
    let all_ok = view.containers.iter().all(|c| c.succeeded());
    view.phase = if all_ok { "Succeeded" } else { "Failed" }.into();
    rep.send(view).await;
    stop
}

/// The wait between two starts of a crashed container (CrashLoopBackOff).
async fn crash_backoff(
    cx: &Cx,
    sig: &mut Signals,
    view: &mut View,
    rep: &mut Reporter,
    slot: Slot,
    backoff: &mut Duration,
) -> Result<(), Stop> {
    let c = slot_mut(view, slot);
    let message = format!(
        "back-off {}s restarting failed container={} pod={}_{}({})",
        backoff.as_secs(),
        c.name,
        cx.name,
        cx.ns,
        cx.uid
    );
    let last = std::mem::replace(
        &mut c.state,
        State::waiting("CrashLoopBackOff", Some(message)),
    );
    c.last = Some(last);
    c.restart_count += 1;
    c.ready = false;
    rep.send(view).await;
    guard(sig, tokio::time::sleep(*backoff)).await?;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    Ok(())
}

/// The rules in force now (none when the ConfigMap is missing or unreadable).
async fn current_rules(cx: &Cx) -> Vec<rules::Rule> {
    let api: Api<ConfigMap> = Api::namespaced(cx.agent.client.clone(), rules::NAMESPACE);
    let cm = match api.get(rules::CONFIG_MAP).await {
        Ok(cm) => cm,
        Err(e) if is_not_found(&e) => return Vec::new(),
        Err(e) => {
            tracing::warn!("rules: {e}");
            return Vec::new();
        }
    };
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(rules::KEY))
        .cloned()
        .unwrap_or_default();
    rules::parse(&text).unwrap_or_else(|e| {
        tracing::warn!("rules: {e:#}");
        Vec::new()
    })
}

/// One start of a container, to its end. Ok(exit code) once it ended (status sent);
/// Err(stop) when the pod was deleted or the agent stops first (process stopped, status
/// recorded but not sent).
#[allow(clippy::too_many_arguments)]
async fn run_container(
    cx: &Cx,
    sig: &mut Signals,
    view: &mut View,
    rep: &mut Reporter,
    prepared: &mut Option<Prepared>,
    slot: Slot,
    c: &Container,
    pod: &Pod,
) -> Result<i32, Stop> {
    let empty = std::collections::BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let rule_set = current_rules(cx).await;
    let plan = rules::plan(
        &rule_set,
        &rules::Subject {
            namespace: &cx.ns,
            labels,
            container: &c.name,
            main: slot == Slot::Main,
        },
        cx.agent.process_by_default,
        cx.agent.simulate_for,
    );
    if !plan.process {
        return simulate(cx, sig, view, rep, slot, c, &plan, pod).await;
    }
    let launch = loop {
        let attempt = guard(sig, launch_spec(cx, prepared, c, pod)).await?;
        match attempt {
            Ok(l) => break l,
            Err(w) => {
                let cs = slot_mut(view, slot);
                let changed = !matches!(&cs.state, State::Waiting { reason, message } if reason == w.reason && message.as_deref() == Some(w.message.as_str()));
                if changed {
                    tracing::warn!(pod = %cx.who(), container = %c.name, "{}: {}", w.reason, w.message);
                }
                cs.state = State::waiting(w.reason, Some(w.message.clone()));
                rep.send(view).await;
                match w.retry {
                    Some(d) => guard(sig, tokio::time::sleep(d)).await?,
                    None if w.reason == "ErrImagePull" => {
                        guard(sig, tokio::time::sleep(Duration::from_secs(2))).await?;
                        let image = c.image.clone().unwrap_or_default();
                        slot_mut(view, slot).state = State::waiting(
                            "ImagePullBackOff",
                            Some(format!("Back-off pulling image {image:?}: {NO_IMAGE}")),
                        );
                        rep.send(view).await;
                        return Err(sig.stopped().await);
                    }
                    None => return Err(sig.stopped().await),
                }
            }
        }
    };
    let Launch {
        spec,
        program,
        image_id,
        rewriter,
        term_file,
        search,
    } = launch;
    let started_at = now();
    let mut proc = match program {
        Ok(program) => match process::spawn(&process::Spec {
            program,
            ..spec.clone()
        }) {
            Ok(p) => p,
            Err(e) => {
                return start_error(cx, view, rep, slot, c, format!("{e:#}"), started_at).await
            }
        },
        Err(message) => return start_error(cx, view, rep, slot, c, message, started_at).await,
    };
    let main = slot == Slot::Main;
    {
        let cs = slot_mut(view, slot);
        cs.state = State::Running { started_at };
        cs.container_id = Some(format!("rlt-e2e-node://{}", proc.pid));
        cs.image_id = image_id;
        cs.ready = main && c.readiness_probe.is_none();
    }
    if main {
        view.phase = "Running".into();
        extras_running(view);
    }
    rep.send(view).await;
    tracing::info!(pod = %cx.who(), container = %c.name, pid = proc.pid, ip = %cx.ip, "started");

    let (ready_tx, mut ready_rx) = watch::channel(false);
    let mut probing = false;
    let _probe = match (&c.readiness_probe, main) {
        (Some(probe), true) => {
            probing = true;
            let target = probes::Target {
                ip: cx.ip,
                ports: probes::Target::named_ports(c),
                env: spec.env.clone(),
                cwd: spec.cwd.clone(),
                search,
            };
            let rw = rewriter.clone();
            Some(TaskGuard(probes::readiness(
                probe.clone(),
                target,
                move |s| rw.rewrite(s),
                ready_tx,
            )))
        }
        _ => None,
    };
    let oom_timer = tokio::time::sleep(plan.after);
    tokio::pin!(oom_timer);
    let mut oom_pending = plan.fault == Some(rules::Fault::OomKill);
    let mut oom = false;
    let (code, stop) = loop {
        tokio::select! {
            code = proc.wait() => break (code, None),
            r = ready_rx.changed(), if probing => {
                match r {
                    Ok(()) => {
                        let ready = *ready_rx.borrow_and_update();
                        slot_mut(view, slot).ready = ready;
                        rep.send(view).await;
                    }
                    Err(_) => probing = false,
                }
            }
            _ = &mut oom_timer, if oom_pending => {
                oom_pending = false;
                oom = true;
                proc.signal(libc::SIGKILL);
            }
            stop = sig.stopped() => {
                let grace = match stop {
                    Stop::Deleting => {
                        let secs = sig.latest().and_then(|p| p.metadata.deletion_grace_period_seconds).unwrap_or(30).max(0) as u64;
                        Duration::from_secs(secs).min(cx.agent.max_grace)
                    }
                    _ => cx.agent.shutdown_grace,
                };
                let code = proc.stop(grace).await;
                break (code, Some(stop));
            }
        }
    };
    let (code, reason) = if oom {
        (137, "OOMKilled")
    } else if code == 0 {
        (0, "Completed")
    } else {
        (code, "Error")
    };
    let file = std::fs::read(&term_file).unwrap_or_default();
    let log = process::log_tail(
        &spec.log,
        proc.log_offset,
        termination::FALLBACK_BYTES as u64,
    );
    let message = termination::message(&file, code, c.termination_message_policy.as_deref(), &log);
    terminate(view, slot, code, reason, message, started_at);
    tracing::info!(pod = %cx.who(), container = %c.name, exit_code = code, reason, "exited");
    match stop {
        Some(stop) => Err(stop),
        None => {
            rep.send(view).await;
            Ok(code)
        }
    }
}

/// A container whose program cannot be started: terminated StartError, exit code 128.
async fn start_error(
    cx: &Cx,
    view: &mut View,
    rep: &mut Reporter,
    slot: Slot,
    c: &Container,
    message: String,
    at: k8s_openapi::jiff::Timestamp,
) -> Result<i32, Stop> {
    tracing::warn!(pod = %cx.who(), container = %c.name, "StartError: {message}");
    let cs = slot_mut(view, slot);
    cs.ready = false;
    cs.state = State::Terminated {
        exit_code: 128,
        reason: "StartError".into(),
        message: Some(message),
        started_at: Some(at),
        finished_at: at,
        container_id: None,
    };
    rep.send(view).await;
    Ok(128)
}

/// A container without a process: running (and ready) at once, then it ends as planned;
/// restartPolicy Always containers with nothing planned run until the pod is deleted.
#[allow(clippy::too_many_arguments)]
async fn simulate(
    cx: &Cx,
    sig: &mut Signals,
    view: &mut View,
    rep: &mut Reporter,
    slot: Slot,
    c: &Container,
    plan: &rules::Plan,
    pod: &Pod,
) -> Result<i32, Stop> {
    let main = slot == Slot::Main;
    let started_at = now();
    {
        let cs = slot_mut(view, slot);
        cs.state = State::Running { started_at };
        cs.container_id = Some(format!("rlt-e2e-node://simulated/{}/{}", cx.uid, c.name));
        cs.image_id = "rlt-e2e-node://simulated".into();
        cs.ready = main;
    }
    if main {
        view.phase = "Running".into();
        extras_running(view);
    }
    rep.send(view).await;
    tracing::info!(pod = %cx.who(), container = %c.name, "started (simulated)");
    let always = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
        == "Always";
    let ended = if main && always && plan.fault.is_none() {
        Err(sig.stopped().await)
    } else {
        guard(sig, tokio::time::sleep(plan.after)).await
    };
    let (code, reason, message) = match (&ended, &plan.fault) {
        (Err(_), _) => (143, "Error", None),
        (Ok(()), Some(rules::Fault::Fail { code, message })) => (*code, "Error", message.clone()),
        (Ok(()), Some(rules::Fault::OomKill)) => (137, "OOMKilled", None),
        (Ok(()), None) => (
            plan.exit_code,
            if plan.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            },
            None,
        ),
    };
    terminate(view, slot, code, reason, message, started_at);
    tracing::info!(pod = %cx.who(), container = %c.name, exit_code = code, reason, "exited (simulated)");
    match ended {
        Err(stop) => Err(stop),
        Ok(()) => {
            rep.send(view).await;
            Ok(code)
        }
    }
}

/// Everything needed to start the process.
struct Launch {
    spec: process::Spec,
    /// The host program, or why there is none (a StartError).
    program: Result<PathBuf, String>,
    image_id: String,
    rewriter: Rewriter,
    term_file: PathBuf,
    search: Vec<PathBuf>,
}

async fn get_opt<K>(api: Api<K>, name: &str) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(o) => Ok(Some(o)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Volumes and service-account credentials, once per pod; a task keeps the tokens fresh.
async fn prepare_pod(cx: &Cx, pod: &Pod, fields: &FieldCtx<'_>) -> Result<Prepared, Waiting> {
    let client = &cx.agent.client;
    let creating = |e: anyhow::Error| {
        Waiting::retry(
            "ContainerCreating",
            format!("{e:#}"),
            Duration::from_secs(3),
        )
    };
    let volumes = volumes::prepare(client, fields, &cx.dir)
        .await
        .map_err(creating)?;
    let sa_name = token::service_account_name(pod);
    let sa = get_opt(
        Api::<ServiceAccount>::namespaced(client.clone(), &cx.ns),
        &sa_name,
    )
    .await
    .map_err(|e| creating(e.into()))?;
    let sa_dir = cx.dir.join("serviceaccount");
    let kubeconfig = if token::automount(pod, sa.as_ref()) {
        let tok = token::request(client, pod, Vec::new(), TOKEN_SECONDS)
            .await
            .map_err(creating)?;
        Some(token::write_credentials(&sa_dir, &cx.agent.cluster, &cx.ns, &tok).map_err(creating)?)
    } else {
        None
    };
    let refresher = {
        let client = client.clone();
        let pod = pod.clone();
        let tokens = volumes.tokens.clone();
        let sa_token = kubeconfig.as_ref().map(|_| sa_dir.join("token"));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(TOKEN_SECONDS as u64 * 4 / 5)).await;
                let mut files: Vec<(PathBuf, Vec<String>, i64)> = tokens
                    .iter()
                    .map(|t| (t.path.clone(), t.audiences.clone(), t.expiration_seconds))
                    .collect();
                if let Some(p) = &sa_token {
                    files.push((p.clone(), Vec::new(), TOKEN_SECONDS));
                }
                for (path, audiences, secs) in files {
                    match token::request(&client, &pod, audiences, secs).await {
                        Ok(t) => {
                            if let Err(e) = token::write_atomic(&path, t.as_bytes()) {
                                tracing::warn!("token refresh: {e:#}");
                            }
                        }
                        Err(e) => tracing::warn!("token refresh: {e:#}"),
                    }
                }
            }
        })
    };
    Ok(Prepared {
        volumes,
        kubeconfig,
        refresher,
    })
}

/// Resolves image, volumes, credentials, environment and command of one start.
async fn launch_spec(
    cx: &Cx,
    prepared: &mut Option<Prepared>,
    c: &Container,
    pod: &Pod,
) -> Result<Launch, Waiting> {
    let agent = &cx.agent;
    let image = c.image.clone().unwrap_or_default();
    let Some(image_dir) = agent.images.dir(&image) else {
        return Err(Waiting {
            reason: "ErrImagePull",
            message: format!(
                "failed to pull image {image:?}: rlt-e2e-node has no --image-map entry for it"
            ),
            retry: None,
        });
    };
    let image_dir = image_dir.to_path_buf();
    let fields = FieldCtx {
        pod,
        pod_ip: cx.ip,
        host_ip: HOST_IP,
        node_cpu: agent.node_cpu,
        node_memory: agent.node_memory,
    };
    if prepared.is_none() {
        *prepared = Some(prepare_pod(cx, pod, &fields).await?);
    }
    let prep = prepared.as_ref().expect("prepared above");
    let config_error = |e: &dyn std::fmt::Display| {
        Waiting::retry("CreateContainerConfigError", e, Duration::from_secs(5))
    };

    let (cm_names, secret_names) = Sources::wanted(c);
    let mut sources = Sources::default();
    for n in cm_names {
        let cm = get_opt(
            Api::<ConfigMap>::namespaced(agent.client.clone(), &cx.ns),
            &n,
        )
        .await
        .map_err(|e| config_error(&e))?;
        sources.config_maps.insert(n, cm);
    }
    for n in secret_names {
        let s = get_opt(Api::<Secret>::namespaced(agent.client.clone(), &cx.ns), &n)
            .await
            .map_err(|e| config_error(&e))?;
        sources.secrets.insert(n, s);
    }
    let resolved =
        env::resolve_env(c, &fields, &sources).map_err(|e| config_error(&format!("{e:#}")))?;
    let mut mounts = volumes::mounts(c, &prep.volumes, &resolved)
        .map_err(|e| config_error(&format!("{e:#}")))?;

    let term_file = cx.dir.join("termination").join(&c.name);
    if let Some(parent) = term_file.parent() {
        std::fs::create_dir_all(parent).map_err(|e| config_error(&e))?;
    }
    std::fs::write(&term_file, b"").map_err(|e| config_error(&e))?;
    let term_path = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    mounts.push((term_path, term_file.clone()));
    let rewriter = Rewriter {
        mounts,
        pod_ip: cx.ip,
    };

    // A clean environment: PATH (the image's folder first) and LD_LIBRARY_PATH from the
    // agent, HOSTNAME, the container's env (rewritten), then the agent's additions.
    let mut env_out: Vec<(String, String)> = Vec::new();
    let path = format!("{}:{}", image_dir.display(), agent.path);
    env_out.push(("PATH".into(), path));
    if let Some(ld) = &agent.ld_library_path {
        env_out.push(("LD_LIBRARY_PATH".into(), ld.clone()));
    }
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| cx.name.clone());
    env_out.push(("HOSTNAME".into(), hostname));
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| match env
        .iter_mut()
        .find(|(n, _)| n == k)
    {
        Some(e) => e.1 = v,
        None => env.push((k.to_string(), v)),
    };
    for (k, v) in &resolved {
        if k != "PATH" {
            set(&mut env_out, k, rewriter.rewrite(v));
        }
    }
    set(&mut env_out, "RLT_BIND_ADDRESS", cx.ip.to_string());
    // The service account's kubeconfig stands in for the in-cluster files, unless the
    // container names a kubeconfig of its own.
    if let (Some(kc), false) = (
        &prep.kubeconfig,
        resolved.iter().any(|(k, _)| k == "KUBECONFIG"),
    ) {
        env_out.push(("KUBECONFIG".into(), kc.display().to_string()));
    }

    let command = env::expand_all(c.command.as_deref().unwrap_or_default(), &resolved);
    let args = env::expand_all(c.args.as_deref().unwrap_or_default(), &resolved);
    let (program, mut argv) = match command.split_first() {
        Some((p, rest)) => (p.clone(), rest.to_vec()),
        None => match agent.images.entrypoint(&image) {
            Some(e) => (e.to_string(), Vec::new()),
            None => {
                return Err(Waiting {
                    reason: "CreateContainerError",
                    message: format!(
                        "no command specified: the container has no command and image {image:?} has no --entrypoint"
                    ),
                    retry: None,
                })
            }
        },
    };
    argv.extend(args);
    let argv: Vec<String> = argv.iter().map(|a| rewriter.rewrite(a)).collect();
    let mut search = vec![image_dir.clone()];
    search.extend(std::env::split_paths(&agent.path));
    let program = find_program(&rewriter.rewrite(&program), &search).ok_or_else(|| {
        format!(
            "exec: {program:?}: executable file not found in {} or $PATH",
            image_dir.display()
        )
    });
    let cwd = c
        .working_dir
        .as_deref()
        .map(|w| PathBuf::from(rewriter.rewrite(w)))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| cx.dir.join("work"));
    Ok(Launch {
        spec: process::Spec {
            program: PathBuf::new(),
            args: argv,
            env: env_out,
            cwd,
            log: cx.log_file(&c.name),
        },
        program,
        image_id: format!("rlt-e2e-node://{}", image_dir.display()),
        rewriter,
        term_file,
        search,
    })
}
