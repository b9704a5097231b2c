//! The thin I/O layer around [`crate::reconcile`]: read the run's children from the
//! controller's stores ([`crate::cache`]: a reconcile issues no LIST), ask the pure reconciler
//! what to do, then do exactly that. A plan with nothing to change makes no request at all.
//! Training figures come from the [`Poller`], which runs beside the controller and triggers a
//! reconcile when a run's figures change. The order of the writes:
//!
//! 1. the status, as a server-side apply conditional on the run's resourceVersion: the
//!    decision (a retry, its failure count, a new attempt) is recorded before any child is
//!    touched, and a reconcile from a stale cache gets a 409 and starts over instead of acting;
//! 2. the children: server-side apply with field manager `rlt-operator` (forced only for
//!    children the run is observed to own; a child not observed is first read by name, and a
//!    same-named object the run does not own is reported as a conflict, never adopted), then
//!    background deletes. A 4xx is not retried in a loop: it lands in the `Degraded`
//!    condition and a Warning Event (a second status write); 5xx and network errors are
//!    retried with backoff;
//! 3. the Events, each with a per-transition `action` and a note within the API's limit.
use crate::activity;
use crate::cache::{self, owned, retained_workspace, Stores, Writers};
use crate::children::{self, Child, Kind, LABEL_RUN};
use crate::figures::{Figures, Poller};
use crate::http::{self, Health};
use crate::kueue::{self, LocalQueue, ResourceFlavor, Workload, WorkloadPriorityClass};
use crate::metrics::Metrics;
use crate::observe::Observed;
use crate::reconcile::{self, EventType, Plan, Rejection, CHILD_CONFLICT, CHILD_REJECTED};
use futures::channel::mpsc;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event as CoreEvent, PersistentVolumeClaim, Pod, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{predicates, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use rlt_api::status::RltRunStatus;
use rlt_api::RltRun;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
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
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
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
    /// At most this many parameter servers are polled at once.
    pub poll_concurrency: usize,
    /// At most this many runs are reconciled at once (0: no limit).
    pub concurrency: u16,
    /// Safety net re-reconcile when nothing happens.
    pub resync: Duration,
    /// When a child write was refused (4xx): try again this much later (RBAC fixed, quota
    /// raised, conflicting object removed), not in a tight loop.
    pub rejected_retry: Duration,
    /// While a stage Job has no pods: look again this often (its `FailedCreate` Events).
    pub podless_recheck: Duration,
    /// Failed reconciles (5xx, network, stale cache) are retried after this, doubling up to
    /// `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Kueue's Workload API is served: queued runs are admitted through it ([`crate::kueue`]).
    pub kueue: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: None,
            debounce: Duration::from_secs(1),
            poll_interval: Duration::from_secs(15),
            poll_concurrency: 16,
            concurrency: 16,
            resync: Duration::from_secs(300),
            rejected_retry: Duration::from_secs(60),
            podless_recheck: Duration::from_secs(15),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            kueue: false,
        }
    }
}

/// Shared state of the reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub stores: Stores,
    pub poller: Poller,
    pub settings: Settings,
    /// Consecutive failed reconciles per run, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

/// What [`run`] wires into the controller: the stores' write halves and the poller's trigger.
pub struct Feeds {
    pub writers: Writers,
    pub figures_changed: mpsc::UnboundedReceiver<ObjectRef<RltRun>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Metrics,
        figures: Figures,
        settings: Settings,
        instance: Option<String>,
    ) -> (Context, Feeds) {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        let (stores, writers) = cache::stores(settings.kueue);
        let (poller, figures_changed) = Poller::new(figures);
        let ctx = Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            stores,
            poller,
            settings,
            failures: Mutex::default(),
        };
        let feeds = Feeds {
            writers,
            figures_changed,
        };
        (ctx, feeds)
    }

    /// The delay before retrying a run whose reconcile failed `n` times in a row.
    pub fn backoff(&self, n: u32) -> Duration {
        let s = &self.settings;
        s.min_backoff
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(s.max_backoff)
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// One reconcile: observe, decide, act.
pub async fn reconcile(run: Arc<RltRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Not timed: the stores fill once, at start-up.
    ctx.stores.ready().await;
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    ctx.metrics.in_flight.inc();
    let result = reconcile_inner(&run, &ctx).await;
    ctx.metrics.in_flight.dec();
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Err(e) => ctx
            .metrics
            .errors
            .with_label_values(&[e.metric_label()])
            .inc(),
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap()
                .remove(&reconcile::run_key(&run));
        }
    }
    result
}

