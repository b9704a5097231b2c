//! The operator at scale (`scripts/dev e2e-scale`; ignored by the ordinary e2e run): N RltRuns
//! applied at once on a simulated GPU fleet (kwok's nodes, tainted `kwok.x-k8s.io/node`: every
//! stage pod bound to one runs for a set time, then succeeds), with the operator itself a real
//! container on the local cluster's real node, installed by its chart. Measured on the real API
//! server (its audit log, split by the operator's user), the operator's own `/metrics`, and
//! its process in `/proc`; printed as one table and written to `$RLT_SCALE_REPORT.{md,json}`.
//!
//! Knobs (e2e/scale.sh sets them): `RLT_SCALE_RUNS` (N), `RLT_SCALE_STAGE_SECONDS` (each
//! stage's simulated duration), `RLT_SCALE_GPU_NODES` (the fleet, 8 `nvidia.com/gpu` each),
//! `RLT_SCALE_REPORT` (report path without extension).
//!
//! [`the_same_workload_without_the_operator`] measures the control plane's floor for the same
//! workload (e2e/scale.sh runs it first, on a fresh cluster): the operator's table reports its
//! time to all Succeeded as a ratio to it, and its reconcile latency beside its own decision
//! time (the reconcile without its API calls).
//!
//! The test fails unless every run Succeeded and idle runs cost no write; the performance
//! targets (no LIST per reconcile, p99 reconcile, RSS, time against the ideal) are printed, not
//! asserted: a benchmark reports, the closing note compares.
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::{json, Value};
use support::*;

/// Every run asks for this many GPUs in every stage (warm-up 4; RL 1 parameter server + 3 on
/// its learner; distillation 4), so 1,000 runs want twice a 250-node fleet.
const GPUS_PER_RUN: u64 = 4;
const GPUS_PER_NODE: u64 = 8;
const STAGES: [&str; 3] = ["warmup", "rl", "distillation"];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The benchmark's knobs (e2e/scale.sh sets them), the same for the operator and its floor.
struct Knobs {
    runs: usize,
    stage_s: u64,
    gpu_nodes: u64,
    /// Report path without extension.
    report: String,
}

impl Knobs {
    fn from_env() -> Knobs {
        let runs = env_or("RLT_SCALE_RUNS", 100);
        Knobs {
            runs,
            stage_s: env_or("RLT_SCALE_STAGE_SECONDS", 60),
            gpu_nodes: env_or("RLT_SCALE_GPU_NODES", 250),
            report: std::env::var("RLT_SCALE_REPORT").unwrap_or_else(|_| format!("scale-{runs}")),
        }
    }

    /// Identical runs in waves of what the fleet holds at once.
    fn ideal(&self) -> Duration {
        let per_wave = (self.gpu_nodes * GPUS_PER_NODE / GPUS_PER_RUN).max(1) as usize;
        let waves = self.runs.div_ceil(per_wave) as u64;
        Duration::from_secs(waves * STAGES.len() as u64 * self.stage_s)
    }

    /// When a measurement started at `start` gives up: three times the ideal plus ten minutes.
    fn deadline(&self, start: Instant) -> Instant {
        start + self.ideal() * 3 + Duration::from_secs(600)
    }
}

fn scale_run(name: &str, ns: &str) -> Result<DynamicObject> {
    let gpus = |n: u64| json!({"requests": {"nvidia.com/gpu": n}, "limits": {"nvidia.com/gpu": n}});
    let mut run = run_from_yaml(TINY_RUN, name)?;
    run.metadata.namespace = Some(ns.into());
    let spec = &mut run.data["spec"];
    // The fleet's hostPath volumes serve every node; the default (ReadWriteMany) is the real
    // multi-node choice.
    spec["workspace"] = json!({"size": "1Gi"});
    // Onto the simulated fleet only (the real node, where the operator runs, has no GPUs anyway).
    spec["scheduling"] = json!({
        "nodeSelector": {"type": "kwok"},
        "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
    });
    spec["warmup"]["resources"] = gpus(GPUS_PER_RUN);
    spec["rl"]["paramServerResources"] = gpus(1);
    spec["rl"]["learnerResources"] = gpus(GPUS_PER_RUN - 1);
    spec["distillation"]["students"][0]["resources"] = gpus(GPUS_PER_RUN);
    Ok(run)
}

