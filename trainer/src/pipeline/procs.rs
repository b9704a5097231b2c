//! Running one stage's processes: `rlt-trainer <role>` children of this binary with the stage
//! contract's environment, their output forwarded line by line under a `[role-i]` tag, their
//! `/status` figures polled into progress bars (as the operator polls parameter server 0).
use super::plan::{self, Proc};
use anyhow::{anyhow, bail, Context, Result};
use rlt_api::contract::{EnvValue, Role, StageEnv, TrainingFigures, STATUS_PATH};
use rlt_api::stage::Stage;
use rlt_api::RltRun;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The per-run part of every process's environment.
pub struct BaseEnv {
    pub run: String,
    pub workspace: PathBuf,
    pub config: PathBuf,
    /// `RLT_DEVICE` ([`rlt_api::contract::device_choice`]).
    pub device: &'static str,
    /// `RUST_LOG` of the children.
    pub log: String,
}

struct Running {
    proc: Proc,
    child: Child,
    metrics_port: u16,
    /// The last lines the process wrote, for the stage's error message.
    tail: Arc<Mutex<VecDeque<String>>>,
    exited: Option<std::process::ExitStatus>,
    bar: Option<indicatif::ProgressBar>,
}

/// A free loopback port (bound, read, released; the child binds it right after).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs the stage's processes until they all succeed (RL: until every learner succeeded; the
/// parameter servers are then stopped, as the operator deletes them), or one fails: then the
/// others are stopped and the error carries the failed process's last error line.
pub fn run_stage(
    stage: Stage,
    run: &RltRun,
    base: &BaseEnv,
    attempt: u32,
    pending_students: &[String],
    on_figures: &mut dyn FnMut(&TrainingFigures),
) -> Result<()> {
    let procs = plan::processes(stage, run, pending_students);
    let servers = procs.iter().filter(|p| p.role == Role::ParamServer).count();
    let rpc_ports = (0..servers)
        .map(|_| free_port())
        .collect::<Result<Vec<_>>>()?;
    let addresses = rpc_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    // The data-parallel ranks of warm-up and of each student meet on loopback, each group at
    // its own rank 0's TCPStore port.
    let mut rendezvous: std::collections::BTreeMap<Option<String>, (String, u16)> =
        Default::default();
    for p in procs
        .iter()
        .filter(|p| p.replicas > 1 && matches!(p.role, Role::Warmup | Role::Distill))
    {
        if !rendezvous.contains_key(&p.student) {
            rendezvous.insert(p.student.clone(), ("127.0.0.1".into(), free_port()?));
        }
    }
    let bars = indicatif::MultiProgress::new();
    let exe = std::env::current_exe().context("locating the rlt-trainer binary")?;

    let mut running: Vec<Running> = Vec::new();
    for p in procs {
        let metrics_port = free_port()?;
        let mut cmd = Command::new(&exe);
        cmd.arg(p.role.subcommand());
        let server = p.role == Role::ParamServer;
        let stage_env = StageEnv {
            run_name: base.run.clone(),
            workspace: base.workspace.display().to_string(),
            config: base.config.display().to_string(),
            attempt,
            replica_index: EnvValue::Literal(p.index.to_string()),
            replicas: p.replicas,
            rpc_port: server.then(|| rpc_ports[p.index as usize]),
            metrics_port,
            device: base.device,
            termination_log: None,
            param_servers: (stage == Stage::Rl).then(|| addresses.clone()),
            student: p.student.clone(),
            ranks_per_pod: 1,
            rendezvous: rendezvous.get(&p.student).cloned(),
        };
        for name in StageEnv::PER_ROLE {
            cmd.env_remove(name);
        }
        for (name, value) in stage_env.vars() {
            match value {
                EnvValue::Literal(v) => cmd.env(name, v),
                EnvValue::PodField(f) => bail!("{name}: a local process has no pod field {f}"),
            };
        }
        cmd.env("RUST_LOG", &base.log);
        if server || rendezvous.contains_key(&p.student) {
            // Loopback only: a local try-run must not listen on the network.
            cmd.args(["--bind", "127.0.0.1"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} {}", exe.display(), p.role.subcommand()))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let tag = p.tag();
        if let Some(out) = child.stdout.take() {
            forward(out, tag.clone(), bars.clone(), tail.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward(err, tag.clone(), bars.clone(), tail.clone());
        }
        // The processes whose /status the operator (or a user) would watch.
        let watched = matches!(
            (p.role, p.index),
            (Role::Warmup, 0) | (Role::ParamServer, 0) | (Role::Distill, 0)
        );
        let bar = watched.then(|| {
            let b = bars.add(indicatif::ProgressBar::new(0));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>16} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(match (&p.student, stage) {
                (Some(s), _) => format!("distill {s}"),
                (None, Stage::Rl) => "rl".to_string(),
                (None, s) => s.label().to_string(),
            });
            b
        });
        running.push(Running {
            proc: p,
            child,
            metrics_port,
            tail,
            exited: None,
            bar,
        });
    }

    let result = supervise(stage, &mut running, on_figures);
    for r in running.iter_mut() {
        if r.exited.is_none() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        if let Some(b) = &r.bar {
            b.finish_and_clear();
        }
    }
    result
}

fn supervise(
    stage: Stage,
    running: &mut [Running],
    on_figures: &mut dyn FnMut(&TrainingFigures),
) -> Result<()> {
    let mut last_poll = Instant::now() - Duration::from_secs(10);
    loop {
        for r in running.iter_mut().filter(|r| r.exited.is_none()) {
            if let Some(status) = r.child.try_wait()? {
                r.exited = Some(status);
                if !status.success() {
                    // Give the output threads a moment to forward the last lines.
                    std::thread::sleep(Duration::from_millis(200));
                    let why = last_error(&r.tail);
                    bail!(
                        "{} exited with {status}{}",
                        r.proc.tag(),
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    );
                }
            }
        }
        let done = match stage {
            // The learners finish the stage; the servers are stopped afterwards.
            Stage::Rl => running
                .iter()
                .filter(|r| r.proc.role == Role::Learner)
                .all(|r| r.exited.is_some()),
            _ => running.iter().all(|r| r.exited.is_some()),
        };
        if last_poll.elapsed() >= Duration::from_millis(500) || done {
            last_poll = Instant::now();
            for r in running
                .iter()
                .filter(|r| r.bar.is_some() && r.exited.is_none())
            {
                if let Some(f) = poll_status(r.metrics_port) {
                    let bar = r.bar.as_ref().expect("filtered");
                    bar.set_length(f.total_steps);
                    bar.set_position(f.step);
                    if let Some(reward) = f.mean_reward {
                        bar.set_message(format!("reward {reward:.4}"));
                    }
                    on_figures(&f);
                }
            }
        }
        if done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Forwards a child's output to our stderr, tagged, above the progress bars, keeping a tail.
fn forward(
    stream: impl Read + Send + 'static,
    tag: String,
    bars: indicatif::MultiProgress,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
            let _ = bars.println(format!("[{tag}] {line}"));
            if bars.is_hidden() {
                let _ = writeln!(std::io::stderr(), "[{tag}] {line}");
            }
            let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
            t.push_back(line);
            if t.len() > 50 {
                t.pop_front();
            }
        }
    });
}

/// The process's own error line (`error: ...`, as `main` prints it), else its last line.
fn last_error(tail: &Arc<Mutex<VecDeque<String>>>) -> Option<String> {
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    t.iter()
        .rev()
        .find_map(|l| l.strip_prefix("error: ").map(str::to_string))
        .or_else(|| t.iter().rev().find(|l| !l.trim().is_empty()).cloned())
}

/// `GET /status` on a local metrics port; `None` while the process is not serving yet.
fn poll_status(port: u16) -> Option<TrainingFigures> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "GET {STATUS_PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    serde_json::from_str(body).map_err(|e| anyhow!("{e}")).ok()
}