async fn reconcile_inner(run: &RltRun, ctx: &Context) -> Result<Action, Error> {
    let deciding = Instant::now();
    let time = now();
    let mut snap = cache::snapshot(&ctx.stores, run, time.0);
    let key = ObjectRef::from_obj(run);
    snap.observed.figures = ctx.poller.latest(&key);
    let plan = reconcile::reconcile_with(run, &snap.observed, &snap.activity, &time);
    ctx.metrics
        .decision
        .observe(deciding.elapsed().as_secs_f64());
    ctx.poller.track(
        key,
        plan.poll_figures
            .then(|| children::status_url(run, &snap.observed)),
    );
    let rejected = execute(run, &snap.observed, &plan, ctx).await?;
    if let Some(new) = &plan.status {
        ctx.metrics.observe_status_write(run.status.as_ref(), new);
    }
    let s = &ctx.settings;
    let mut after = s.resync;
    if rejected {
        after = after.min(s.rejected_retry);
    }
    if snap.podless {
        after = after.min(s.podless_recheck);
    }
    if let Some(due) = plan.requeue_after {
        after = after.min(due);
    }
    Ok(Action::requeue(after))
}

/// Carries out a plan (see the module docs for the order). Returns whether a child write
/// was refused.
pub async fn execute(
    run: &RltRun,
    obs: &Observed,
    plan: &Plan,
    ctx: &Context,
) -> Result<bool, Error> {
    let mut resource_version = run.metadata.resource_version.clone();
    if let Some(status) = &plan.status {
        resource_version = write_status(run, status, resource_version, ctx).await?;
    }
    // The transition's Events right after the status that records it: a child write that
    // fails next must not lose them (the next reconcile finds the transition done).
    publish(run, &plan.events, ctx).await;
    let mut rejections = write_children(run, obs, plan, ctx).await?;
    rejections.extend(write_workload_statuses(run, plan, ctx).await?);
    let status = plan
        .status
        .clone()
        .or_else(|| run.status.clone())
        .unwrap_or_default();
    let (recorded, rejection_events) =
        reconcile::record_child_writes(run, &status, &rejections, &now());
    if let Some(status) = &recorded {
        write_status(run, status, resource_version, ctx).await?;
    }
    publish(run, &rejection_events, ctx).await;
    Ok(!rejections.is_empty())
}

