//! The controller against a mocked API server (kube's tower-test pattern): a reconcile is run
//! for real against the controller's stores filled with a world of objects (what its watches
//! would have put there), every HTTP request it makes is recorded and answered, and the tests
//! assert the exact requests (reads by name, server-side applies, status, Events), or that
//! there are none.
use http::{Request, Response};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service};
use kube::client::Body;
use kube::core::{PartialObjectMeta, PartialObjectMetaExt};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Client, Resource};
use rlt_api::RltRun;
use rlt_operator::cache::Writers;
use rlt_operator::children::{self, Child, Ctx, Stage};
use rlt_operator::controller::{reconcile, Context, Error, Feeds, Settings};
use rlt_operator::figures::Figures;
use rlt_operator::metrics::Metrics;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tower_test::mock;

const TINY: &str = include_str!("../../api/tests/good/tiny-cpu.yaml");
const JOBS: &str = "/apis/batch/v1/namespaces/ml/jobs";
const PODS: &str = "/api/v1/namespaces/ml/pods";
const STATUS: &str = "/apis/rlt.dev/v1alpha1/namespaces/ml/rltruns/tiny-cpu/status";

fn tiny_run() -> RltRun {
    let mut run = rlt_api::parse_yaml(TINY).unwrap();
    run.metadata.namespace = Some("ml".into());
    run.metadata.uid = Some("uid-1".into());
    run.metadata.generation = Some(1);
    run.metadata.resource_version = Some("100".into());
    run
}

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    uri: String,
    body: Value,
}

impl Recorded {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.uri)
    }
}

/// What the mocked API server holds: objects per collection path (in the controller's stores,
/// and read by name), and canned refusals per "METHOD path" (HTTP code, reason, message).
#[derive(Default)]
struct Cluster {
    objects: BTreeMap<String, Vec<Value>>,
    refuse: BTreeMap<String, (u16, &'static str, String)>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
           "reason": reason, "message": message})
}

/// Answers requests like an API server holding `cluster`, recording each request; returns
/// the log when the client is dropped.
fn api_server(
    handle: mock::Handle<Request<Body>, Response<Body>>,
    run: RltRun,
    cluster: Arc<Mutex<Cluster>>,
) -> tokio::task::JoinHandle<Vec<Recorded>> {
    tokio::spawn(async move {
        let mut handle = handle;
        let mut log = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (path, query) = uri.split_once('?').unwrap_or((&uri, ""));
            let path = path.to_string();
            let (code, response) = {
                let c = cluster.lock().unwrap();
                if let Some((code, reason, message)) = c.refuse.get(&format!("{method} {path}")) {
                    (*code, status_body(*code, reason, message))
                } else {
                    match method.as_str() {
                        "GET" if query.contains("Selector=") => {
                            panic!("a reconcile LISTed: {method} {uri}")
                        }
                        "GET" => {
                            let (collection, name) = path.rsplit_once('/').unwrap();
                            let found = c.objects.get(collection).and_then(|items| {
                                items
                                    .iter()
                                    .find(|o| o["metadata"]["name"] == name)
                                    .cloned()
                            });
                            match found {
                                Some(o) => (200, o),
                                None => (
                                    404,
                                    status_body(404, "NotFound", &format!("\"{name}\" not found")),
                                ),
                            }
                        }
                        "PATCH" if path.ends_with("/status") => {
                            let mut r = serde_json::to_value(&run).unwrap();
                            r["status"] = body["status"].clone();
                            r["metadata"]["resourceVersion"] = "101".into();
                            (200, r)
                        }
                        "DELETE" => (
                            200,
                            json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                        ),
                        _ => (200, body.clone()),
                    }
                }
            };
            log.push(Recorded { method, uri, body });
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&response).unwrap()))
                    .unwrap(),
            );
        }
        log
    })
}

fn context(client: Client) -> (Arc<Context>, Feeds) {
    let (ctx, feeds) = Context::new(
        client,
        Metrics::default(),
        Figures::Fixed(None),
        Settings::default(),
        Some("test".into()),
    );
    (Arc::new(ctx), feeds)
}

