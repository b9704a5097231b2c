//! The controller's view of the cluster: reflector stores fed by the watches that trigger
//! reconciles anyway (children and pods by label, `FailedCreate` Events), so a reconcile reads
//! memory and never LISTs. Children whose content the reconciler does not read (ConfigMaps,
//! claims, StatefulSets, Services) are watched as metadata only; Jobs and pods keep their
//! status but drop their pod template, spec and managed fields, which are most of their bytes.
//!
//! [`snapshot`] is what one reconcile reads: the run's children, pods and Events, picked out of
//! the stores by namespace and the `rlt.dev/run` label and narrowed to this run instance by
//! owner UID.
use crate::activity::{self, Activity};
use crate::children::{names, Kind, LABEL_RUN};
use crate::kueue::{self, LocalQueue, ResourceFlavor, Workload, WorkloadPriorityClass};
use crate::observe::{self, JobState, Observed};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Event, PersistentVolumeClaim, Pod, PodSpec, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;
pub use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, Store};
use kube::{Resource, ResourceExt};
use rlt_api::RltRun;
use std::sync::Arc;
use std::time::Duration;

/// A child watched as metadata only.
pub type Meta<K> = PartialObjectMeta<K>;

/// Read halves of the stores (cheap to clone).
#[derive(Clone)]
pub struct Stores {
    pub config_maps: Store<Meta<ConfigMap>>,
    pub claims: Store<Meta<PersistentVolumeClaim>>,
    pub jobs: Store<Job>,
    pub stateful_sets: Store<Meta<StatefulSet>>,
    pub services: Store<Meta<Service>>,
    pub pods: Store<Pod>,
    pub failed_creates: Store<Event>,
    pub kueue: KueueStores,
}

/// Kueue's objects a reconcile reads, when Kueue is installed (else never filled or waited on).
#[derive(Clone)]
pub struct KueueStores {
    pub installed: bool,
    pub workloads: Store<Workload>,
    pub flavors: Store<ResourceFlavor>,
    pub local_queues: Store<Meta<LocalQueue>>,
    pub priorities: Store<WorkloadPriorityClass>,
}

pub struct KueueWriters {
    pub workloads: Writer<Workload>,
    pub flavors: Writer<ResourceFlavor>,
    pub local_queues: Writer<Meta<LocalQueue>>,
    pub priorities: Writer<WorkloadPriorityClass>,
}

/// Write halves: each goes to the watch stream that fills its store.
pub struct Writers {
    pub config_maps: Writer<Meta<ConfigMap>>,
    pub claims: Writer<Meta<PersistentVolumeClaim>>,
    pub jobs: Writer<Job>,
    pub stateful_sets: Writer<Meta<StatefulSet>>,
    pub services: Writer<Meta<Service>>,
    pub pods: Writer<Pod>,
    pub failed_creates: Writer<Event>,
    pub kueue: KueueWriters,
}

/// The stores and their writers; `kueue`: whether Kueue's Workload API is served.
pub fn stores(kueue: bool) -> (Stores, Writers) {
    let (config_maps, w_config_maps) = reflector::store();
    let (claims, w_claims) = reflector::store();
    let (jobs, w_jobs) = reflector::store();
    let (stateful_sets, w_stateful_sets) = reflector::store();
    let (services, w_services) = reflector::store();
    let (pods, w_pods) = reflector::store();
    let (failed_creates, w_failed_creates) = reflector::store();
    let (workloads, w_workloads) = reflector::store();
    let (flavors, w_flavors) = reflector::store();
    let (local_queues, w_local_queues) = reflector::store();
    let (priorities, w_priorities) = reflector::store();
    (
        Stores {
            config_maps,
            claims,
            jobs,
            stateful_sets,
            services,
            pods,
            failed_creates,
            kueue: KueueStores {
                installed: kueue,
                workloads,
                flavors,
                local_queues,
                priorities,
            },
        },
        Writers {
            config_maps: w_config_maps,
            claims: w_claims,
            jobs: w_jobs,
            stateful_sets: w_stateful_sets,
            services: w_services,
            pods: w_pods,
            failed_creates: w_failed_creates,
            kueue: KueueWriters {
                workloads: w_workloads,
                flavors: w_flavors,
                local_queues: w_local_queues,
                priorities: w_priorities,
            },
        },
    )
}

impl Stores {
    /// Waits until every store holds its first complete LIST: before that, a run's children
    /// would look absent and the reconciler would try to create them again.
    pub async fn ready(&self) {
        // A dropped writer means the controller is shutting down; nothing to wait for then.
        let _ = futures::join!(
            self.config_maps.wait_until_ready(),
            self.claims.wait_until_ready(),
            self.jobs.wait_until_ready(),
            self.stateful_sets.wait_until_ready(),
            self.services.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.failed_creates.wait_until_ready(),
        );
        let k = &self.kueue;
        if k.installed {
            let _ = futures::join!(
                k.workloads.wait_until_ready(),
                k.flavors.wait_until_ready(),
                k.local_queues.wait_until_ready(),
                k.priorities.wait_until_ready(),
            );
        }
    }
}

/// Drops what the reconciler never reads from the objects it keeps in full.
pub fn slim_job(job: &mut Job) {
    job.managed_fields_mut().clear();
    if let Some(spec) = job.spec.as_mut() {
        spec.template = Default::default();
    }
}

pub fn slim_pod(pod: &mut Pod) {
    pod.managed_fields_mut().clear();
    // Of the spec, only the containers' resources: the GPUs its GPU-hours count.
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        containers: spec
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                resources: c.resources,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    });
}