/// Publishes Events about the run. One that cannot be published does not fail the
/// reconcile (the status has what it says).
async fn publish(run: &RltRun, events: &[reconcile::Event], ctx: &Context) {
    let reference = run.object_ref(&());
    for ev in events {
        let event = Event {
            type_: match ev.type_ {
                EventType::Normal => KubeEventType::Normal,
                EventType::Warning => KubeEventType::Warning,
            },
            reason: ev.reason.clone(),
            note: Some(reconcile::truncate(&ev.note, reconcile::NOTE_MAX)),
            action: ev.action.clone(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(run = %reconcile::run_key(run), error = %e, "publishing event");
        }
    }
}

/// Server-side applies the status, conditional on `resource_version` (a stale cache gets a
/// 409); returns the new resourceVersion.
async fn write_status(
    run: &RltRun,
    status: &RltRunStatus,
    resource_version: Option<String>,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let api = Api::<RltRun>::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let mut metadata = serde_json::json!({ "name": run.name_any() });
    if let Some(rv) = &resource_version {
        metadata["resourceVersion"] = rv.clone().into();
    }
    let body = serde_json::json!({
        "apiVersion": RltRun::api_version(&()),
        "kind": RltRun::kind(&()),
        "metadata": metadata,
        "status": status,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let written = api
        .patch_status(&run.name_any(), &pp, &Patch::Apply(&body))
        .await?;
    Ok(written.metadata.resource_version.or(resource_version))
}

/// Applies, then deletes, the plan's children; a refused write (4xx) is returned, not raised.
/// After a refused apply the remaining applies are skipped (they depend on the earlier ones:
/// a Job on its ConfigMap).
async fn write_children(
    run: &RltRun,
    obs: &Observed,
    plan: &Plan,
    ctx: &Context,
) -> Result<Vec<Rejection>, Error> {
    let ns = run.namespace().unwrap_or_default();
    let client = &ctx.client;
    let mut rejections = Vec::new();
    for child in &plan.apply {
        let observed = obs.child(child.kind(), child.name()).is_some();
        let res = match child {
            Child::ConfigMap(o) => {
                apply(
                    Api::namespaced(client.clone(), &ns),
                    run,
                    child.kind(),
                    o,
                    observed,
                )
                .await
            }
            Child::Pvc(o) => {
                apply(
                    Api::namespaced(client.clone(), &ns),
                    run,
                    child.kind(),
                    o,
                    observed,
                )
                .await
            }
            Child::Job(o) => {
                apply(
                    Api::namespaced(client.clone(), &ns),
                    run,
                    child.kind(),
                    o,
                    observed,
                )
                .await
            }
            Child::StatefulSet(o) => {
                apply(
                    Api::namespaced(client.clone(), &ns),
                    run,
                    child.kind(),
                    o,
                    observed,
                )
                .await
            }
            Child::Service(o) => {
                apply(
                    Api::namespaced(client.clone(), &ns),
                    run,
                    child.kind(),
                    o,
                    observed,
                )
                .await
            }
            Child::Workload(o) => {
                apply(
                    Api::namespaced(client.clone(), &ns),
                    run,
                    child.kind(),
                    o,
                    observed,
                )
                .await
            }
        };
        let rejection = res.or_else(|e| refused(child.kind(), child.name(), &ns, e))?;
        let name = child.name();
        match rejection {
            Some(r) => {
                warn!(run = %reconcile::run_key(run), kind = ?child.kind(), %name, reason = r.reason, message = %r.message, "child write refused");
                rejections.push(r);
                break;
            }
            None => info!(run = %reconcile::run_key(run), kind = ?child.kind(), %name, "applied"),
        }
    }
    for (kind, name) in &plan.delete {
        let dp = DeleteParams::background();
        let c = client.clone();
        let res = match kind {
            Kind::ConfigMap => delete::<ConfigMap>(c, &ns, name, &dp).await,
            Kind::PersistentVolumeClaim => delete::<PersistentVolumeClaim>(c, &ns, name, &dp).await,
            Kind::Job => delete::<Job>(c, &ns, name, &dp).await,
            Kind::StatefulSet => delete::<StatefulSet>(c, &ns, name, &dp).await,
            Kind::Service => delete::<Service>(c, &ns, name, &dp).await,
            Kind::Workload => delete::<Workload>(c, &ns, name, &dp).await,
        };
        match res {
            Ok(()) => info!(run = %reconcile::run_key(run), ?kind, %name, "deleted"),
            // Already gone: the goal is reached.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                if let Some(r) = refused(*kind, name, &ns, e)? {
                    warn!(run = %reconcile::run_key(run), ?kind, %name, message = %r.message, "child delete refused");
                    rejections.push(r);
                }
            }
        }
    }
    Ok(rejections)
}

/// The plan's Workload status changes ([`kueue::StatusWrite`]): each a read of the whole
/// Workload, the change, and a write-back conditional on its resourceVersion (a 409, Kueue
/// having written meanwhile, is retried with the reconcile). Kueue's own integrations write
/// these conditions the same way.
async fn write_workload_statuses(
    run: &RltRun,
    plan: &Plan,
    ctx: &Context,
) -> Result<Vec<Rejection>, Error> {
    let ns = run.namespace().unwrap_or_default();
    let ar = kube::api::ApiResource::erase::<Workload>(&());
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
    let mut rejections = Vec::new();
    for write in &plan.workload_writes {
        let name = write.name();
        let Some(current) = api.get_opt(name).await? else {
            continue;
        };
        let mut object = serde_json::to_value(&current).expect("objects serialize");
        let stamp = now()
            .0
            .round(k8s_openapi::jiff::Unit::Second)
            .expect("rounds");
        write.apply_to(&mut object, &stamp.to_string());
        let body: kube::api::DynamicObject =
            serde_json::from_value(object).expect("still an object");
        match api.replace_status(name, &Default::default(), &body).await {
            Ok(_) => {
                info!(run = %reconcile::run_key(run), workload = %name, change = ?write, "workload status written")
            }
            // Kueue wrote it meanwhile: the reconcile starts over from the new object.
            Err(kube::Error::Api(s)) if s.code == 409 => return Err(kube::Error::Api(s).into()),
            Err(e) => {
                if let Some(r) = refused(Kind::Workload, name, &ns, e)? {
                    warn!(run = %reconcile::run_key(run), workload = %name, message = %r.message, "workload status refused");
                    rejections.push(r);
                }
            }
        }
    }
    Ok(rejections)
}

async fn delete<K>(
    client: Client,
    ns: &str,
    name: &str,
    dp: &DeleteParams,
) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    Api::<K>::namespaced(client, ns)
        .delete(name, dp)
        .await
        .map(|_| ())
}