/// What the watches saw, by run: when each phase and each stage's first pod was first seen,
/// and what a running stage's condition said its pods waited for.
#[derive(Default)]
struct Seen {
    phases: HashMap<String, BTreeMap<String, Instant>>,
    first_pod: HashMap<(String, String), Instant>,
    waits: BTreeMap<String, Waited>,
}

/// One reason a stage's condition gave while not complete (other than plain `Running`).
#[derive(Default)]
struct Waited {
    runs: BTreeSet<String>,
    /// The first message seen with this reason.
    example: String,
}

impl Seen {
    /// "reason: runs (e.g. message)", per reason; "none" when nothing waited.
    fn waits_row(&self) -> String {
        if self.waits.is_empty() {
            return "none".into();
        }
        self.waits
            .iter()
            .map(|(reason, w)| format!("{reason}: {} runs (e.g. \"{}\")", w.runs.len(), w.example))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn run_name(o: &DynamicObject) -> String {
    o.metadata.name.clone().unwrap_or_default()
}

fn record_run(seen: &Mutex<Seen>, run: &DynamicObject) {
    let now = Instant::now();
    let mut s = seen.lock().unwrap();
    let name = run_name(run);
    s.phases
        .entry(name.clone())
        .or_default()
        .entry(phase(run).to_string())
        .or_insert(now);
    for c in run.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let stage_condition = c["type"].as_str().is_some_and(|t| t.ends_with("Complete"));
        let reason = c["reason"].as_str().unwrap_or_default();
        if stage_condition && c["status"] == "False" && reason != "Running" {
            let w = s.waits.entry(reason.to_string()).or_default();
            if w.example.is_empty() {
                w.example = c["message"].as_str().unwrap_or_default().to_string();
            }
            w.runs.insert(name.clone());
        }
    }
}

fn record_pod(seen: &Mutex<Seen>, pod: &Pod) {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if let (Some(run), Some(stage)) = (labels.get("rlt.dev/run"), labels.get("rlt.dev/stage")) {
        seen.lock()
            .unwrap()
            .first_pod
            .entry((run.clone(), stage.clone()))
            .or_insert_with(Instant::now);
    }
}

/// Resident memory (bytes) and CPU seconds (user + system) of a process.
fn process_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at ")".
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?;
    Some((rss_kib * 1024, ticks / 100.0))
}

/// A quantile (0..=1) of samples, nearest rank.
fn quantile(samples: &mut [f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
    Some(samples[i])
}

/// A quantile of a Prometheus histogram (cumulative `le` buckets), interpolated linearly within
/// its bucket as Prometheus' `histogram_quantile` does.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let within = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return Some(lo + (le - lo) * within);
        }
        (lo, below) = (le, count);
    }
    None
}

/// `name{le="x"} n` lines of one histogram in a text exposition.
fn histogram(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(url: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = tokio::net::TcpStream::connect(authority).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// The operator's requests in the audit log (one per request: watches at ResponseStarted,
/// since they complete only when they end; everything else at ResponseComplete).
fn operator_requests(path: &std::path::Path) -> Result<Vec<Request>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["user"]["username"] == OPERATOR_USER)
        .filter(|v| {
            let watch = v["verb"] == "watch";
            v["stage"]
                == if watch {
                    "ResponseStarted"
                } else {
                    "ResponseComplete"
                }
        })
        .map(|v| Request {
            at: v["requestReceivedTimestamp"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            verb: v["verb"].as_str().unwrap_or("").to_string(),
            lease: v["objectRef"]["resource"] == "leases",
        })
        .collect())
}

/// One request of the operator's in the audit log.
struct Request {
    at: String,
    verb: String,
    /// Leader election's lease renewals: the operator's own upkeep (one every few seconds
    /// whatever the number of runs), counted apart from the work for runs.
    lease: bool,
}

/// Requests by verb within `[from, to)` (RFC 3339 as the API server writes them), for the
/// runs (`lease: false`) or for leader election (`lease: true`).
fn by_verb(requests: &[Request], lease: bool, from: &str, to: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in requests
        .iter()
        .filter(|r| r.lease == lease && r.at.as_str() >= from && r.at.as_str() < to)
    {
        *out.entry(r.verb.clone()).or_default() += 1;
    }
    out
}

