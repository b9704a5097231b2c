//! `rlt-trainer pipeline <RltRun YAML>`: the stages the operator would run, in order, as local
//! processes of this same binary, so a user tries a run on one machine before sending it to
//! a cluster (and CI runs the whole pipeline without one).
//!
//! Same contract as the operator: the YAML is validated with `rlt_api` (the CRD's schema and
//! CEL rules, the same messages), written with every default filled in as the run
//! configuration (`<run>/run.yaml`, given as `RLT_CONFIG`), and every process is
//! `rlt-trainer <role>` with the contract's environment (`rlt_api::contract::env`), the same
//! workspace layout (`rlt_api::layout`), parameter servers and learners on free loopback
//! ports. Each phase change prints a row as `kubectl get rltruns --watch` would; progress bars
//! follow the stage's `/status` figures.
//!
//! A stage is done when its output carries the COMPLETE marker; a rerun skips done stages and
//! resumes the first unfinished one from its checkpoints, as a new attempt. A failing stage is
//! retried up to `failurePolicy.retries` times (like the operator), then the pipeline stops
//! with that stage's error and a non-zero exit, leaving every completed output in place.
pub mod display;
pub mod plan;
mod procs;
mod state;

use crate::stage::runconfig::{read_run, Inputs};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlt_api::contract::TrainingFigures;
use rlt_api::layout::{is_complete, RunDir};
use rlt_api::stage::{self, Detail, Stage};
use rlt_api::status::Phase;
use rlt_api::RltRun;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// The RltRun YAML (as for `kubectl apply -f`).
    pub config: PathBuf,
    /// Workspace root; the run's directory is `<workspace>/<metadata.name>`.
    #[arg(long, default_value = "runs")]
    pub workspace: PathBuf,
    /// Log level of the stage processes (their warnings and errors always show).
    #[arg(long, default_value = "warn")]
    pub stage_log: String,
}

/// What the run printed and ended as.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub phase: Phase,
    pub run_dir: PathBuf,
}

