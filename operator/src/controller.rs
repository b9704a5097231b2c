//! The thin I/O layer around [`crate::reconcile`]: read the run's children, ask the pure
//! reconciler what to do, then do exactly that (server-side apply with field manager
//! `rlt-operator`, background deletes, one status apply, Events). A plan with nothing to
//! change makes no write at all.
use crate::children::{Child, Kind, LABEL_RUN};
use crate::figures::Figures;
use crate::metrics::Metrics;
use crate::observe::{self, Observed};
use crate::reconcile::{self, EventType, Plan};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{predicates, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use rlt_api::RltRun;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

pub const FIELD_MANAGER: &str = "rlt-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "client",
        }
    }
}

/// Tunables (flags of the binary).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// Coalesces bursts of child events (pod status churn) into one reconcile.
    pub debounce: Duration,
    /// How often parameter server 0 is polled for training figures while RL runs.
    pub poll_interval: Duration,
    /// Safety net re-reconcile when nothing happens.
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: None,
            debounce: Duration::from_secs(1),
            poll_interval: Duration::from_secs(15),
            resync: Duration::from_secs(300),
        }
    }
}

/// Shared state of the reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub figures: Figures,
    pub settings: Settings,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        figures: Figures,
        settings: Settings,
        instance: Option<String>,
    ) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            figures,
            settings,
        }
    }
}

async fn list<K>(api: Api<K>, selector: &str) -> Result<Vec<K>, kube::Error>
where
    K: Clone + DeserializeOwned + Debug,
{
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

/// Only children owned by this run instance (a same-named run recreated later has another UID).
fn owned(run: &RltRun, meta: &ObjectMeta) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == run.metadata.uid.as_ref())
}

/// Reads everything the reconciler looks at.
pub async fn observe(client: &Client, run: &RltRun) -> Result<Observed, kube::Error> {
    let ns = run.namespace().unwrap_or_default();
    let sel = format!("{LABEL_RUN}={}", run.name_any());
    let (cms, pvcs, jobs, sets, svcs, pods) = futures::try_join!(
        list(Api::<ConfigMap>::namespaced(client.clone(), &ns), &sel),
        list(
            Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns),
            &sel
        ),
        list(Api::<Job>::namespaced(client.clone(), &ns), &sel),
        list(Api::<StatefulSet>::namespaced(client.clone(), &ns), &sel),
        list(Api::<Service>::namespaced(client.clone(), &ns), &sel),
        list(Api::<Pod>::namespaced(client.clone(), &ns), &sel),
    )?;
    let jobs: Vec<Job> = jobs
        .into_iter()
        .filter(|j| owned(run, &j.metadata))
        .collect();
    let mut obs = Observed::default();
    let metas = [
        (
            Kind::ConfigMap,
            cms.iter().map(|o| &o.metadata).collect::<Vec<_>>(),
        ),
        (
            Kind::PersistentVolumeClaim,
            pvcs.iter().map(|o| &o.metadata).collect(),
        ),
        (Kind::Job, jobs.iter().map(|o| &o.metadata).collect()),
        (
            Kind::StatefulSet,
            sets.iter().map(|o| &o.metadata).collect(),
        ),
        (Kind::Service, svcs.iter().map(|o| &o.metadata).collect()),
    ];
    for (kind, list) in metas {
        obs.children.extend(
            list.into_iter()
                .filter(|m| owned(run, m))
                .map(|m| observe::child(kind, m)),
        );
    }
    obs.jobs = jobs.iter().map(observe::job).collect();
    obs.pods = pods.iter().map(observe::pod).collect();
    Ok(obs)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// One reconcile: observe, decide, act.
pub async fn reconcile(run: Arc<RltRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&run, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        ctx.metrics
            .errors
            .with_label_values(&[e.metric_label()])
            .inc();
    }
    result
}

async fn reconcile_inner(run: &RltRun, ctx: &Context) -> Result<Action, Error> {
    let mut obs = observe(&ctx.client, run).await?;
    let time = now();
    let mut plan = reconcile::reconcile(run, &obs, &time);
    if plan.poll_figures {
        // The figures only refine the status; a parameter server that is not up yet is normal.
        obs.figures = ctx
            .figures
            .read(&run.name_any(), &run.namespace().unwrap_or_default())
            .await;
        if obs.figures.is_some() {
            plan = reconcile::reconcile(run, &obs, &time);
        }
    }
    execute(run, &plan, ctx).await?;
    Ok(if plan.poll_figures {
        Action::requeue(ctx.settings.poll_interval)
    } else {
        Action::requeue(ctx.settings.resync)
    })
}