/// Replaces a store's content, as a watch's (re-)LIST does.
fn relist<K: Resource<DynamicType = ()> + Clone>(writer: &mut Writer<K>, items: Vec<K>) {
    writer.apply_watcher_event(&watcher::Event::Init);
    for item in items {
        writer.apply_watcher_event(&watcher::Event::InitApply(item));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
}

/// Puts `objects` into the controller's stores: what its watches would have seen. Only
/// objects labelled with a run are watched (children and pods; Events by reason).
fn fill(writers: &mut Writers, objects: &BTreeMap<String, Vec<Value>>) {
    let of = |collection: &str| -> Vec<Value> {
        objects
            .iter()
            .filter(|(path, _)| path.ends_with(collection))
            .flat_map(|(_, items)| items.clone())
            .collect()
    };
    fn full<K: DeserializeOwned>(items: Vec<Value>, labelled: bool) -> Vec<K> {
        items
            .into_iter()
            .filter(|v| !labelled || v["metadata"]["labels"]["rlt.dev/run"].is_string())
            .map(|v| serde_json::from_value(v).unwrap())
            .collect()
    }
    fn meta<K: Resource<DynamicType = ()> + DeserializeOwned>(
        items: Vec<Value>,
    ) -> Vec<PartialObjectMeta<K>> {
        full::<K>(items, true)
            .into_iter()
            .map(|o| o.meta().clone().into_response_partial())
            .collect()
    }
    relist(
        &mut writers.config_maps,
        meta::<ConfigMap>(of("/configmaps")),
    );
    relist(
        &mut writers.claims,
        meta::<PersistentVolumeClaim>(of("/persistentvolumeclaims")),
    );
    relist(&mut writers.jobs, full(of("/jobs"), true));
    relist(
        &mut writers.stateful_sets,
        meta::<StatefulSet>(of("/statefulsets")),
    );
    relist(&mut writers.services, meta::<Service>(of("/services")));
    relist(&mut writers.pods, full(of("/pods"), true));
    relist(&mut writers.failed_creates, full(of("/events"), false));
}

/// Runs reconciles of the given runs, one after the other, with one controller context (one
/// Event recorder) whose stores hold the cluster's objects; returns their results and every
/// request made.
async fn reconciles(
    runs: Vec<RltRun>,
    cluster: Arc<Mutex<Cluster>>,
) -> (Vec<Result<(), Error>>, Vec<Recorded>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = api_server(handle, runs[0].clone(), cluster.clone());
    let (ctx, mut feeds) = context(Client::new(service, "default"));
    fill(&mut feeds.writers, &cluster.lock().unwrap().objects);
    let mut results = Vec::new();
    for run in runs {
        results.push(reconcile(Arc::new(run), ctx.clone()).await.map(|_| ()));
    }
    drop(ctx);
    (results, server.await.unwrap())
}

async fn run_reconcile(run: RltRun, objects: BTreeMap<String, Vec<Value>>) -> Vec<Recorded> {
    let cluster = Arc::new(Mutex::new(Cluster {
        objects,
        ..Default::default()
    }));
    let (results, log) = reconciles(vec![run], cluster).await;
    results
        .into_iter()
        .next()
        .unwrap()
        .expect("reconcile succeeds");
    log
}

fn writes(log: &[Recorded]) -> Vec<String> {
    log.iter()
        .filter(|r| r.method != "GET")
        .map(Recorded::line)
        .collect()
}

/// The Events published (created or patched).
fn events(log: &[Recorded]) -> Vec<&Recorded> {
    log.iter()
        .filter(|r| r.uri.contains("/events") && r.method != "GET")
        .collect()
}

const STATUS_APPLY: &str = "PATCH /apis/rlt.dev/v1alpha1/namespaces/ml/rltruns/tiny-cpu/status?&force=true&fieldManager=rlt-operator";
const EVENT_POST: &str = "POST /apis/events.k8s.io/v1/namespaces/ml/events?";

#[tokio::test]
async fn a_new_run_records_its_status_first_then_its_events_then_creates_its_children() {
    let log = run_reconcile(tiny_run(), BTreeMap::new()).await;
    let lines: Vec<String> = log.iter().map(Recorded::line).collect();
    assert_eq!(
        lines,
        [
            STATUS_APPLY,
            EVENT_POST,
            EVENT_POST,
            // Not observed: read by name first (absent), then created by an unforced apply.
            "GET /api/v1/namespaces/ml/persistentvolumeclaims/tiny-cpu-workspace",
            "PATCH /api/v1/namespaces/ml/persistentvolumeclaims/tiny-cpu-workspace?&fieldManager=rlt-operator",
            // The attempt's configuration snapshot before the Job whose pods mount it.
            "GET /api/v1/namespaces/ml/configmaps/tiny-cpu-config-warmup-0",
            "PATCH /api/v1/namespaces/ml/configmaps/tiny-cpu-config-warmup-0?&fieldManager=rlt-operator",
            "GET /apis/batch/v1/namespaces/ml/jobs/tiny-cpu-warmup-0",
            "PATCH /apis/batch/v1/namespaces/ml/jobs/tiny-cpu-warmup-0?&fieldManager=rlt-operator",
        ]
    );
    // Status: SSA of the status subresource, conditional on the run's resourceVersion;
    // phase derived from conditions.
    let status_write = &log[0].body;
    assert_eq!(status_write["metadata"]["resourceVersion"], "100");
    let status = &status_write["status"];
    assert_eq!(status["phase"], "WarmUp");
    assert_eq!(status["stages"]["warmup"]["attempt"], 0);
    assert_eq!(status["conditions"][0]["type"], "WarmupComplete");
    assert_eq!(status["conditions"][0]["observedGeneration"], 1);
    // The config the trainer reads is the run itself, defaults filled in.
    let cm = &log[6].body;
    assert_eq!(cm["immutable"], true);
    let config = cm["data"]["run.yaml"].as_str().unwrap();
    let mut parsed = rlt_api::parse_yaml(config).expect("rendered config validates");
    // ... and the run's own workspace directory, keyed by its UID.
    assert_eq!(
        parsed.spec.workspace.directory.take().as_deref(),
        Some("tiny-cpu-uid1")
    );
    assert_eq!(parsed.spec, tiny_run().spec);
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    // The warm-up pod follows the stage contract.
    let job = &log[8].body;
    assert_eq!(job["kind"], "Job");
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["command"],
        json!(["rlt-trainer", "warmup"])
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let ev = events(&log);
    let reasons: Vec<&str> = ev
        .iter()
        .map(|r| r.body["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["StageStarted", "PhaseChanged"]);
    assert_eq!(ev[1].body["note"], "Pending -> WarmUp");
    assert_eq!(ev[1].body["regarding"]["name"], "tiny-cpu");
    assert_eq!(ev[0].body["action"], "WarmUpAttempt0");
    assert_eq!(ev[1].body["action"], "ToWarmUp");
}

/// What the API server holds after the first reconcile: the children.
fn existing_children(run: &RltRun) -> BTreeMap<String, Vec<Value>> {
    let ctx = Ctx::new(run);
    let mut objects: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut put = |path: &str, child: Child| {
        objects
            .entry(path.into())
            .or_default()
            .push(child.to_json());
    };
    put(
        "/api/v1/namespaces/ml/configmaps",
        children::config_map(&ctx, Stage::Warmup, 0),
    );
    put(
        "/api/v1/namespaces/ml/persistentvolumeclaims",
        children::workspace_pvc(&ctx).unwrap(),
    );
    put(JOBS, children::warmup_job(&ctx, 0));
    objects
}

/// The run as the first reconcile left it (status written).
fn started_run() -> RltRun {
    let mut run = tiny_run();
    let plan = rlt_operator::reconcile::reconcile(
        &run,
        &Default::default(),
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    run.status = plan.status;
    run
}

fn fail_job(objects: &mut BTreeMap<String, Vec<Value>>, name: &str) {
    let job = objects
        .get_mut(JOBS)
        .unwrap()
        .iter_mut()
        .find(|j| j["metadata"]["name"] == name)
        .unwrap();
    job["status"] = json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]});
}

fn failed_pod(attempt: u32, message: &str) -> Value {
    json!({"metadata": {"name": format!("tiny-cpu-warmup-{attempt}-0-abcde"), "namespace": "ml", "labels": {"rlt.dev/run": "tiny-cpu",
            "rlt.dev/stage": "warmup", "rlt.dev/attempt": attempt.to_string(),
            "batch.kubernetes.io/job-name": format!("tiny-cpu-warmup-{attempt}")}},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"reason": "Error", "exitCode": 1, "message": message}}}]}})
}