/// The observations of a cumulative histogram made between two scrapes (bucket by bucket).
fn histogram_between(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let earlier = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - earlier)
        })
        .collect()
}

fn rfc3339_at(start: (Instant, k8s_openapi::jiff::Timestamp), at: Instant) -> String {
    let offset = k8s_openapi::jiff::SignedDuration::try_from(at - start.0).unwrap();
    (start.1 + offset)
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn per_run_minute(counts: &BTreeMap<String, u64>, runs: usize, window: Duration) -> String {
    if counts.is_empty() {
        return "0".into();
    }
    let minutes = window.as_secs_f64().max(1.0) / 60.0;
    counts
        .iter()
        .map(|(verb, n)| format!("{verb} {:.2}", *n as f64 / runs as f64 / minutes))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
#[ignore = "the scale benchmark: scripts/dev e2e-scale"]
async fn a_thousand_runs_on_a_simulated_fleet() -> Result<()> {
    let knobs = Knobs::from_env();
    let Knobs {
        runs: n,
        stage_s,
        gpu_nodes,
        ref report,
    } = knobs;
    let audit = audit_log().context("the scale benchmark needs RLT_E2E_AUDIT_LOG")?;
    let ns = namespace();
    let client = client().await?;

    // The operator runs on the real node (kwok's nodes are tainted); every stage pod is
    // simulated on kwok's.
    install_operator(&["--set", "logging.level=info"])?;
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let op = operator_pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=rlt-operator"))
        .await?
        .items
        .into_iter()
        .next()
        .context("no operator pod")?;
    let op_uid = op.metadata.uid.clone().unwrap_or_default();
    let op_ip = op
        .status
        .and_then(|s| s.pod_ip)
        .context("operator pod IP")?;
    let metrics_url = format!("http://{op_ip}:8080/metrics");
    let pid = node_process(&op_uid, "rlt-operator").context("the operator's process")?;

    // `client()` made the runs' namespace.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let runs = rltruns(&client);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let watch_runs = tokio::spawn({
        let (seen, runs) = (seen.clone(), runs.clone());
        async move {
            let mut stream = watcher(runs, watcher::Config::default()).boxed();
            while let Ok(Some(ev)) = stream.try_next().await {
                if let watcher::Event::Apply(r) | watcher::Event::InitApply(r) = ev {
                    record_run(&seen, &r);
                }
            }
        }
    });
    let watch_pods = tokio::spawn({
        let seen = seen.clone();
        async move {
            let cfg = watcher::Config::default().labels("rlt.dev/run");
            let mut stream = watcher(pods, cfg).boxed();
            while let Ok(Some(ev)) = stream.try_next().await {
                if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = ev {
                    record_pod(&seen, &p);
                }
            }
        }
    });

    let (_, cpu_before) = process_usage(pid).context("operator usage")?;
    let start = (Instant::now(), k8s_openapi::jiff::Timestamp::now());
    let mut applied = HashMap::new();
    let created: Vec<Result<(String, Instant)>> = futures::stream::iter(0..n)
        .map(|i| {
            let runs = runs.clone();
            let ns = ns.clone();
            async move {
                let name = format!("scale-{i:04}");
                let run = scale_run(&name, &ns)?;
                runs.create(&PostParams::default(), &run).await?;
                Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in created {
        let (name, at) = r?;
        applied.insert(name, at);
    }
    let applied_all = Instant::now();
    println!(
        "applied {n} runs in {:.1} s",
        (applied_all - start.0).as_secs_f64()
    );

    let (ideal, deadline) = (knobs.ideal(), knobs.deadline(start.0));

    let mut max_rss = 0u64;
    let mut max_in_flight = 0f64;
    // The operator's metrics when every run first had its warm-up pod: reconciles before it
    // are start-up's, after it the running runs'.
    let mut metrics_started: Option<String> = None;
    let mut latest = String::new();
    let mut unfinished = None;
    // (when the last run Succeeded, when the last run had its warm-up pod); past the deadline
    // the table is still written, from what was reached (`unfinished`), and the test fails.
    // The operator's CPU seconds when last seen, and when its process was found gone (an
    // operator that loses its leader lease exits; the table says so instead of failing blind).
    let mut last_cpu = cpu_before;
    let mut exited_after: Option<f64> = None;
    let (done_at, started_at) = loop {
        match process_usage(pid) {
            Some((rss, cpu)) => {
                max_rss = max_rss.max(rss);
                last_cpu = cpu;
            }
            None if exited_after.is_none() => {
                let t = start.0.elapsed().as_secs_f64();
                println!("the operator's process {pid} exited {t:.0} s after the first apply");
                exited_after = Some(t);
            }
            None => {}
        }
        if let Ok(m) = scrape(&metrics_url).await {
            if let Some(v) = gauge(&m, "rlt_operator_reconciles_in_flight") {
                max_in_flight = max_in_flight.max(v);
            }
            latest = m;
        }
        let (succeeded, started, last_start) = {
            let s = seen.lock().unwrap();
            let phase_of = |name: &str, p: &str| s.phases.get(name).and_then(|m| m.get(p)).copied();
            let succeeded: Vec<Instant> = applied
                .keys()
                .filter_map(|r| phase_of(r, "Succeeded"))
                .collect();
            if let Some(f) = applied.keys().find(|r| phase_of(r, "Failed").is_some()) {
                bail!("run {f} Failed");
            }
            let starts: Vec<Instant> = applied
                .keys()
                .filter_map(|r| s.first_pod.get(&(r.clone(), "warmup".into())).copied())
                .collect();
            (succeeded.len(), starts.len(), starts.iter().max().copied())
        };
        if started == n && metrics_started.is_none() {
            metrics_started = Some(latest.clone());
        }
        if succeeded == n {
            let s = seen.lock().unwrap();
            let last = applied
                .keys()
                .filter_map(|r| s.phases.get(r).and_then(|m| m.get("Succeeded")).copied())
                .max()
                .unwrap();
            break (last, last_start.unwrap_or(applied_all));
        }
        if Instant::now() > deadline {
            println!(
                "deadline: {succeeded} of {n} runs Succeeded ({started} started) after {:.0} s",
                start.0.elapsed().as_secs_f64()
            );
            let now = Instant::now();
            unfinished = Some((succeeded, started));
            break (
                now,
                if started == n {
                    last_start.unwrap_or(now)
                } else {
                    now
                },
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let cpu_done = process_usage(pid).map_or(last_cpu, |u| u.1);

    // Idle: every run Succeeded; a minute in which the operator must write nothing.
    let finished = unfinished.is_none();
    let idle_from = Instant::now() + Duration::from_secs(10);
    if finished {
        tokio::time::sleep(Duration::from_secs(70)).await;
    }
    let idle_to = idle_from + Duration::from_secs(60);
    let (rss_end, cpu_end) = process_usage(pid).unwrap_or((0, cpu_done));
    max_rss = max_rss.max(rss_end);
    let metrics = scrape(&metrics_url).await.unwrap_or_default();
    watch_runs.abort();
    watch_pods.abort();

    let requests = operator_requests(&audit)?;
    let at = |i: Instant| rfc3339_at(start, i);
    let startup = by_verb(&requests, false, &at(start.0), &at(started_at));
    let running = by_verb(&requests, false, &at(started_at), &at(done_at));
    let idle = by_verb(&requests, false, &at(idle_from), &at(idle_to));
    let lease_idle = by_verb(&requests, true, &at(idle_from), &at(idle_to));
    let idle_writes: u64 = idle
        .iter()
        .filter(|(v, _)| is_write(v))
        .map(|(_, n)| n)
        .sum();

    const DURATION: &str = "rlt_operator_reconcile_duration_seconds";
    const DECISION: &str = "rlt_operator_reconcile_decision_seconds";
    let at_start = histogram(metrics_started.as_deref().unwrap_or_default(), DURATION);
    let durations = histogram(&metrics, DURATION);
    let after_start = histogram_between(&at_start, &durations);
    let decisions = histogram(&metrics, DECISION);
    // The floor's time for the same workload, when e2e/scale.sh ran it first.
    let floor: Option<f64> = std::fs::read_to_string(format!("{report}-floor.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["all_done_s"].as_f64());
    let count = |h: &[(f64, f64)]| h.last().map_or(0.0, |b| b.1);
    let ms = |h: &[(f64, f64)], q: f64| {
        histogram_quantile(h, q).map_or("n/a".into(), |s| format!("{:.1}", s * 1e3))
    };
    let (first_pod, waits) = {
        let s = seen.lock().unwrap();
        let mut out = Vec::new();
        for stage in STAGES {
            let mut lat: Vec<f64> = applied
                .iter()
                .filter_map(|(r, t)| {
                    s.first_pod
                        .get(&(r.clone(), stage.to_string()))
                        .map(|p| p.duration_since(*t).as_secs_f64())
                })
                .collect();
            out.push(format!(
                "{stage} {:.1} / {:.1}",
                quantile(&mut lat, 0.5).unwrap_or(f64::NAN),
                quantile(&mut lat, 0.99).unwrap_or(f64::NAN)
            ));
        }
        (out.join("; "), s.waits_row())
    };
    let total = done_at - start.0;
    let vs_ideal = total.as_secs_f64() / ideal.as_secs_f64() - 1.0;
    let startup_s = (started_at - start.0).as_secs_f64();
    let in_flight = match gauge(&metrics, "rlt_operator_reconciles_in_flight") {
        Some(_) => format!("{max_in_flight:.0}"),
        None => "n/a".into(),
    };
    let rows: Vec<(String, String)> = [
        (
            "runs; fleet".to_string(),
            format!(
                "{n}; {gpu_nodes} nodes x {GPUS_PER_NODE} GPUs, {GPUS_PER_RUN} GPUs per run, \
                 stages {stage_s} s each"
            ),
        ),
        (
            format!(
                "API requests per run per minute, start-up (apply until every run has its \
                 warm-up pod: {startup_s:.0} s)"
            ),
            per_run_minute(&startup, n, started_at - start.0),
        ),
        (
            "API requests per run per minute, running (until every run Succeeded)".into(),
            per_run_minute(&running, n, done_at - started_at),
        ),
        (
            "LISTs while running (all runs)".into(),
            running.get("list").copied().unwrap_or(0).to_string(),
        ),
        (
            "reconciles; duration p50 / p99 (ms), start-up".into(),
            format!(
                "{:.0}; {} / {}",
                count(&at_start),
                ms(&at_start, 0.5),
                ms(&at_start, 0.99)
            ),
        ),
        (
            "reconciles; duration p50 / p99 (ms), running and idle".into(),
            format!(
                "{:.0}; {} / {}",
                count(&after_start),
                ms(&after_start, 0.5),
                ms(&after_start, 0.99)
            ),
        ),
        (
            "reconcile decision (no API calls) p50 / p99 (ms), whole run".into(),
            format!("{} / {}", ms(&decisions, 0.5), ms(&decisions, 0.99)),
        ),
        ("reconciles in flight (max sampled)".into(), in_flight),
        ("apply to first pod, p50 / p99 (s)".into(), first_pod),
        (
            "operator RSS max (MiB); CPU seconds (running; idle minute)".into(),
            format!(
                "{:.1}; {:.1}; {:.2}",
                max_rss as f64 / 1048576.0,
                cpu_done - cpu_before,
                cpu_end - cpu_done
            ),
        ),
        (
            "all Succeeded after (s); ideal (s); over ideal".into(),
            match unfinished {
                None => format!(
                    "{:.0}; {}; {:+.1}%",
                    total.as_secs_f64(),
                    ideal.as_secs(),
                    vs_ideal * 100.0
                ),
                Some((succeeded, started)) => format!(
                    "not reached: {succeeded} of {n} Succeeded ({started} started) at the deadline, \
                     {:.0} s; {}",
                    total.as_secs_f64(),
                    ideal.as_secs()
                ),
            },
        ),
        (
            "all Succeeded: operator / floor (the same Jobs and StatefulSets without it)".into(),
            match (floor, unfinished) {
                (Some(f), None) => format!(
                    "{:.2}x ({:.0} s / {f:.0} s)",
                    total.as_secs_f64() / f,
                    total.as_secs_f64()
                ),
                _ => "n/a (no floor measured, or not every run finished)".into(),
            },
        ),
        (
            "operator process".into(),
            match exited_after {
                None => "ran throughout".into(),
                Some(t) => format!("exited {t:.0} s after the first apply (its log says why)"),
            },
        ),
        ("what pods waited for (runs; one message each)".into(), waits),
        (
            "writes per idle run per minute".into(),
            match finished {
                true => format!(
                    "{:.3} ({idle_writes} writes in 60 s)",
                    idle_writes as f64 / n as f64
                ),
                false => "n/a (not every run finished)".into(),
            },
        ),
        (
            "leader-election lease requests in the idle minute (not per run)".into(),
            lease_idle
                .iter()
                .map(|(verb, n)| format!("{verb} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ]
    .into();
    let mut md = format!("\n### N = {n}\n\n| measure | value |\n|---|---|\n");
    for (k, v) in &rows {
        md += &format!("| {k} | {v} |\n");
    }
    println!("{md}");
    std::fs::write(format!("{report}.md"), &md)?;
    let json: BTreeMap<&str, &str> = rows.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    std::fs::write(
        format!("{report}.json"),
        serde_json::to_string_pretty(&json)?,
    )?;

    if let Some((succeeded, started)) = unfinished {
        bail!("{succeeded} of {n} runs Succeeded ({started} started) by the deadline");
    }
    assert_eq!(idle_writes, 0, "the operator wrote for idle runs: {idle:?}");
    Ok(())
}

#[test]
fn quantiles_of_samples_and_of_a_histogram() {
    let mut s = vec![5.0, 1.0, 3.0, 2.0, 4.0];
    assert_eq!(quantile(&mut s, 0.5), Some(3.0));
    assert_eq!(quantile(&mut s, 0.99), Some(5.0));
    let h = [
        (0.01, 50.0),
        (0.05, 90.0),
        (0.1, 100.0),
        (f64::INFINITY, 100.0),
    ];
    assert!((histogram_quantile(&h, 0.5).unwrap() - 0.01).abs() < 1e-12);
    assert!((histogram_quantile(&h, 0.7).unwrap() - 0.03).abs() < 1e-12);
    let text = "x_bucket{le=\"0.01\"} 50\nx_bucket{le=\"+Inf\"} 100\nx_sum 1\n";
    assert_eq!(
        histogram(text, "x"),
        vec![(0.01, 50.0), (f64::INFINITY, 100.0)]
    );
}

/// The control plane's floor for the same workload (run by e2e/scale.sh, by name, on a fresh
/// cluster before the operator's): no operator, no RltRun; the very
/// children the operator would make (its own builders, owner references dropped) created
/// directly, each stage's as soon as the previous stage's Job completed, by a driver that
/// only watches Jobs. What the API server, the Job and StatefulSet controllers, the scheduler
/// and the fleet take for N runs; the operator's table reports its own time as a ratio to it.
#[tokio::test]
#[ignore = "needs a cluster and a simulated fleet (scripts/dev e2e-scale)"]
async fn the_same_workload_without_the_operator() -> Result<()> {
    use k8s_openapi::api::batch::v1::Job;
    use rlt_operator::children::{self, names, Child, Ctx};

    let knobs = Knobs::from_env();
    let (n, report) = (knobs.runs, &knobs.report);
    let ns = namespace();
    let client = client().await?;
    let runs: Vec<rlt_api::RltRun> = (0..n)
        .map(|i| {
            let name = format!("scale-{i:04}");
            let value = serde_json::to_value(scale_run(&name, &ns)?)?;
            let mut run = rlt_api::validate::validate_value(&value)
                .map_err(|e| anyhow::anyhow!(rlt_api::validate::render(&e)))?;
            run.metadata.namespace = Some(ns.clone());
            run.metadata.uid = Some(format!("00000000-0000-0000-0000-{i:012}"));
            Ok(run)
        })
        .collect::<Result<_>>()?;
    let by_name: HashMap<String, &rlt_api::RltRun> = runs
        .iter()
        .map(|r| (r.metadata.name.clone().unwrap(), r))
        .collect();

    // Creates children as the operator's builders make them, without the owner reference (no
    // RltRun exists here: the garbage collector would delete them).
    let create = |children: Vec<Child>| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            for child in children {
                let mut value = child.to_json();
                value["metadata"]
                    .as_object_mut()
                    .context("metadata")?
                    .remove("ownerReferences");
                let obj: DynamicObject = serde_json::from_value(value)?;
                let gvk = kube::api::GroupVersionKind::try_from(
                    obj.types
                        .as_ref()
                        .context("child without apiVersion/kind")?,
                )?;
                let (ar, _) = kube::discovery::pinned_kind(&client, &gvk).await?;
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok(())
        }
    };

    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let start = Instant::now();
    let first: Vec<Result<()>> = futures::stream::iter(runs.iter())
        .map(|run| {
            let ctx = Ctx::new(run);
            let mut first = children::workspace_pvc(&ctx)
                .into_iter()
                .collect::<Vec<_>>();
            first.push(children::config_map(&ctx, children::Stage::Warmup, 0));
            first.push(children::warmup_job(&ctx, 0));
            create(first)
        })
        .buffer_unordered(32)
        .collect()
        .await;
    first.into_iter().collect::<Result<Vec<_>>>()?;
    println!(
        "floor: created {n} runs' warm-up in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // Each completed Job starts the next stage of its run, as the operator would.
    let mut done: HashMap<String, Instant> = HashMap::new();
    let mut handled: BTreeSet<String> = BTreeSet::new();
    let (ideal, deadline) = (knobs.ideal(), knobs.deadline(start));
    let mut stream = watcher(jobs, watcher::Config::default().labels("rlt.dev/run")).boxed();
    while done.len() < n {
        let ev = tokio::time::timeout_at(deadline.into(), stream.try_next())
            .await
            .map_err(|_| {
                anyhow::anyhow!("floor: {} of {n} runs done by the deadline", done.len())
            })??;
        let Some(watcher::Event::Apply(job) | watcher::Event::InitApply(job)) = ev else {
            continue;
        };
        let complete = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            });
        let name = job.metadata.name.clone().unwrap_or_default();
        if !complete || !handled.insert(name.clone()) {
            continue;
        }
        let labels = job.metadata.labels.clone().unwrap_or_default();
        let run = by_name[labels.get("rlt.dev/run").context("run label")?.as_str()];
        let run_name = run.metadata.name.clone().unwrap();
        let ctx = Ctx::new(run);
        match labels.get("rlt.dev/stage").map(String::as_str) {
            Some("warmup") => {
                create(vec![
                    children::config_map(&ctx, children::Stage::Rl, 0),
                    children::param_server_service(&ctx),
                    children::param_server_set(&ctx, 0),
                    children::learner_job(&ctx, 0),
                ])
                .await?
            }
            Some("rl") => {
                let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
                    Api::namespaced(client.clone(), &ns);
                let _ = sets
                    .delete(&names::param_server_set(&run_name, 0), &Default::default())
                    .await;
                let mut next = vec![children::config_map(&ctx, children::Stage::Distillation, 0)];
                next.extend(
                    run.spec
                        .distillation
                        .students
                        .iter()
                        .map(|s| children::distill_job(&ctx, s, 0)),
                );
                create(next).await?
            }
            _ => {
                let students = &run.spec.distillation.students;
                let all = students
                    .iter()
                    .all(|s| handled.contains(&names::distill_job(&run_name, &s.name, 0)));
                if all {
                    done.insert(run_name, Instant::now());
                }
            }
        }
    }
    let total = done.values().max().map_or(Duration::ZERO, |t| *t - start);
    let vs_ideal = total.as_secs_f64() / ideal.as_secs_f64() - 1.0;
    let md = format!(
        "\n### N = {n}, without the operator (the control plane's floor)\n\n| measure | value |\n|---|---|\n\
         | all done after (s); ideal (s); over ideal | {:.0}; {}; {:+.1}% |\n",
        total.as_secs_f64(),
        ideal.as_secs(),
        vs_ideal * 100.0
    );
    println!("{md}");
    std::fs::write(format!("{report}-floor.md"), &md)?;
    std::fs::write(
        format!("{report}-floor.json"),
        serde_json::to_string_pretty(&json!({"runs": n, "all_done_s": total.as_secs_f64()}))?,
    )?;
    Ok(())
}