/// A 4xx other than 408/429 is the API server's final word on this request: retrying the
/// same write cannot help.
fn is_final(code: u16) -> bool {
    (400..500).contains(&code) && code != 408 && code != 429
}

/// Turns a refused write into a [`Rejection`]; anything else stays an error (retried).
fn refused(kind: Kind, name: &str, ns: &str, e: kube::Error) -> Result<Option<Rejection>, Error> {
    match e {
        kube::Error::Api(s) if is_final(s.code) => Ok(Some(Rejection {
            kind,
            name: name.into(),
            reason: if s.code == 409 {
                CHILD_CONFLICT
            } else {
                CHILD_REJECTED
            },
            message: format!(
                "{kind:?} {ns}/{name} was refused: {} {}: {}",
                s.code, s.reason, s.message
            ),
        })),
        e => Err(e.into()),
    }
}

/// Server-side applies a child. One the run is observed to own is applied with `force` (the
/// operator's desired state wins over manual edits). One not observed is read by name first:
/// a same-named object the run does not own is a conflict, never adopted; when it is absent,
/// the apply (which creates it) is not forced, so an object created meanwhile by someone else
/// conflicts (409) rather than being taken over.
async fn apply<K>(
    api: Api<K>,
    run: &RltRun,
    kind: Kind,
    obj: &K,
    observed: bool,
) -> Result<Option<Rejection>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut pp = PatchParams::apply(FIELD_MANAGER);
    if observed {
        pp = pp.force();
    } else if let Some(existing) = api.get_opt(&name).await? {
        if retained_workspace(run, kind, existing.meta()) {
            // An earlier run's retained claim: used as it is, never rewritten.
            return Ok(None);
        }
        if !owned(run, existing.meta()) {
            return Ok(Some(not_owned(run, kind, &name, existing.meta())));
        }
        // Ours, only not listed (its labels were edited): take it back.
        pp = pp.force();
    }
    // SSA needs apiVersion/kind in the body; k8s-openapi types serialize them.
    api.patch(&name, &pp, &Patch::Apply(obj)).await?;
    Ok(None)
}

fn not_owned(run: &RltRun, kind: Kind, name: &str, meta: &ObjectMeta) -> Rejection {
    let owners: Vec<String> = meta
        .owner_references
        .iter()
        .flatten()
        .map(|o| format!("{}/{}", o.kind, o.name))
        .collect();
    let by = if owners.is_empty() {
        "no owner".to_string()
    } else {
        format!("owned by {}", owners.join(", "))
    };
    Rejection {
        kind,
        name: name.into(),
        reason: CHILD_CONFLICT,
        message: format!(
            "{kind:?} {}/{name} already exists and is not owned by this RltRun ({by}): \
             rename or delete it; the operator never adopts it",
            run.namespace().unwrap_or_default()
        ),
    }
}

/// Reports a watch's progress to the probes ([`Health`]): registered now, listed at its first
/// full list (`InitDone`), failing while its events are errors.
fn tracked<K>(
    health: &Health,
    name: &'static str,
) -> impl FnMut(watcher::Result<watcher::Event<K>>) -> watcher::Result<watcher::Event<K>> {
    health.watch_started(name);
    let health = health.clone();
    move |event| {
        match &event {
            Ok(watcher::Event::InitDone) => health.synced(name),
            Ok(_) => health.watch_ok(name),
            Err(e) => health.watch_error(name, e.to_string(), Instant::now()),
        }
        event
    }
}

