//! The controller against a mocked API server (kube's tower-test pattern): a reconcile is run
//! for real, every HTTP request it makes is recorded and answered, and the tests assert the
//! exact requests (reads, server-side applies, status, Events), or that none are writes.
use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use rlt_api::RltRun;
use rlt_operator::children::{self, Child, Ctx};
use rlt_operator::controller::{reconcile, Context, Settings};
use rlt_operator::figures::Figures;
use rlt_operator::metrics::Metrics;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use tower_test::mock;

const TINY: &str = include_str!("../../api/tests/good/tiny-cpu.yaml");

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

/// Answers requests like an API server holding `objects` (per collection path), recording
/// each request; returns the log when the client is dropped.
fn api_server(
    handle: mock::Handle<Request<Body>, Response<Body>>,
    run: RltRun,
    objects: BTreeMap<String, Vec<Value>>,
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
            let path = uri.split('?').next().unwrap().to_string();
            let response = match method.as_str() {
                "GET" => {
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"},
                                "items": objects.get(&path).cloned().unwrap_or_default()})
                }
                "PATCH" if path.ends_with("/status") => {
                    let mut r = serde_json::to_value(&run).unwrap();
                    r["status"] = body["status"].clone();
                    r
                }
                "DELETE" => json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                _ => body.clone(),
            };
            log.push(Recorded { method, uri, body });
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&response).unwrap()))
                    .unwrap(),
            );
        }
        log
    })
}

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context::new(
        client,
        Metrics::default(),
        Figures::Fixed(None),
        Settings::default(),
        Some("test".into()),
    ))
}

async fn run_reconcile(
    run: RltRun,
    objects: BTreeMap<String, Vec<Value>>,
) -> (Vec<Recorded>, Metrics) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = api_server(handle, run.clone(), objects);
    let ctx = context(Client::new(service, "default"));
    let metrics = ctx.metrics.clone();
    reconcile(Arc::new(run), ctx)
        .await
        .expect("reconcile succeeds");
    (server.await.unwrap(), metrics)
}

const LISTS: [&str; 6] = [
    "GET /api/v1/namespaces/ml/configmaps?&labelSelector=rlt.dev%2Frun%3Dtiny-cpu",
    "GET /api/v1/namespaces/ml/persistentvolumeclaims?&labelSelector=rlt.dev%2Frun%3Dtiny-cpu",
    "GET /apis/batch/v1/namespaces/ml/jobs?&labelSelector=rlt.dev%2Frun%3Dtiny-cpu",
    "GET /apis/apps/v1/namespaces/ml/statefulsets?&labelSelector=rlt.dev%2Frun%3Dtiny-cpu",
    "GET /api/v1/namespaces/ml/services?&labelSelector=rlt.dev%2Frun%3Dtiny-cpu",
    "GET /api/v1/namespaces/ml/pods?&labelSelector=rlt.dev%2Frun%3Dtiny-cpu",
];