/// Kueue's Workloads: their pod sets are not read back.
pub fn slim_workload(w: &mut Workload) {
    w.managed_fields_mut().clear();
    w.spec.pod_sets.clear();
}

pub fn slim_meta<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
}

/// The objects of one run (by namespace and `rlt.dev/run` label).
fn of_run<K: Resource + Clone>(store: &Store<K>, ns: &str, run: &str) -> Vec<Arc<K>>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state_filter(|o| {
        o.meta().namespace.as_deref() == Some(ns)
            && o.meta()
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_RUN))
                .is_some_and(|r| r == run)
    })
}

/// Only children owned by this run instance (a same-named run recreated later has another UID).
pub fn owned(run: &RltRun, meta: &ObjectMeta) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == run.metadata.uid.as_ref())
}

/// A workspace claim the operator created for an earlier run of this name with
/// `retainPolicy: Retain` (it has no owner, so it outlived that run): this run uses it again,
/// in a directory of its own.
pub fn retained_workspace(run: &RltRun, kind: Kind, meta: &ObjectMeta) -> bool {
    kind == Kind::PersistentVolumeClaim
        && meta.owner_references.as_ref().is_none_or(Vec::is_empty)
        && meta.name.as_deref() == Some(names::workspace(&run.name_any()).as_str())
        && meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_RUN))
            .is_some_and(|r| *r == run.name_any())
}

/// What one reconcile reads.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub observed: Observed,
    pub activity: Activity,
    /// A stage Job is running without pods: look again soon.
    pub podless: bool,
}

/// The run's children, pods and `FailedCreate` Events, from the stores.
pub fn snapshot(stores: &Stores, run: &RltRun, now: Timestamp) -> Snapshot {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let jobs: Vec<Arc<Job>> = of_run(&stores.jobs, &ns, &name)
        .into_iter()
        .filter(|j| owned(run, &j.metadata))
        .collect();
    let pods = of_run(&stores.pods, &ns, &name);
    let mut obs = Observed::default();
    let workloads: Vec<Arc<Workload>> = of_run(&stores.kueue.workloads, &ns, &name)
        .into_iter()
        .filter(|w| owned(run, &w.metadata))
        .collect();
    obs.fleet = fleet(&stores.kueue, &ns);
    obs.workloads = workloads
        .iter()
        .map(|w| kueue::observe(w, &obs.fleet.flavors))
        .collect();
    let metas: [(Kind, Vec<ObjectMeta>); 6] = [
        (Kind::ConfigMap, metas(&stores.config_maps, &ns, &name)),
        (
            Kind::PersistentVolumeClaim,
            metas(&stores.claims, &ns, &name),
        ),
        (Kind::Job, jobs.iter().map(|j| j.metadata.clone()).collect()),
        (Kind::StatefulSet, metas(&stores.stateful_sets, &ns, &name)),
        (Kind::Service, metas(&stores.services, &ns, &name)),
        (
            Kind::Workload,
            workloads.iter().map(|w| w.metadata.clone()).collect(),
        ),
    ];
    for (kind, list) in metas {
        obs.children.extend(
            list.iter()
                .filter(|m| owned(run, m) || retained_workspace(run, kind, m))
                .map(|m| observe::child(kind, m)),
        );
    }
    obs.jobs = jobs.iter().map(|j| observe::job(j)).collect();
    obs.pods = pods.iter().map(|p| observe::pod(p)).collect();

    let mut activity = Activity::from_pods(&pods);
    let running = |j: &&Arc<Job>| observe::job(j).state == JobState::Running;
    // A Job with no pods at all right after creation is normal; one that stays so is stuck.
    let podless = jobs
        .iter()
        .filter(running)
        .any(|j| activity::is_podless(j, &pods, now, Duration::ZERO));
    for job in jobs
        .iter()
        .filter(running)
        .filter(|j| activity::is_podless(j, &pods, now, activity::PODLESS_GRACE))
    {
        let uid = job.metadata.uid.as_deref();
        let events = stores
            .failed_creates
            .state_filter(|e| e.involved_object.uid.as_deref() == uid);
        if let Some(message) = activity::latest_failed_create(&events) {
            activity.failed_create.push((job.name_any(), message));
        }
    }
    Snapshot {
        observed: obs,
        activity,
        podless,
    }
}

/// What a reconcile knows of Kueue for a run in namespace `ns`.
fn fleet(k: &KueueStores, ns: &str) -> kueue::Fleet {
    if !k.installed {
        return kueue::Fleet::default();
    }
    kueue::Fleet {
        installed: true,
        default_queue: k
            .local_queues
            .get(&reflector::ObjectRef::new(kueue::DEFAULT_QUEUE).within(ns))
            .is_some(),
        flavors: k
            .flavors
            .state()
            .iter()
            .map(|f| (f.name_any(), kueue::Placement::from(f.as_ref())))
            .collect(),
        priorities: k
            .priorities
            .state()
            .iter()
            .map(|p| (p.name_any(), p.value))
            .collect(),
    }
}

fn metas<K: Clone>(store: &Store<Meta<K>>, ns: &str, run: &str) -> Vec<ObjectMeta>
where
    Meta<K>: Resource,
    <Meta<K> as Resource>::DynamicType: Eq + std::hash::Hash + Clone,
{
    of_run(store, ns, run)
        .iter()
        .map(|m| m.metadata.clone())
        .collect()
}
