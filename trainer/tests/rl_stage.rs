//! The RL stage end to end on loopback with tiny models: parameter servers and learners as
//! real `rlt-trainer` processes, compared with the same steps run in one process.
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rlt_api::layout::RunDir;
use rlt_trainer::data::{Example, Prompts};
use rlt_trainer::model::checkpoint::{save_checkpoint, CausalLm};
use rlt_trainer::model::config::TinySpec;
use rlt_trainer::model::tokenizer::Tokenizer;
use rlt_trainer::rl::grpo::GrpoConfig;
use rlt_trainer::rl::learner::{compute_step, LocalRun, Models};
use rlt_trainer::rl::reward::RewardConfig;
use rlt_trainer::rl::rollout::RolloutConfig;
use rlt_trainer::rl::shard::RlOptimizer;
use rlt_trainer::stage::cli::{DataArgs, PromptArgs, PromptStyle};
use tch::{Device, Kind, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_rlt-trainer");

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlt-rl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_spec(seed: u64) -> TinySpec {
    TinySpec {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        seed,
    }
}

/// Tiny teacher and student checkpoints sharing the tiny tokenizer.
fn tiny_models(root: &Path) -> (PathBuf, PathBuf) {
    let tok = Tokenizer::tiny();
    let teacher = root.join("teacher");
    let student = root.join("student");
    save_checkpoint(
        &teacher,
        &CausalLm::tiny(&tiny_spec(1), &tok, Device::Cpu, Kind::Float).unwrap(),
        &tok,
    )
    .unwrap();
    save_checkpoint(
        &student,
        &CausalLm::tiny(&tiny_spec(2), &tok, Device::Cpu, Kind::Float).unwrap(),
        &tok,
    )
    .unwrap();
    (teacher, student)
}

// Shared run settings (flags and the in-process equivalent).
const STEPS: u64 = 4;
const GROUPS: usize = 4;
const G: usize = 4;
const MAX_NEW: usize = 10;
const LR: f64 = 2e-3;
const REF_EVERY: u64 = 2;
const EXAMPLES: usize = 12;

fn rollout_cfg() -> RolloutConfig {
    RolloutConfig {
        group_size: G,
        max_new_tokens: MAX_NEW,
        temperature: 0.7,
        top_p: 1.0,
        reward: RewardConfig::default(),
        grpo: grpo_cfg(),
        seed: 7,
        micro_batch: 0,
        generation_batch: 0,
        activation_checkpointing: false,
    }
}
fn grpo_cfg() -> GrpoConfig {
    GrpoConfig {
        ref_sync_every: REF_EVERY,
        ..GrpoConfig::default()
    }
}
fn optimizer() -> RlOptimizer {
    RlOptimizer {
        lr: LR,
        ..RlOptimizer::default()
    }
}

fn common_flags(steps: u64) -> Vec<String> {
    [
        "--steps",
        &steps.to_string(),
        "--lr",
        &LR.to_string(),
        "--ref-sync-every",
        &REF_EVERY.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The learners' dataset: the same as `--synthetic EXAMPLES`.
fn synthetic_examples() -> Vec<Example> {
    DataArgs {
        data: None,
        synthetic: Some(EXAMPLES),
        skip_malformed: false,
        prompts: PromptArgs {
            prompts: Some(PromptStyle::Short),
            teacher_system: None,
            student_system: None,
        },
    }
    .load(None)
    .unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    ws: PathBuf,
    teacher: PathBuf,
    student: PathBuf,
    rpc: Vec<u16>,
    metrics: u16,
    learners: usize,
    checkpoint_every: u64,
    steps: u64,
    logs: PathBuf,
}

impl Cluster {
    fn server(&self, shard: usize, tag: &str) -> Child {
        let log = std::fs::File::create(self.logs.join(format!("ps-{shard}-{tag}.log"))).unwrap();
        Command::new(BIN)
            .arg("param-server")
            .args([
                "--workspace",
                self.ws.to_str().unwrap(),
                "--run",
                "run",
                "--threads",
                "1",
            ])
            .args([
                "--replica-index",
                &shard.to_string(),
                "--replicas",
                &self.rpc.len().to_string(),
            ])
            .args([
                "--learners",
                &self.learners.to_string(),
                "--init",
                self.teacher.to_str().unwrap(),
            ])
            .args([
                "--bind",
                "127.0.0.1",
                "--rpc-port",
                &self.rpc[shard].to_string(),
            ])
            .args(["--metrics-port", &self.metrics.to_string()])
            .args(["--checkpoint-every", &self.checkpoint_every.to_string()])
            .args(common_flags(self.steps))
            .env_remove("RLT_REPLICA_INDEX")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn learner(&self, rank: usize) -> Child {
        let log = std::fs::File::create(self.logs.join(format!("learner-{rank}.log"))).unwrap();
        let servers: Vec<String> = self.rpc.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Command::new(BIN)
            .arg("learner")
            .args([
                "--workspace",
                self.ws.to_str().unwrap(),
                "--run",
                "run",
                "--threads",
                "1",
            ])
            .args(["--param-servers", &servers.join(",")])
            .args([
                "--replica-index",
                &rank.to_string(),
                "--replicas",
                &self.learners.to_string(),
            ])
            .args([
                "--teacher",
                self.teacher.to_str().unwrap(),
                "--student",
                self.student.to_str().unwrap(),
            ])
            .args(["--synthetic", &EXAMPLES.to_string(), "--prompts", "short"])
            .args([
                "--groups-per-step",
                &GROUPS.to_string(),
                "--group-size",
                &G.to_string(),
            ])
            .args([
                "--max-new-tokens",
                &MAX_NEW.to_string(),
                "--seed",
                "7",
                "--retry-secs",
                "60",
            ])
            .args(common_flags(self.steps))
            .env(
                rlt_api::contract::env::TERMINATION_LOG,
                self.termination_log(rank),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn termination_log(&self, rank: usize) -> PathBuf {
        self.logs.join(format!("learner-{rank}.termination"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(name)).unwrap_or_default()
    }
}

fn wait_ok(child: &mut Child, what: &str, cluster: &Cluster, log: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "{what} failed ({status}); its log:\n{}",
                cluster.log(log)
            );
            return;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!(
                "{what} did not finish within {limit:?}; its log:\n{}",
                cluster.log(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A parameter server outlives its stage (a StatefulSet would restart one that exits, even
/// with 0): once every learner is done it says so, keeps running, and leaves with 0 at SIGTERM.
fn stop_server(server: &mut Child, shard: usize, cluster: &Cluster, log: &str) {
    let what = format!("parameter server {shard}");
    let start = Instant::now();
    while !cluster
        .log(log)
        .contains("serving the final figures until stopped")
    {
        if let Some(status) = server.try_wait().unwrap() {
            panic!(
                "{what} exited by itself ({status}); its log:\n{}",
                cluster.log(log)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} never saw every learner done; its log:\n{}",
            cluster.log(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        server.try_wait().unwrap().is_none(),
        "{what} stopped before it was told to; its log:\n{}",
        cluster.log(log)
    );
    let sent = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    wait_ok(server, &what, cluster, log, Duration::from_secs(30));
}

/// The same steps in one process.
fn single_process_weights(teacher: &Path, student: &Path, steps: u64) -> BTreeMap<String, Tensor> {
    let models = Models::load(teacher, student, Device::Cpu, Kind::Float).unwrap();
    let examples = synthetic_examples();
    let prompts: Vec<_> = examples
        .iter()
        .map(|e| models.group_prompt(&Prompts::short(), e).unwrap())
        .collect();
    let ids = models.special_ids().unwrap();
    let mut run = LocalRun::new(&models, optimizer(), grpo_cfg()).unwrap();
    for _ in 0..steps {
        run.step(&models, &prompts, &ids, &rollout_cfg(), GROUPS)
            .unwrap();
    }
    run.weights()
}

fn final_weights(dir: &Path) -> BTreeMap<String, Tensor> {
    assert!(
        dir.join(rlt_api::layout::COMPLETE_MARKER).exists(),
        "{} lacks its COMPLETE marker",
        dir.display()
    );
    let lm = CausalLm::load(dir, Device::Cpu, Kind::Float).unwrap();
    lm.vs.variables().into_iter().collect()
}

/// Largest absolute difference over all parameters; also checks the run moved the weights.
fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(n, t)| (t - &b[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

fn start_cluster(
    name: &str,
    servers: usize,
    learners: usize,
    checkpoint_every: u64,
    steps: u64,
) -> Cluster {
    let root = tmp(name);
    let (teacher, student) = tiny_models(&root);
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    Cluster {
        ws: root.join("ws"),
        teacher,
        student,
        rpc: (0..servers).map(|_| free_port()).collect(),
        metrics: free_port(),
        learners,
        checkpoint_every,
        steps,
        logs,
    }
}

#[test]
fn two_servers_two_learners_match_single_process_run() {
    let c = start_cluster("dist", 2, 2, 2, STEPS);
    let mut servers: Vec<Child> = (0..2).map(|i| c.server(i, "0")).collect();
    let mut learners: Vec<Child> = (0..2).map(|i| c.learner(i)).collect();
    // While it runs, server 0 serves the figures as JSON and Prometheus metrics.
    let start = Instant::now();
    let status = loop {
        let body = http_get(c.metrics, rlt_api::contract::STATUS_PATH);
        if let Some(f) =
            body.and_then(|b| serde_json::from_str::<rlt_api::contract::TrainingFigures>(&b).ok())
        {
            if f.step >= 1 {
                break f;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no /status with a step; log:\n{}",
            c.log("ps-0-0.log")
        );
        assert_running(&mut servers, &mut learners, &c);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.total_steps, STEPS);
    assert!(
        status.mean_reward.is_some() && status.tokens_per_second.unwrap() > 0.0,
        "{status:?}"
    );
    let metrics = http_get(c.metrics, "/metrics").unwrap_or_default();
    assert!(
        metrics.contains("rlt_rl_step") && metrics.contains("rlt_rl_mean_reward"),
        "{metrics}"
    );
    for (i, l) in learners.iter_mut().enumerate() {
        wait_ok(
            l,
            &format!("learner {i}"),
            &c,
            &format!("learner-{i}.log"),
            Duration::from_secs(240),
        );
    }
    // Each learner hands the stage's last figures to the operator in its termination message.
    for i in 0..2 {
        let message = std::fs::read_to_string(c.termination_log(i)).unwrap_or_default();
        let f = rlt_api::contract::parse_final_figures(&message)
            .unwrap_or_else(|| panic!("learner {i}'s termination message: {message:?}"));
        assert_eq!((f.step, f.total_steps), (STEPS, STEPS), "{f:?}");
        assert!(f.mean_reward.is_some() && f.kl_term.is_some(), "{f:?}");
    }
    // The stage is over, and server 0 still serves its last figures until it is stopped.
    let last = http_get(c.metrics, rlt_api::contract::STATUS_PATH)
        .and_then(|b| serde_json::from_str::<rlt_api::contract::TrainingFigures>(&b).ok())
        .expect("server 0 serves /status after the last step");
    assert_eq!(last.step, STEPS, "{last:?}");
    assert!(last.mean_reward.is_some(), "{last:?}");
    for (i, s) in servers.iter_mut().enumerate() {
        stop_server(s, i, &c, &format!("ps-{i}-0.log"));
    }
    let run = RunDir::new(&c.ws, "run");
    let distributed = final_weights(&run.rl().final_dir());
    let single = single_process_weights(&c.teacher, &c.student, STEPS);
    let initial: BTreeMap<String, Tensor> = CausalLm::load(&c.teacher, Device::Cpu, Kind::Float)
        .unwrap()
        .vs
        .variables()
        .into_iter()
        .collect();
    let moved = max_diff(&single, &initial);
    let diff = max_diff(&distributed, &single);
    eprintln!("max |distributed - single| = {diff:e}; max |single - initial| = {moved:e}");
    assert!(
        moved > 1e-3,
        "the run must change the weights (moved {moved})"
    );
    assert!(
        diff < 1e-4,
        "distributed run diverged from the single-process run: {diff}"
    );
    // Server 0 published the figures of the last step.
    let figures: rlt_api::contract::TrainingFigures =
        serde_json::from_slice(&std::fs::read(run.rl().metrics()).unwrap()).unwrap();
    assert_eq!((figures.step, figures.total_steps), (STEPS, STEPS));
    assert!(figures.mean_reward.unwrap().is_finite() && figures.kl_term.is_some());
}

#[test]
fn killed_server_restarts_from_its_checkpoint_and_the_run_finishes_identically() {
    let steps = 8;
    let c = start_cluster("kill", 2, 1, 3, steps);
    let mut servers: Vec<Child> = (0..2).map(|i| c.server(i, "0")).collect();
    let mut learner = c.learner(0);
    // Kill server 1 while the learner works on step 4 (versions 4 applied everywhere): its last
    // checkpoint is version 3 (every 3 steps), so after the restart it is one version behind
    // and the learner must replay its step-3 gradients before pushing step 4.
    // The learner logs "step done" once it pulled the new version from every shard, so after
    // the 4th one server 1 is at version 4 and the learner is computing step 4.
    let start = Instant::now();
    while c.log("learner-0.log").matches("step done").count() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no step 4; log:\n{}",
            c.log("learner-0.log")
        );
        assert_running(&mut servers, std::slice::from_mut(&mut learner), &c);
        std::thread::sleep(Duration::from_millis(5));
    }
    servers[1].kill().unwrap();
    servers[1].wait().unwrap();
    servers[1] = c.server(1, "1");
    wait_ok(
        &mut learner,
        "learner",
        &c,
        "learner-0.log",
        Duration::from_secs(240),
    );
    for (i, s) in servers.iter_mut().enumerate() {
        stop_server(s, i, &c, &format!("ps-{i}-{i}.log"));
    }
    let restarted = c.log("ps-1-1.log");
    assert!(
        restarted.contains("resumed shard from checkpoint"),
        "{restarted}"
    );
    let learner_log = c.log("learner-0.log");
    assert!(
        learner_log.contains("retrying"),
        "the learner should have seen the server go away"
    );
    assert!(
        learner_log.contains("replaying"),
        "the learner should have replayed step 3:\n{learner_log}"
    );
    let distributed = final_weights(&RunDir::new(&c.ws, "run").rl().final_dir());
    let single = single_process_weights(&c.teacher, &c.student, steps);
    let diff = max_diff(&distributed, &single);
    eprintln!("after a server kill: max |distributed - single| = {diff:e}");
    assert!(diff < 1e-4, "the restarted run diverged: {diff}");
}

/// A plain HTTP/1.0 GET on loopback; the body, or None if the server is not up.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

/// Fails the test at once (with the log) when a process died before its time.
fn assert_running(servers: &mut [Child], learners: &mut [Child], c: &Cluster) {
    for (i, s) in servers.iter_mut().enumerate() {
        if let Some(st) = s.try_wait().unwrap() {
            panic!(
                "parameter server {i} exited early ({st}):\n{}",
                c.log(&format!("ps-{i}-0.log"))
            );
        }
    }
    for (i, l) in learners.iter_mut().enumerate() {
        if let Some(st) = l.try_wait().unwrap() {
            panic!(
                "learner {i} exited early ({st}):\n{}",
                c.log(&format!("learner-{i}.log"))
            );
        }
    }
}

#[test]
fn micro_batches_and_checkpointing_change_memory_not_the_gradient() {
    let root = tmp("micro");
    let (teacher, student) = tiny_models(&root);
    let models = Models::load(&teacher, &student, Device::Cpu, Kind::Float).unwrap();
    let prompts: Vec<_> = synthetic_examples()
        .iter()
        .map(|e| models.group_prompt(&Prompts::short(), e).unwrap())
        .collect();
    let ids = models.special_ids().unwrap();
    let step = |micro_batch, generation_batch, activation_checkpointing| {
        let cfg = RolloutConfig {
            micro_batch,
            generation_batch,
            activation_checkpointing,
            ..rollout_cfg()
        };
        compute_step(&models, &prompts, &ids, &cfg, 1, GROUPS, (0, 1)).unwrap()
    };
    // The whole group in one pass, its graph built while scoring: the reference.
    let (whole, stats) = step(0, 0, false);
    let scale = whole
        .values()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(scale > 0.0, "the step must have a gradient");
    for (micro, gen, ckpt) in [(1, 0, false), (3, 2, false), (0, 1, true), (2, 3, true)] {
        let (grads, s) = step(micro, gen, ckpt);
        assert_eq!(s.generated_tokens, stats.generated_tokens, "same samples");
        assert!(
            (s.reward_sum - stats.reward_sum).abs() < 1e-4,
            "same rewards"
        );
        assert!((s.loss_sum - stats.loss_sum).abs() < 1e-5, "same loss");
        let diff = max_diff(&grads, &whole);
        assert!(
            diff < 1e-5 * scale.max(1.0),
            "micro-batch {micro}, generation batch {gen}, checkpointing {ckpt}: gradient differs by {diff} (largest {scale})"
        );
    }
}

/// A bf16 learner's gradient of a group, backpropagated one row at a time, is the f32 sum of
/// each row's own bf16 gradient of the GRPO objective at ratio one (`-A * lp` per token, plus
/// the KL penalty): the rows' gradients are summed in f32, not in the bf16 `.grad` (a group's
/// gradient is a small difference of large terms), and the ratio is taken against the policy
/// pass's own log-probs, not those of the sampling pass, whose other shapes make bf16 ratios
/// drift from 1 (and the clip drop tokens).
#[test]
fn a_bf16_learner_sums_row_gradients_in_f32_at_ratio_one() {
    use rlt_trainer::engine::logprobs::token_logprobs;
    use rlt_trainer::rl::grpo::token_weights;
    use rlt_trainer::rl::rollout::{
        policy_gradient, sample_and_score, zero_gradients, GradSum, StepContribution,
    };
    tch::set_num_threads(1);
    let root = tmp("bf16-grad");
    let (teacher, student) = tiny_models(&root);
    let models = Models::load(&teacher, &student, Device::Cpu, Kind::BFloat16).unwrap();
    let ids = models.special_ids().unwrap();
    let cfg = RolloutConfig {
        group_size: 8,
        max_new_tokens: 16,
        micro_batch: 1,
        ..rollout_cfg()
    };
    let example = &synthetic_examples()[0];
    let prompt = models.group_prompt(&Prompts::short(), example).unwrap();
    let (t, r, s) = (&models.teacher, &models.reference, &models.student);
    let mut out = StepContribution::default();
    let group =
        sample_and_score(t, r, s, &models.tokenizer, &prompt, &ids, &cfg, 3, &mut out).unwrap();
    assert!(
        group.advantages.abs().sum(Kind::Float).double_value(&[]) > 0.0,
        "the group must carry a signal"
    );

    zero_gradients(t);
    let sums = GradSum::new(t);
    policy_gradient(&t.model, &group, &cfg, &sums);
    let got = sums.take(t);

    // Each row alone, by hand, its bf16 gradient added up in f64.
    let rows = group.ids.size()[0];
    let weights = token_weights(&group.generated) / rows as f64;
    let mut want: BTreeMap<String, Tensor> = BTreeMap::new();
    let len = group.ids.size()[1] - 1;
    for row in 0..rows {
        zero_gradients(t);
        let pick = |x: &Tensor| x.narrow(0, row, 1);
        let h = t
            .model
            .forward_hidden(&pick(&group.ids), Some(&pick(&group.mask)), None);
        let logits = t.model.lm_logits(&h.narrow(1, 0, len));
        let lp = token_logprobs(
            &logits,
            &pick(&group.ids).narrow(1, 1, len),
            cfg.temperature,
        );
        let cols = |x: &Tensor| pick(x).narrow(1, 1, len);
        let d = cols(&group.ref_lp) - &lp;
        let kl = d.exp() - &d - 1.0;
        let adv = pick(&group.advantages).to_kind(Kind::Float).unsqueeze(1);
        let loss = ((-(&lp * adv)) + kl * cfg.grpo.beta) * cols(&weights);
        loss.sum(Kind::Float).backward();
        for (name, v) in t.vs.variables() {
            let g = v.grad().to_kind(Kind::Double);
            let sum = want.entry(name).or_insert_with(|| g.zeros_like());
            *sum += g;
        }
    }
    zero_gradients(t);
    let scale = want
        .values()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(scale > 0.0);
    let diff = got
        .iter()
        .map(|(n, g)| {
            (g.to_kind(Kind::Double) - &want[n])
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max);
    assert!(
        diff < 1e-4 * scale,
        "the learner's gradient differs from the rows' f32 sum by {diff} (largest {scale})"
    );
}