#[tokio::test]
async fn a_reconcile_that_finds_nothing_to_change_makes_no_request() {
    let run = started_run();
    let objects = existing_children(&run);
    let log = run_reconcile(run, objects).await;
    assert!(
        log.is_empty(),
        "no-op reconcile asked the API server: {:#?}",
        log.iter().map(Recorded::line).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_retry_is_recorded_before_the_next_attempt_starts_and_the_failed_job_is_kept() {
    let run = started_run();
    let mut objects = existing_children(&run);
    fail_job(&mut objects, "tiny-cpu-warmup-0");
    objects.insert(
        PODS.into(),
        vec![failed_pod(0, "loading the teacher: unexpected end of file")],
    );
    let log = run_reconcile(run, objects).await;
    assert_eq!(
        writes(&log),
        [
            STATUS_APPLY,
            EVENT_POST,
            // The new attempt's snapshot and Job; the failed attempt's stays with its Job.
            "PATCH /api/v1/namespaces/ml/configmaps/tiny-cpu-config-warmup-1?&fieldManager=rlt-operator",
            "PATCH /apis/batch/v1/namespaces/ml/jobs/tiny-cpu-warmup-1?&fieldManager=rlt-operator",
        ]
    );
    let event = events(&log)[0];
    assert_eq!(
        (event.body["type"].as_str(), event.body["reason"].as_str()),
        (Some("Warning"), Some("Retrying"))
    );
    let note = event.body["note"].as_str().unwrap();
    assert!(
        note.contains("exited with code 1: loading the teacher: unexpected end of file"),
        "{note}"
    );
    let status = &log.iter().find(|r| r.uri.contains("/status")).unwrap().body["status"];
    assert_eq!(status["stages"]["warmup"]["attempt"], 1);
    assert_eq!(status["stages"]["warmup"]["failures"], 1);
}

#[tokio::test]
async fn a_stale_cache_gets_a_conflict_on_the_status_and_touches_no_child() {
    let run = started_run();
    let mut objects = existing_children(&run);
    fail_job(&mut objects, "tiny-cpu-warmup-0");
    let cluster = Arc::new(Mutex::new(Cluster {
        objects,
        refuse: [(
            format!("PATCH {STATUS}"),
            (409, "Conflict", "the object has been modified".to_string()),
        )]
        .into(),
    }));
    let (results, log) = reconciles(vec![run], cluster).await;
    assert!(matches!(&results[0], Err(Error::Kube(kube::Error::Api(s))) if s.code == 409));
    assert_eq!(writes(&log), [STATUS_APPLY]);
}

#[tokio::test]
async fn a_refused_child_write_reaches_the_conditions_and_a_warning_event_not_a_retry_loop() {
    let run = started_run();
    let mut objects = existing_children(&run);
    fail_job(&mut objects, "tiny-cpu-warmup-0");
    let message = "Job.batch \"tiny-cpu-warmup-1\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit";
    let cluster = Arc::new(Mutex::new(Cluster {
        objects,
        refuse: [(
            format!("PATCH {JOBS}/tiny-cpu-warmup-1"),
            (422, "Invalid", message.to_string()),
        )]
        .into(),
    }));
    let (results, log) = reconciles(vec![run], cluster).await;
    results[0]
        .as_ref()
        .expect("a refusal is no reconcile error");
    assert_eq!(
        writes(&log),
        [
            STATUS_APPLY,
            // The retry's Event, then the refused Job, then Degraded and its Warning.
            EVENT_POST,
            "PATCH /api/v1/namespaces/ml/configmaps/tiny-cpu-config-warmup-1?&fieldManager=rlt-operator",
            "PATCH /apis/batch/v1/namespaces/ml/jobs/tiny-cpu-warmup-1?&fieldManager=rlt-operator",
            STATUS_APPLY,
            EVENT_POST,
        ]
    );
    let statuses: Vec<&Recorded> = log.iter().filter(|r| r.uri.contains("/status")).collect();
    // The second status write builds on the first: conditional on its resourceVersion.
    assert_eq!(statuses[1].body["metadata"]["resourceVersion"], "101");
    let degraded = statuses[1].body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ChildRejected");
    let text = degraded["message"].as_str().unwrap();
    assert!(
        text.contains("Job ml/tiny-cpu-warmup-1 was refused: 422 Invalid: ")
            && text.contains(message),
        "{text}"
    );
    let ev = events(&log);
    assert_eq!(ev[1].body["type"], "Warning");
    assert_eq!(ev[1].body["reason"], "ChildRejected");
    assert_eq!(ev[1].body["action"], "ApplyJob/tiny-cpu-warmup-1");
}

#[tokio::test]
async fn a_child_write_that_fails_after_the_status_write_loses_no_event() {
    // The status records WarmUp; the Job's create then fails. The next reconcile finds the
    // transition done and says nothing, so its Events must already be out.
    let cluster = Arc::new(Mutex::new(Cluster {
        objects: BTreeMap::new(),
        refuse: [(
            format!("PATCH {JOBS}/tiny-cpu-warmup-0"),
            (503, "ServiceUnavailable", "etcd leader changed".to_string()),
        )]
        .into(),
    }));
    let (results, log) = reconciles(vec![tiny_run()], cluster).await;
    assert!(results[0].is_err());
    let reasons: Vec<&str> = events(&log)
        .iter()
        .map(|r| r.body["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["StageStarted", "PhaseChanged"]);
}

#[tokio::test]
async fn a_server_error_on_a_child_write_is_retried_with_backoff() {
    let run = started_run();
    let mut objects = existing_children(&run);
    objects.get_mut(JOBS).unwrap().clear(); // the Job must be (re)created
    let cluster = Arc::new(Mutex::new(Cluster {
        objects,
        refuse: [(
            format!("PATCH {JOBS}/tiny-cpu-warmup-0"),
            (503, "ServiceUnavailable", "etcd leader changed".to_string()),
        )]
        .into(),
    }));
    let (results, log) = reconciles(vec![run], cluster).await;
    assert!(matches!(&results[0], Err(Error::Kube(kube::Error::Api(s))) if s.code == 503));
    assert!(!writes(&log).iter().any(|w| w.contains("/status")));
    let (ctx, _) = context(Client::new(
        mock::pair::<Request<Body>, Response<Body>>().0,
        "default",
    ));
    let backoff: Vec<u64> = (1..=10).map(|n| ctx.backoff(n).as_secs()).collect();
    assert_eq!(backoff, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
}

#[tokio::test]
async fn a_same_named_object_the_run_does_not_own_is_a_conflict_never_adopted() {
    let run = started_run();
    let mut objects = existing_children(&run);
    // Someone else's ConfigMap with the run's config name (not labelled, not owned).
    objects.insert(
        "/api/v1/namespaces/ml/configmaps".into(),
        vec![json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "tiny-cpu-config-warmup-0", "namespace": "ml"}, "data": {"x": "y"}})],
    );
    let log = run_reconcile(run, objects).await;
    assert_eq!(
        writes(&log),
        [STATUS_APPLY, EVENT_POST],
        "no apply on the foreign ConfigMap"
    );
    assert!(log
        .iter()
        .any(|r| r.line() == "GET /api/v1/namespaces/ml/configmaps/tiny-cpu-config-warmup-0"));
    let status = &log.iter().find(|r| r.uri.contains("/status")).unwrap().body["status"];
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(degraded["reason"], "ChildConflict");
    let event = events(&log)[0];
    assert_eq!(event.body["reason"], "ChildConflict");
    let note = event.body["note"].as_str().unwrap();
    assert!(
        note.starts_with("ConfigMap ml/tiny-cpu-config-warmup-0 already exists and is not owned by this RltRun (no owner)"),
        "{note}"
    );
}

#[tokio::test]
async fn a_server_side_apply_conflict_on_create_is_a_conflict() {
    let run = started_run();
    let mut objects = existing_children(&run);
    objects.get_mut(JOBS).unwrap().clear();
    let cluster = Arc::new(Mutex::new(Cluster {
        objects,
        refuse: [(
            format!("PATCH {JOBS}/tiny-cpu-warmup-0"),
            (
                409,
                "Conflict",
                "Apply failed with 1 conflict: conflict with \"kubectl\": .spec.parallelism"
                    .to_string(),
            ),
        )]
        .into(),
    }));
    let (results, log) = reconciles(vec![run], cluster).await;
    results[0].as_ref().unwrap();
    let status = &log.iter().find(|r| r.uri.contains("/status")).unwrap().body["status"];
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(degraded["reason"], "ChildConflict");
    let message = degraded["message"].as_str().unwrap();
    assert!(
        message.contains("409 Conflict: Apply failed with 1 conflict"),
        "{message}"
    );
}

#[tokio::test]
async fn two_failures_with_the_same_reason_are_two_events_not_one_series() {
    // Attempt 0 fails (-> attempt 1), then attempt 1 fails (-> attempt 2): two Retrying Events
    // from one recorder, each created with its own note.
    let first = started_run();
    let mut objects = existing_children(&first);
    fail_job(&mut objects, "tiny-cpu-warmup-0");
    let long = "x".repeat(3000);
    objects.insert(PODS.into(), vec![failed_pod(0, "first failure")]);
    let mut second = first.clone();
    let cluster = Arc::new(Mutex::new(Cluster {
        objects: objects.clone(),
        ..Default::default()
    }));
    // The second reconcile sees attempt 1 (as the first one recorded it) failed too.
    {
        let mut st = first.status.clone().unwrap();
        let w = st.stages.warmup.as_mut().unwrap();
        w.attempt = 1;
        w.failures = 1;
        second.status = Some(st);
    }
    let mut objects2 = objects;
    let ctx = Ctx::new(&second);
    let mut job1 = serde_json::to_value(match children::warmup_job(&ctx, 1) {
        Child::Job(j) => j,
        _ => unreachable!(),
    })
    .unwrap();
    job1["status"] = json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "m"}]});
    objects2.get_mut(JOBS).unwrap().push(job1);
    objects2.insert(
        PODS.into(),
        vec![
            failed_pod(0, "first failure"),
            failed_pod(1, &format!("second failure {long}")),
        ],
    );
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = api_server(handle, first.clone(), cluster.clone());
    let (ctx, mut feeds) = context(Client::new(service, "default"));
    fill(&mut feeds.writers, &cluster.lock().unwrap().objects);
    reconcile(Arc::new(first), ctx.clone()).await.unwrap();
    fill(&mut feeds.writers, &objects2);
    cluster.lock().unwrap().objects = objects2;
    reconcile(Arc::new(second), ctx.clone()).await.unwrap();
    drop(ctx);
    let log = server.await.unwrap();
    let retrying: Vec<&Recorded> = events(&log)
        .into_iter()
        .filter(|r| r.body["reason"] == "Retrying")
        .collect();
    assert_eq!(
        retrying.iter().map(|r| r.line()).collect::<Vec<_>>(),
        [EVENT_POST, EVENT_POST],
        "each transition creates its own Event"
    );
    assert_eq!(retrying[0].body["action"], "WarmUpAttempt1");
    assert_eq!(retrying[1].body["action"], "WarmUpAttempt2");
    let notes: Vec<&str> = retrying
        .iter()
        .map(|r| r.body["note"].as_str().unwrap())
        .collect();
    assert!(notes[0].contains("first failure"), "{}", notes[0]);
    assert!(notes[1].contains("second failure"), "{}", notes[1]);
    assert!(notes[1].len() <= 1024, "note of {} bytes", notes[1].len());
}