pub fn pipeline(a: PipelineArgs) -> Result<Outcome> {
    let run = read_run(&a.config)?;
    let name = run.metadata.name.clone().context("metadata.name")?;
    std::fs::create_dir_all(&a.workspace)
        .with_context(|| format!("creating {}", a.workspace.display()))?;
    let workspace = a.workspace.canonicalize()?;
    let run_dir = RunDir::new(&workspace, &crate::stage::runconfig::run_directory(&run)?);
    std::fs::create_dir_all(run_dir.root())?;
    let config_path = run_dir.root().join(rlt_api::contract::CONFIG_FILE);
    std::fs::write(&config_path, rlt_api::contract::render_config(&run))
        .with_context(|| format!("writing {}", config_path.display()))?;

    let mut st = state::State::load(run_dir.root())?;
    let mut table = Table::new(&name, st.created);
    table.print_header();
    if run.spec.suspend {
        table.row(Phase::Suspended, String::new(), None, 0);
        eprintln!("spec.suspend is true: no stage runs until it is false");
        return Ok(Outcome {
            phase: Phase::Suspended,
            run_dir: run_dir.root().to_path_buf(),
        });
    }
    table.row(Phase::Pending, String::new(), None, 0);
    // Missing model or dataset paths fail here, naming the field and the path.
    let inputs = Inputs::prepare(&run, &workspace)
        .inspect_err(|_| table.row(Phase::Failed, String::new(), None, 0))?;

    let stages = stage::enabled_stages(&run.spec);
    let count = stages.len();
    let env = procs::BaseEnv {
        run: name.clone(),
        workspace: workspace.clone(),
        config: config_path,
        // No pod requests GPUs here: `auto` lets the trainer pick CUDA when the machine has it.
        device: rlt_api::contract::device_choice(run.spec.device, None),
        log: a.stage_log.clone(),
    };
    // The REWARD column is the RL stage's latest figure, also when a rerun skips RL.
    let mut reward = read_figures(&run_dir.rl().metrics()).and_then(|f| f.mean_reward);
    for (i, stage) in stages.iter().copied().enumerate() {
        let no = i + 1;
        let outputs = stage.outputs(&run.spec, &run_dir);
        if outputs.iter().all(|(_, dir)| is_complete(dir)) {
            eprintln!(
                "{}: already complete in {}, skipping",
                stage.label(),
                run_dir.root().display()
            );
            continue;
        }
        let retries = run.spec.failure_policy.retries;
        let mut failures = 0;
        loop {
            let attempt = st.next_attempt(stage);
            st.save(run_dir.root())?;
            let pending = plan::pending_students(&run, &run_dir);
            let detail = match stage {
                Stage::Distillation => Detail::Students {
                    done: outputs.len() - pending.len(),
                    total: outputs.len(),
                },
                _ => Detail::Running,
            };
            table.row(
                stage.phase(),
                stage::progress(no, count, stage, &detail),
                reward,
                attempt,
            );
            // RL steps show in the progress column as the operator shows parameter server 0's
            // figures; the other stages' figures drive only their progress bars.
            let result = procs::run_stage(stage, &run, &env, attempt, &pending, &mut |f| {
                if stage == Stage::Rl {
                    show_rl_figures(&mut table, &mut reward, f, (no, count), attempt);
                }
            });
            let missing: Vec<_> = stage
                .outputs(&run.spec, &run_dir)
                .into_iter()
                .filter(|(_, dir)| !is_complete(dir))
                .map(|(_, dir)| dir)
                .collect();
            let error = match result {
                Ok(()) if missing.is_empty() => None,
                Ok(()) => Some(format!(
                    "every process exited 0 but the stage output is incomplete: {}",
                    missing
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Err(e) => Some(format!("{e:#}")),
            };
            let Some(error) = error else {
                // The last step's figures, as parameter server 0 left them (it may have
                // exited before the last poll).
                if stage == Stage::Rl {
                    if let Some(f) = read_figures(&run_dir.rl().metrics()) {
                        show_rl_figures(&mut table, &mut reward, &f, (no, count), attempt);
                    }
                }
                break;
            };
            failures += 1;
            if failures > retries {
                table.row(
                    Phase::Failed,
                    stage::progress(no, count, stage, &Detail::Failed),
                    reward,
                    attempt,
                );
                bail!(
                    "stage {} failed (attempt {attempt}; {failures} failures, retries {retries}): {error}\n\
                     completed stages keep their outputs under {}; rerun to resume from this stage",
                    stage.label(),
                    run_dir.root().display()
                );
            }
            eprintln!("{} failed (attempt {attempt}): {error}; retrying ({failures} of {retries} retries used)", stage.label());
        }
    }
    table.row(
        Phase::Succeeded,
        stage::progress_done(count),
        reward,
        st.last_attempt(),
    );
    report_artifacts(&run, &run_dir, &inputs);
    Ok(Outcome {
        phase: Phase::Succeeded,
        run_dir: run_dir.root().to_path_buf(),
    })
}

fn read_figures(path: &std::path::Path) -> Option<TrainingFigures> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// An RL row with parameter server 0's figures, as the operator copies them into status.
fn show_rl_figures(
    table: &mut Table,
    reward: &mut Option<f64>,
    f: &TrainingFigures,
    (no, count): (usize, usize),
    attempt: u32,
) {
    *reward = f.mean_reward.or(*reward);
    let steps = Detail::Steps {
        step: f.step,
        total: f.total_steps,
    };
    let progress = stage::progress(no, count, Stage::Rl, &steps);
    table.row(Phase::RL, progress, *reward, attempt);
}

fn report_artifacts(run: &RltRun, run_dir: &RunDir, inputs: &Inputs) {
    for stage in stage::enabled_stages(&run.spec) {
        for (student, dir) in stage.outputs(&run.spec, run_dir) {
            let what = student.map_or(stage.label().to_string(), |s| {
                format!("{} {s}", stage.label())
            });
            eprintln!("{what}: {}", dir.display());
        }
    }
    if let Some(held) = &inputs.held_out {
        eprintln!("held-out split: {}", held.display());
    }
}

/// The `kubectl get rltruns --watch` view: a header, then a row per change.
struct Table {
    name: String,
    created: u64,
    last: Option<(Phase, String, u32)>,
}

impl Table {
    fn new(name: &str, created: u64) -> Self {
        Table {
            name: name.into(),
            created,
            last: None,
        }
    }
    fn print_header(&self) {
        println!("{}", display::header(self.name.len()));
    }
    fn row(&mut self, phase: Phase, progress: String, reward: Option<f64>, attempt: u32) {
        let key = (phase, progress.clone(), attempt);
        if self.last.as_ref() == Some(&key) {
            return;
        }
        self.last = Some(key);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        println!(
            "{}",
            display::row(&display::Row {
                name: self.name.clone(),
                phase: phase.as_str().into(),
                progress,
                reward,
                attempt,
                age: Duration::from_secs(now.saturating_sub(self.created)),
            })
        );
    }
}