/// Failed reconciles (5xx, network, a stale cache's 409 on the status) are retried with
/// exponential backoff per run.
fn error_policy(run: Arc<RltRun>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut failures = ctx.failures.lock().unwrap();
        let n = failures.entry(reconcile::run_key(&run)).or_insert(0);
        *n += 1;
        *n
    };
    let after = ctx.backoff(n);
    warn!(run = %reconcile::run_key(&run), %error, failures = n, retry_s = after.as_secs_f64(), "reconcile failed; retrying");
    Action::requeue(after)
}

/// Runs the controller until shutdown. The main watch is filtered by generation (our own
/// status writes do not trigger reconciles). Children, pods and `FailedCreate` Events are
/// watched into the stores a reconcile reads ([`crate::cache`]), each change also triggering
/// its run's reconcile: children through owner references, pods through their `rlt.dev/run`
/// label, Events through the Job they are about. The figures poller runs beside it. Every
/// watch's progress feeds the health probes.
pub async fn run(ctx: Arc<Context>, feeds: Feeds, health: Health) {
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
    health.controller_started(Instant::now());
    let main = watcher(runs, watcher::Config::default())
        .default_backoff()
        .map(tracked(&health, http::RUNS_WATCH))
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());

    let Writers {
        config_maps,
        claims,
        jobs,
        stateful_sets,
        services,
        pods,
        failed_creates,
        kueue: kueue_writers,
    } = feeds.writers;
    // Metadata-only watches of the children whose content the reconciler does not read.
    fn metadata<K>(
        api: Api<cache::Meta<K>>,
        config: &watcher::Config,
        writer: cache::Writer<cache::Meta<K>>,
        health: &Health,
        name: &'static str,
    ) -> impl futures::Stream<Item = Result<cache::Meta<K>, watcher::Error>> + Send + 'static
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        watcher(api, config.clone())
            .default_backoff()
            .map(tracked(health, name))
            .modify(cache::slim_meta)
            .reflect(writer)
            .touched_objects()
    }
    let job_stream = watcher(api::<Job>(&client, &ns), managed.clone())
        .default_backoff()
        .map(tracked(&health, "jobs"))
        .modify(cache::slim_job)
        .reflect(jobs)
        .touched_objects();
    let pod_stream = watcher(
        api::<Pod>(&client, &ns),
        watcher::Config::default().labels(LABEL_RUN),
    )
    .default_backoff()
    .map(tracked(&health, "pods"))
    .modify(cache::slim_pod)
    .reflect(pods)
    .touched_objects();
    let event_stream = watcher(
        api::<CoreEvent>(&client, &ns),
        watcher::Config::default().fields(activity::FAILED_CREATE_SELECTOR),
    )
    .default_backoff()
    .map(tracked(&health, "events"))
    .modify(cache::slim_meta)
    .reflect(failed_creates)
    .touched_objects();
    let job_store = ctx.stores.jobs.clone();
    let kueue = KueueStreams::new(&client, &ns, ctx.settings.kueue, kueue_writers, &health);

    let poller = {
        let (ctx, runs, s) = (ctx.clone(), reader.clone(), ctx.settings.clone());
        async move {
            ctx.poller
                .run(runs, s.poll_interval, s.poll_concurrency)
                .await
        }
    };
    let config = kube::runtime::controller::Config::default()
        .debounce(ctx.settings.debounce)
        .concurrency(ctx.settings.concurrency);
    let controller = Controller::for_stream(main, reader)
        .with_config(config)
        .owns_stream(metadata(
            api::<cache::Meta<ConfigMap>>(&client, &ns),
            &managed,
            config_maps,
            &health,
            "configmaps",
        ))
        .owns_stream(metadata(
            api::<cache::Meta<PersistentVolumeClaim>>(&client, &ns),
            &managed,
            claims,
            &health,
            "persistentvolumeclaims",
        ))
        .owns_stream(job_stream)
        .owns_stream(metadata(
            api::<cache::Meta<StatefulSet>>(&client, &ns),
            &managed,
            stateful_sets,
            &health,
            "statefulsets",
        ))
        .owns_stream(metadata(
            api::<cache::Meta<Service>>(&client, &ns),
            &managed,
            services,
            &health,
            "services",
        ))
        .owns_stream(kueue.workloads)
        // Read by the reconciles, never a trigger of their own (an admission is a Workload
        // change).
        .watches_stream(kueue.flavors, |_| None)
        .watches_stream(kueue.local_queues, |_| None)
        .watches_stream(kueue.priorities, |_| None)
        .watches_stream(pod_stream, |pod: Pod| {
            let run = pod.labels().get(LABEL_RUN)?.clone();
            Some(ObjectRef::<RltRun>::new(&run).within(&pod.namespace()?))
        })
        .watches_stream(event_stream, move |event: CoreEvent| {
            let about = &event.involved_object;
            let job = job_store
                .get(&ObjectRef::new(about.name.as_deref()?).within(about.namespace.as_deref()?))?;
            let run = job.labels().get(LABEL_RUN)?.clone();
            Some(ObjectRef::<RltRun>::new(&run).within(&job.namespace()?))
        })
        .reconcile_on(feeds.figures_changed)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "controller");
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = poller => {}
    }
}