#[tokio::test]
async fn a_job_that_cannot_create_pods_is_reported_from_its_failed_create_events() {
    let run = started_run();
    let mut objects = existing_children(&run);
    let job = &mut objects.get_mut(JOBS).unwrap()[0];
    job["metadata"]["uid"] = "job-uid-0".into();
    job["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z".into();
    let quota = "pods \"tiny-cpu-warmup-0-0-x\" is forbidden: exceeded quota: compute, requested: cpu=4, used: cpu=8, limited: cpu=8";
    objects.insert(
        "/api/v1/namespaces/ml/events".into(),
        vec![json!({"metadata": {"name": "tiny-cpu-warmup-0.1"}, "involvedObject": {"kind": "Job", "uid": "job-uid-0"},
            "reason": "FailedCreate", "type": "Warning", "message": quota,
            "lastTimestamp": "2020-01-01T00:00:05Z"})],
    );
    let log = run_reconcile(run, objects).await;
    assert_eq!(writes(&log), [STATUS_APPLY, EVENT_POST]);
    assert_eq!(
        writes(&log).len(),
        log.len(),
        "the Events came from the store"
    );
    let status = &log.iter().find(|r| r.uri.contains("/status")).unwrap().body["status"];
    let c = &status["conditions"][0];
    assert_eq!(
        (c["type"].as_str(), c["reason"].as_str()),
        (Some("WarmupComplete"), Some("FailedCreate"))
    );
    assert_eq!(
        c["message"],
        format!("job tiny-cpu-warmup-0 cannot create its pods: {quota}")
    );
    let event = events(&log)[0];
    assert_eq!(
        (event.body["type"].as_str(), event.body["reason"].as_str()),
        (Some("Warning"), Some("FailedCreate"))
    );
}

/// Every verb the chart grants is one the code calls: the watches (a list, then a watch),
/// reads by name, server-side apply (a PATCH, which also creates), deletes, status applies,
/// Events (created, then patched as a series; core Events watched for `FailedCreate`), and the
/// leader-election Lease (read, created, replaced). The chart states its minimum Kubernetes.
#[test]
fn the_chart_grants_exactly_the_verbs_the_operator_uses() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rbac =
        std::fs::read_to_string(root.join("charts/rlt-operator/templates/rbac.yaml")).unwrap();
    let mut rules = Vec::new();
    let mut groups = String::new();
    let mut resources = String::new();
    for line in rbac.lines().map(str::trim) {
        if let Some(g) = line.strip_prefix("- apiGroups: ") {
            groups = g.to_string();
        } else if let Some(r) = line.strip_prefix("resources: ") {
            resources = r.to_string();
        } else if let Some(v) = line.strip_prefix("verbs: ") {
            rules.push(format!("{groups} {resources} {v}"));
        }
    }
    assert_eq!(
        rules,
        [
            r#"["rlt.dev"] ["rltruns"] ["list", "watch"]"#,
            r#"["rlt.dev"] ["rltruns/status"] ["patch"]"#,
            r#"[""] ["configmaps", "services", "persistentvolumeclaims"] ["get", "list", "watch", "create", "patch", "delete"]"#,
            r#"["batch"] ["jobs"] ["get", "list", "watch", "create", "patch", "delete"]"#,
            r#"["apps"] ["statefulsets"] ["get", "list", "watch", "create", "patch", "delete"]"#,
            r#"[""] ["pods"] ["list", "watch"]"#,
            r#"["events.k8s.io"] ["events"] ["create", "patch"]"#,
            r#"[""] ["events"] ["list", "watch"]"#,
            // Kueue's: a queued run's Workloads and their status, LocalQueues named
            // `default`, and (cluster-wide) flavors and priority classes.
            r#"["kueue.x-k8s.io"] ["workloads"] ["get", "list", "watch", "create", "patch", "delete"]"#,
            r#"["kueue.x-k8s.io"] ["workloads/status"] ["update"]"#,
            r#"["kueue.x-k8s.io"] ["localqueues"] ["list", "watch"]"#,
            r#"["kueue.x-k8s.io"] ["resourceflavors", "workloadpriorityclasses"] ["list", "watch"]"#,
            // Granted to Kueue's manager, which walks a Job's owners up to the RltRun.
            r#"["rlt.dev"] ["rltruns"] ["get", "list", "watch"]"#,
            r#"["coordination.k8s.io"] ["leases"] ["get", "create", "update"]"#,
        ]
    );
    let chart = std::fs::read_to_string(root.join("charts/rlt-operator/Chart.yaml")).unwrap();
    assert!(chart.contains("kubeVersion: \">=1.30.0-0\""), "{chart}");
    let deployment =
        std::fs::read_to_string(root.join("charts/rlt-operator/templates/deployment.yaml"))
            .unwrap();
    assert!(
        deployment.contains("- --leader-elect\n")
            && !deployment.contains("if gt (int .Values.replicaCount) 1"),
        "leader election is always on"
    );
}