#[tokio::test]
async fn a_new_run_applies_config_workspace_warmup_job_then_status_and_events() {
    let (log, metrics) = run_reconcile(tiny_run(), BTreeMap::new()).await;
    let lines: Vec<String> = log.iter().map(Recorded::line).collect();
    let mut reads: Vec<String> = lines[..6].to_vec();
    reads.sort();
    let mut want = LISTS.map(String::from).to_vec();
    want.sort();
    assert_eq!(reads, want);
    assert_eq!(
        &lines[6..],
        &[
            "PATCH /api/v1/namespaces/ml/configmaps/tiny-cpu-config?&force=true&fieldManager=rlt-operator",
            "PATCH /api/v1/namespaces/ml/persistentvolumeclaims/tiny-cpu-workspace?&force=true&fieldManager=rlt-operator",
            "PATCH /apis/batch/v1/namespaces/ml/jobs/tiny-cpu-warmup-0?&force=true&fieldManager=rlt-operator",
            "PATCH /apis/rlt.dev/v1alpha1/namespaces/ml/rltruns/tiny-cpu/status?&force=true&fieldManager=rlt-operator",
            "POST /apis/events.k8s.io/v1/namespaces/ml/events?",
            "POST /apis/events.k8s.io/v1/namespaces/ml/events?",
        ]
    );
    // The config the trainer reads is the run itself, defaults filled in.
    let cm = &log[6].body;
    let config = cm["data"]["run.yaml"].as_str().unwrap();
    let parsed = rlt_api::parse_yaml(config).expect("rendered config validates");
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
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    // Status: SSA of the status subresource, phase derived from conditions.
    let status = &log[9].body["status"];
    assert_eq!(status["phase"], "WarmUp");
    assert_eq!(status["stages"]["warmup"]["attempt"], 0);
    assert_eq!(status["conditions"][0]["type"], "WarmupComplete");
    assert_eq!(status["conditions"][0]["observedGeneration"], 1);
    let reasons: Vec<&str> = log[10..]
        .iter()
        .map(|r| r.body["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["StageStarted", "PhaseChanged"]);
    assert_eq!(log[11].body["note"], "Pending -> WarmUp");
    assert_eq!(log[11].body["regarding"]["name"], "tiny-cpu");
    assert_eq!(metrics.reconciles.get(), 1);
}

/// What the API server holds after the first reconcile: the children, as listed.
fn existing_children(run: &RltRun) -> BTreeMap<String, Vec<Value>> {
    let ctx = Ctx::new(run);
    let mut objects: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut put = |path: &str, child: Child| {
        let v = match child {
            Child::ConfigMap(o) => serde_json::to_value(o),
            Child::Pvc(o) => serde_json::to_value(o),
            Child::Job(o) => serde_json::to_value(o),
            Child::StatefulSet(o) => serde_json::to_value(o),
            Child::Service(o) => serde_json::to_value(o),
        };
        objects.entry(path.into()).or_default().push(v.unwrap());
    };
    put(
        "/api/v1/namespaces/ml/configmaps",
        children::config_map(&ctx),
    );
    put(
        "/api/v1/namespaces/ml/persistentvolumeclaims",
        children::workspace_pvc(&ctx).unwrap(),
    );
    put(
        "/apis/batch/v1/namespaces/ml/jobs",
        children::warmup_job(&ctx, 0),
    );
    objects
}

#[tokio::test]
async fn a_reconcile_that_finds_nothing_to_change_only_reads() {
    // First reconcile, in memory, to get the status the run would have.
    let mut run = tiny_run();
    let plan = rlt_operator::reconcile::reconcile(
        &run,
        &Default::default(),
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    run.status = plan.status;
    let objects = existing_children(&run);
    let (log, _) = run_reconcile(run, objects).await;
    let writes: Vec<String> = log
        .iter()
        .filter(|r| r.method != "GET")
        .map(Recorded::line)
        .collect();
    assert!(writes.is_empty(), "no-op reconcile wrote: {writes:#?}");
    assert_eq!(log.len(), 6);
}

#[tokio::test]
async fn a_failed_warmup_job_is_deleted_and_retried_as_the_next_attempt() {
    let mut run = tiny_run();
    let plan = rlt_operator::reconcile::reconcile(
        &run,
        &Default::default(),
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    run.status = plan.status;
    let mut objects = existing_children(&run);
    let job = &mut objects
        .get_mut("/apis/batch/v1/namespaces/ml/jobs")
        .unwrap()[0];
    job["status"] = json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]});
    objects.insert(
        "/api/v1/namespaces/ml/pods".into(),
        vec![json!({"metadata": {"name": "tiny-cpu-warmup-0-0-abcde", "labels": {"rlt.dev/run": "tiny-cpu", "rlt.dev/stage": "warmup", "rlt.dev/attempt": "0"}},
            "status": {"containerStatuses": [{"name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}})],
    );
    let (log, _) = run_reconcile(run, objects).await;
    let writes: Vec<String> = log
        .iter()
        .filter(|r| r.method != "GET")
        .map(Recorded::line)
        .collect();
    assert_eq!(
        writes,
        [
            "PATCH /apis/batch/v1/namespaces/ml/jobs/tiny-cpu-warmup-1?&force=true&fieldManager=rlt-operator",
            "DELETE /apis/batch/v1/namespaces/ml/jobs/tiny-cpu-warmup-0?",
            "PATCH /apis/rlt.dev/v1alpha1/namespaces/ml/rltruns/tiny-cpu/status?&force=true&fieldManager=rlt-operator",
            "POST /apis/events.k8s.io/v1/namespaces/ml/events?",
        ]
    );
    let delete = log.iter().find(|r| r.method == "DELETE").unwrap();
    assert_eq!(delete.body["propagationPolicy"], "Background");
    let event = log.last().unwrap();
    assert_eq!(
        (event.body["type"].as_str(), event.body["reason"].as_str()),
        (Some("Warning"), Some("Retrying"))
    );
    assert!(event.body["note"].as_str().unwrap().contains("OOMKilled"));
    let status = &log.iter().find(|r| r.uri.contains("/status")).unwrap().body["status"];
    assert_eq!(status["stages"]["warmup"]["attempt"], 1);
    assert_eq!(status["stages"]["warmup"]["failures"], 1);
}
