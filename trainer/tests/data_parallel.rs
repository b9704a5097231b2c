//! Data-parallel warm-up with real rank processes (`rlt-trainer warmup` as the pods run it,
//! the ranks meeting on c10d's Gloo over loopback): 1, 2 and 4 ranks reach the same weights from the
//! same global batch, whether the ranks are pods or several ranks in one pod; a rank killed
//! mid-epoch brings its group down and the next attempt resumes from the last checkpoint to the
//! same result; every rank's share of the optimizer state is in each checkpoint.
use rlt_api::layout::{latest_checkpoint, RunDir};
use rlt_trainer::model::checkpoint::{init_tiny, load_checkpoint};
use rlt_trainer::model::config::TinySpec;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlt-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model(root: &Path) -> PathBuf {
    let dir = root.join("tiny");
    let spec = TinySpec {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        seed: 5,
    };
    init_tiny(&dir, &spec, Kind::Float).unwrap();
    dir
}

/// A free loopback port (bound, read, released: rank 0's store binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One pod's process: `pods` pods of `per_pod` ranks each, this one `pod`, meeting at rank 0's
/// store on `port` (0: no rendezvous given), with the variables the operator sets.
fn warmup(
    model: &Path,
    ws: &Path,
    pods: usize,
    per_pod: usize,
    pod: usize,
    port: u16,
    attempt: u32,
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlt-trainer"));
    c.args([
        "warmup",
        "--synthetic",
        "96",
        "--prompts",
        "short",
        "--run",
        "r",
    ]);
    c.args([
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
    ]);
    c.args([
        "--checkpoint-every",
        "4",
        "--log-every",
        "4",
        "--threads",
        "1",
        "--bind",
        "127.0.0.1",
    ]);
    c.arg("--model").arg(model).arg("--workspace").arg(ws);
    c.env_remove("RLT_METRICS_PORT")
        .env("RLT_ATTEMPT", attempt.to_string())
        .env("RLT_REPLICAS", pods.to_string())
        .env("RLT_REPLICA_INDEX", pod.to_string())
        .env("RLT_RANKS_PER_POD", per_pod.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in rlt_api::contract::StageEnv::PER_ROLE {
        c.env_remove(v);
    }
    if port != 0 {
        c.env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("WORLD_SIZE", (pods * per_pod).to_string())
            .env("LOCAL_WORLD_SIZE", per_pod.to_string());
        if per_pod == 1 {
            c.env("RANK", pod.to_string()).env("LOCAL_RANK", "0");
        }
    }
    c
}

/// Starts every pod of a group.
fn start(model: &Path, ws: &Path, pods: usize, per_pod: usize, attempt: u32) -> Vec<Child> {
    let port = if pods * per_pod > 1 { free_port() } else { 0 };
    (0..pods)
        .map(|pod| {
            warmup(model, ws, pods, per_pod, pod, port, attempt)
                .spawn()
                .unwrap()
        })
        .collect()
}

fn wait_all(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn assert_ok(outs: &[Output]) {
    for o in outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

fn final_weights(ws: &Path) -> Vec<(String, Tensor)> {
    let (lm, _) = load_checkpoint(
        &RunDir::new(ws, "r").warmup().final_dir(),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let mut v: Vec<_> = lm.vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
    a.iter()
        .zip(b)
        .map(|((n, x), (_, y))| ((x - y).abs().max().double_value(&[]), n.clone()))
        .fold((0.0, String::new()), |m, d| if d.0 > m.0 { d } else { m })
}

#[test]
fn one_two_and_four_ranks_reach_the_same_weights() {
    let root = tmpdir("equal");
    let model = model(&root);
    let run = |name: &str, pods: usize, per_pod: usize| {
        let ws = root.join(name);
        assert_ok(&wait_all(start(&model, &ws, pods, per_pod, 0)));
        final_weights(&ws)
    };
    let one = run("one", 1, 1);
    let initial = {
        let (lm, _) = load_checkpoint(&model, Device::Cpu, Kind::Float).unwrap();
        let mut v: Vec<_> = lm.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (moved, _) = max_difference(&one, &initial);
    assert!(moved > 1e-3, "training moved the weights by only {moved}");
    // Two pods of one rank, and one pod of four ranks (as a pod with 4 GPUs runs them).
    for (name, pods, per_pod) in [("two-pods", 2, 1), ("four-in-a-pod", 1, 4)] {
        let w = run(name, pods, per_pod);
        let (d, which) = max_difference(&one, &w);
        // Only the order of float summation differs (f32, 24 steps of AdamW).
        assert!(
            d < 2e-4,
            "{name}: {which} differs by {d} from one rank (training moved weights by {moved})"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_killed_rank_fails_its_group_and_the_next_attempt_resumes_to_the_same_weights() {
    let root = tmpdir("kill");
    let model = model(&root);
    let ws = root.join("ws");
    let stage = RunDir::new(&ws, "r").warmup();
    let mut pods = start(&model, &ws, 2, 1, 0);
    let t = Instant::now();
    let killed_at = loop {
        if let Some((step, dir)) = latest_checkpoint(&stage.checkpoints(), 0) {
            // Both ranks' optimizer shares are in the checkpoint, not only rank 0's.
            for r in 0..2 {
                let f = dir.join(format!("optimizer.rank-{r}-of-2.safetensors"));
                assert!(f.exists(), "{} missing", f.display());
            }
            pods[1].kill().unwrap();
            break step;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "no checkpoint after 3 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let outs = wait_all(pods);
    assert!(!outs[0].status.success(), "rank 0 went on without rank 1");
    let err = String::from_utf8_lossy(&outs[0].stderr);
    assert!(err.contains("did one exit?"), "{err}");
    // The peer-lost exit code: the failure is rank 1's, not rank 0's.
    assert_eq!(outs[0].status.code(), Some(3), "{err}");
    assert!(
        !stage.final_dir().exists(),
        "the run finished before the kill"
    );

    // Attempt 1, as the operator would start it: resumes from the checkpoint.
    assert_ok(&wait_all(start(&model, &ws, 2, 1, 1)));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stage.final_dir().join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    let resumed = state["resumed_from_step"]
        .as_u64()
        .expect("attempt 1 resumed");
    assert!(
        resumed >= killed_at,
        "resumed from {resumed}, killed after {killed_at}"
    );

    let ws2 = root.join("uninterrupted");
    assert_ok(&wait_all(start(&model, &ws2, 2, 1, 0)));
    let (d, which) = max_difference(&final_weights(&ws), &final_weights(&ws2));
    assert!(
        d < 1e-5,
        "{which} differs by {d} between the resumed and the uninterrupted run"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_group_without_a_rendezvous_is_a_bad_configuration() {
    let root = tmpdir("nopeers");
    let model = model(&root);
    let out = warmup(&model, &root.join("ws"), 2, 1, 0, 0, 0)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("MASTER_ADDR"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sigterm_ends_a_rank_at_once_even_while_it_waits_for_its_peers() {
    let root = tmpdir("sigterm");
    let model = model(&root);
    // Pod 0 of a group of two whose other pod never comes: it waits at the rendezvous.
    let mut child = warmup(&model, &root.join("ws"), 2, 1, 0, free_port(), 0)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    // SAFETY: signals a child process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    std::fs::remove_dir_all(&root).unwrap();
}
