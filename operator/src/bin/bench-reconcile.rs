//! `bench-reconcile`: time per pure reconcile over 1,000 runs in every stage, and the idle
//! controller's resident memory, each printed beside a baseline measured in the same run.
//!
//!     cargo build --release -p rlt-operator && target/release/bench-reconcile
//!
//! Baselines: for the reconcile, serializing the same run to JSON (the least any reconcile
//! that writes a status does); for memory, an idle `sleep` process (the floor of any process).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rlt_api::contract::TrainingFigures;
use rlt_api::RltRun;
use rlt_operator::children::Kind;
use rlt_operator::observe::{JobState, Observed, ObservedChild, ObservedJob};
use rlt_operator::reconcile::reconcile;
use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = include_str!("../../../api/tests/good/tiny-cpu.yaml");
const RUNS: usize = 1000;

/// 1,000 runs spread over the stages: each is reconciled against a world where its current
/// stage's children exist (the common, steady-state case), some with training figures.
fn worlds() -> Vec<(RltRun, Observed)> {
    let base = rlt_api::parse_yaml(TINY).unwrap();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    (0..RUNS)
        .map(|i| {
            let mut run = base.clone();
            run.metadata.name = Some(format!("run-{i:04}"));
            run.metadata.namespace = Some("bench".into());
            run.metadata.uid = Some(format!("uid-{i}"));
            run.metadata.generation = Some(1);
            let mut obs = Observed::default();
            // Walk the run forward i % 4 stage completions (warm-up, RL, distillation, done),
            // then once more so the world is steady (what exists is what the run wants).
            let completions = i % 4;
            for step in 0..=completions {
                let plan = reconcile(&run, &obs, &now);
                for c in &plan.apply {
                    obs.children
                        .retain(|o| !(o.kind == c.kind() && o.name == c.name()));
                    obs.children.push(ObservedChild {
                        kind: c.kind(),
                        name: c.name().into(),
                        hash: c.hash().map(Into::into),
                        deleting: false,
                    });
                    if c.kind() == Kind::Job {
                        obs.jobs.push(ObservedJob {
                            name: c.name().into(),
                            state: JobState::Running,
                            deleting: false,
                            created: None,
                        });
                    }
                }
                obs.children.retain(|c| {
                    !plan
                        .delete
                        .iter()
                        .any(|(k, n)| *k == c.kind && *n == c.name)
                });
                obs.jobs.retain(|j| {
                    !plan
                        .delete
                        .iter()
                        .any(|(k, n)| *k == Kind::Job && *n == j.name)
                });
                if let Some(s) = plan.status {
                    run.status = Some(s);
                }
                if step < completions {
                    obs.jobs
                        .iter_mut()
                        .for_each(|j| j.state = JobState::Complete);
                }
            }
            let plan = reconcile(&run, &obs, &now);
            if let Some(s) = plan.status {
                run.status = Some(s);
            }
            if i % 8 == 1 {
                obs.figures = Some(TrainingFigures {
                    step: 40,
                    total_steps: 125,
                    mean_reward: Some(0.5),
                    ..Default::default()
                });
            }
            (run, obs)
        })
        .collect()
}

fn per_item(total: Duration, n: usize) -> f64 {
    total.as_secs_f64() * 1e6 / n as f64
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Starts a process, waits for it to settle, reads its resident memory, stops it.
fn idle_rss(mut cmd: Command, settle: Duration) -> Option<u64> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(settle);
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    rss
}

fn main() {
    let worlds = worlds();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let phases: std::collections::BTreeMap<String, usize> =
        worlds.iter().fold(Default::default(), |mut m, (r, _)| {
            let p = r
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .map(|p| p.as_str())
                .unwrap_or("Pending");
            *m.entry(p.to_string()).or_default() += 1;
            m
        });
    println!("runs: {RUNS} by phase {phases:?}");

    // Warm up caches, then time several passes over all runs.
    for (run, obs) in &worlds {
        black_box(reconcile(run, obs, &now));
    }
    let passes = 5;
    let t = Instant::now();
    let mut writes = 0usize;
    for _ in 0..passes {
        for (run, obs) in &worlds {
            let plan = reconcile(black_box(run), black_box(obs), &now);
            writes += usize::from(!plan.is_noop());
            black_box(plan);
        }
    }
    let reconcile_us = per_item(t.elapsed(), passes * RUNS);
    let t = Instant::now();
    for _ in 0..passes {
        for (run, _) in &worlds {
            black_box(serde_json::to_vec(black_box(run)).unwrap());
        }
    }
    let baseline_us = per_item(t.elapsed(), passes * RUNS);
    println!("pure reconcile:        {reconcile_us:8.1} us/run   (target < 1000 us)");
    println!("baseline (run->JSON):  {baseline_us:8.1} us/run");
    println!(
        "plans with writes:     {} of {} (steady state: only runs with new figures)",
        writes / passes,
        RUNS
    );

    // Idle controller memory: the real binary against an API server that does not answer.
    let exe = std::env::current_exe().unwrap();
    let operator = exe.with_file_name("rlt-operator");
    if !operator.exists() {
        println!(
            "idle controller RSS:   skipped ({} not built: cargo build --release -p rlt-operator)",
            operator.display()
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("rlt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u, namespace: default}}]\ncurrent-context: x\n",
    )
    .unwrap();
    let mut op = Command::new(&operator);
    op.env("KUBECONFIG", &kubeconfig)
        .args(["--metrics-addr", "127.0.0.1:0"]);
    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let settle = Duration::from_secs(5);
    let op_rss = idle_rss(op, settle);
    let sleep_rss = idle_rss(sleep, Duration::from_millis(500));
    let mib = |k: Option<u64>| {
        k.map(|k| format!("{:6.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "   n/a".into())
    };
    println!(
        "idle controller RSS:   {}   (target < 30 MiB; after {}s against an unreachable API)",
        mib(op_rss),
        settle.as_secs()
    );
    println!("baseline (sleep) RSS:  {}", mib(sleep_rss));
    let _ = std::fs::remove_dir_all(&dir);
}