type Watch<K> = futures::stream::BoxStream<'static, Result<K, watcher::Error>>;

/// The watches of Kueue's objects; empty streams when Kueue is not installed (nothing to
/// watch, and the stores are not waited on).
struct KueueStreams {
    workloads: Watch<Workload>,
    flavors: Watch<ResourceFlavor>,
    local_queues: Watch<cache::Meta<LocalQueue>>,
    priorities: Watch<WorkloadPriorityClass>,
}

impl KueueStreams {
    fn new(
        client: &Client,
        ns: &Option<String>,
        installed: bool,
        w: cache::KueueWriters,
        health: &Health,
    ) -> KueueStreams {
        if !installed {
            return KueueStreams {
                workloads: futures::stream::pending().boxed(),
                flavors: futures::stream::pending().boxed(),
                local_queues: futures::stream::pending().boxed(),
                priorities: futures::stream::pending().boxed(),
            };
        }
        let workloads: Api<Workload> = match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let local_queues: Api<cache::Meta<LocalQueue>> = match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        // Only the queues that make a namespace queued by default.
        let default_queue =
            watcher::Config::default().fields(&format!("metadata.name={}", kueue::DEFAULT_QUEUE));
        KueueStreams {
            workloads: reflected(
                workloads,
                watcher::Config::default().labels(LABEL_RUN),
                w.workloads,
                health,
                "workloads",
                cache::slim_workload,
            ),
            flavors: reflected(
                Api::all(client.clone()),
                watcher::Config::default(),
                w.flavors,
                health,
                "resourceflavors",
                cache::slim_meta,
            ),
            local_queues: reflected(
                local_queues,
                default_queue,
                w.local_queues,
                health,
                "localqueues",
                cache::slim_meta,
            ),
            priorities: reflected(
                Api::all(client.clone()),
                watcher::Config::default(),
                w.priorities,
                health,
                "workloadpriorityclasses",
                cache::slim_meta,
            ),
        }
    }
}

/// A watch into its store, slimmed, tracked by the probes under `name`.
fn reflected<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: cache::Writer<K>,
    health: &Health,
    name: &'static str,
    slim: fn(&mut K),
) -> Watch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(tracked(health, name))
        .modify(slim)
        .reflect(writer)
        .touched_objects()
        .boxed()
}

/// Whether Kueue's Workload API (`kueue.x-k8s.io/v1beta2`) is served.
pub async fn kueue_installed(client: &Client) -> Result<bool, kube::Error> {
    let group = kube::discovery::Discovery::new(client.clone())
        .filter(&["kueue.x-k8s.io"])
        .run()
        .await?;
    Ok(group.get("kueue.x-k8s.io").is_some_and(|g| {
        g.versioned_resources("v1beta2")
            .iter()
            .any(|(r, _)| r.kind == "Workload")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_4xx_are_not_retried() {
        for code in [400, 403, 404, 409, 410, 422] {
            assert!(is_final(code), "{code}");
        }
        for code in [408, 429, 500, 503, 504] {
            assert!(!is_final(code), "{code}");
        }
    }
}