/// Carries out a plan. Order: children first, then status, then Events, so a status never
/// claims a child that failed to be written.
pub async fn execute(run: &RltRun, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let ns = run.namespace().unwrap_or_default();
    let client = &ctx.client;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for child in &plan.apply {
        let name = child.name().to_string();
        match child {
            Child::ConfigMap(o) => {
                apply(
                    Api::<ConfigMap>::namespaced(client.clone(), &ns),
                    &name,
                    o,
                    &pp,
                )
                .await?
            }
            Child::Pvc(o) => {
                apply(
                    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns),
                    &name,
                    o,
                    &pp,
                )
                .await?
            }
            Child::Job(o) => {
                apply(Api::<Job>::namespaced(client.clone(), &ns), &name, o, &pp).await?
            }
            Child::StatefulSet(o) => {
                apply(
                    Api::<StatefulSet>::namespaced(client.clone(), &ns),
                    &name,
                    o,
                    &pp,
                )
                .await?
            }
            Child::Service(o) => {
                apply(
                    Api::<Service>::namespaced(client.clone(), &ns),
                    &name,
                    o,
                    &pp,
                )
                .await?
            }
        }
        info!(run = %reconcile::run_key(run), kind = ?child.kind(), %name, "applied");
    }
    for (kind, name) in &plan.delete {
        let dp = DeleteParams::background();
        let res = match kind {
            Kind::ConfigMap => Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .delete(name, &dp)
                .await
                .map(|_| ()),
            Kind::PersistentVolumeClaim => {
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
                    .delete(name, &dp)
                    .await
                    .map(|_| ())
            }
            Kind::Job => Api::<Job>::namespaced(client.clone(), &ns)
                .delete(name, &dp)
                .await
                .map(|_| ()),
            Kind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), &ns)
                .delete(name, &dp)
                .await
                .map(|_| ()),
            Kind::Service => Api::<Service>::namespaced(client.clone(), &ns)
                .delete(name, &dp)
                .await
                .map(|_| ()),
        };
        match res {
            Ok(()) => info!(run = %reconcile::run_key(run), ?kind, %name, "deleted"),
            // Already gone: the goal is reached.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(status) = &plan.status {
        let api = Api::<RltRun>::namespaced(client.clone(), &ns);
        let body = serde_json::json!({
            "apiVersion": RltRun::api_version(&()),
            "kind": RltRun::kind(&()),
            "status": status,
        });
        api.patch_status(&run.name_any(), &pp, &Patch::Apply(&body))
            .await?;
    }
    let reference = run.object_ref(&());
    for ev in &plan.events {
        let event = Event {
            type_: match ev.type_ {
                EventType::Normal => KubeEventType::Normal,
                EventType::Warning => KubeEventType::Warning,
            },
            reason: ev.reason.clone(),
            note: Some(ev.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An Event that cannot be published must not fail the reconcile (the status has it).
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(run = %reconcile::run_key(run), error = %e, "publishing event");
        }
    }
    Ok(())
}

async fn apply<K>(api: Api<K>, name: &str, obj: &K, pp: &PatchParams) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + Debug,
{
    // SSA needs apiVersion/kind in the body; k8s-openapi types serialize them.
    api.patch(name, pp, &Patch::Apply(obj)).await.map(|_| ())
}

fn error_policy(run: Arc<RltRun>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(run = %reconcile::run_key(&run), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(10))
}

/// Runs the controller until shutdown. The main watch is filtered by generation (our own
/// status writes do not trigger reconciles); children are watched by label; pods (their
/// failures) map to their run through the `rlt.dev/run` label.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.clone();
    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>>(
        c: &Client,
        ns: &Option<String>,
    ) -> Api<K> {
        match ns {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    }
    let runs: Api<RltRun> = api(&client, &ns);
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=rlt-operator");
    let (reader, writer) = reflector::store();
    ctx.metrics.set_store(reader.clone());
    let main = watcher(runs, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let pods = watcher::Config::default().labels(LABEL_RUN);
    Controller::for_stream(main, reader)
        .with_config(kube::runtime::controller::Config::default().debounce(ctx.settings.debounce))
        .owns(api::<ConfigMap>(&client, &ns), managed.clone())
        .owns(api::<PersistentVolumeClaim>(&client, &ns), managed.clone())
        .owns(api::<Job>(&client, &ns), managed.clone())
        .owns(api::<StatefulSet>(&client, &ns), managed.clone())
        .owns(api::<Service>(&client, &ns), managed)
        .watches(api::<Pod>(&client, &ns), pods, |pod: Pod| {
            let run = pod.labels().get(LABEL_RUN)?.clone();
            Some(ObjectRef::<RltRun>::new(&run).within(&pod.namespace()?))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "controller");
            }
        })
        .await;
}
