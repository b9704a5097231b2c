//! `rlt-trainer distill`: one student's distillation job.
//!
//! 1. The teacher (by default the RL stage's output) writes an explanation for every row of
//!    the dataset into `distill/<student>/traces.jsonl` ([`collect`], resumable via
//!    [`traces`]).
//! 2. The student is fine-tuned on question -> explanation + solution in the student's format
//!    with the loss on completion tokens only, by the same SFT code as the warm-up
//!    ([`crate::train::sft::run_sft`]: checkpoints in `distill/<student>/checkpoints/`, resume after a
//!    kill, the final HF checkpoint in `distill/<student>/final/`).
//!
//! Several students each get their own job (and `RLT_STUDENT`) and their own directory.
pub mod collect;
pub mod traces;

use crate::data::{Example, Prompts};
use crate::metrics::Published;
use crate::model::checkpoint::load_checkpoint;
use crate::model::tokenizer::Tokenizer;
use crate::stage::cli::{DataArgs, DeviceArgs, SftArgs, StageArgs};
use crate::stage::runconfig::{flag_or_run, Staged};
use crate::train::collective::Group;
use crate::train::sft::{run_sft_ranks, SftConfig, SftJob, SftOutcome};
use anyhow::{bail, Context, Result};
use clap::Args;
use collect::CollectConfig;
use rlt_api::contract::{env, TrainingFigures};
use rlt_api::layout::{is_complete, StageDir};
use rlt_api::spec::defaults;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DistillArgs {
    /// The student's name: its directory `distill/<name>/` in the run.
    #[arg(long = "student", env = env::STUDENT)]
    pub student: String,
    /// The student's starting checkpoint (HF layout); default: the run's student `--student`.
    #[arg(long)]
    pub student_model: Option<PathBuf>,
    /// The teacher checkpoint (default: the RL stage's output, `rl/final`).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// The student's context: the longest student chat (question, trace, solution) in tokens
    /// (`distillation.traceSplitting.maxTokensPerTrace`).
    #[arg(long)]
    pub max_tokens_per_trace: Option<usize>,
    /// Most samples per row until one closes and fits the student's context; the first that
    /// does is the row's one training example (`distillation.traceSplitting.traces`).
    #[arg(long)]
    pub traces: Option<usize>,
    /// Teacher sampling temperature for the explanations (`rl.temperature`).
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Rows per teacher generation batch (`distillation.batchSize`).
    #[arg(long)]
    pub collect_batch_size: Option<usize>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub stage: StageArgs,
    #[command(flatten)]
    pub ranks: crate::train::ranks::RankArgs,
    #[command(flatten)]
    pub sft: SftArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// What one distillation job did.
#[derive(Debug)]
pub struct DistillOutcome {
    pub traces_path: PathBuf,
    pub rows: usize,
    /// Rows collected by this process (0 when the file was already complete).
    pub rows_collected: usize,
    pub incomplete_rows: usize,
    pub pairs: usize,
    pub sft: SftOutcome,
}

impl DistillArgs {
    /// How the teacher's explanations are collected: the run's recipe (a hand run: the spec's
    /// defaults) with the flags given over it.
    pub fn collect_config(&self, run: Option<&Staged>) -> CollectConfig {
        let mut c = match run {
            Some(s) => CollectConfig::of_run(s.spec()),
            None => CollectConfig::of(&defaults::distillation(), defaults::temperature()),
        };
        let set = |dst: &mut usize, flag: Option<usize>| *dst = flag.unwrap_or(*dst);
        set(&mut c.max_tokens_per_trace, self.max_tokens_per_trace);
        set(&mut c.traces, self.traces);
        set(&mut c.batch_size, self.collect_batch_size);
        c.temperature = self.temperature.unwrap_or(c.temperature);
        c.top_p = self.top_p.unwrap_or(c.top_p);
        c.seed = self.sft.seed.unwrap_or(c.seed);
        c
    }

    /// The run's fine-tune (a hand run: the spec's default one) with the flags given over it.
    pub fn sft_config(&self, run: Option<&Staged>) -> SftConfig {
        let d = run.map_or_else(defaults::distillation, |s| s.spec().distillation.clone());
        SftConfig {
            keep_after_final: crate::stage::cli::keep_after_final(run),
            ..self.sft.over(SftConfig::distillation(&d))
        }
    }
}

pub fn distill(a: DistillArgs) -> Result<()> {
    let run = Staged::from_env()?;
    let run = run.as_ref();
    let mut sft = a.sft_config(run);
    let run_dir = a.stage.run_dir(run)?;
    let student_model = match (&a.student_model, run) {
        (Some(m), _) => m.clone(),
        (None, Some(s)) => s.student_model(&a.student)?,
        (None, None) => flag_or_run(None, None, "--student-model")?,
    };
    let (device, kind) = a.device.resolve_for(run)?;
    if crate::train::ranks::prepare_stage(
        &a.ranks,
        &mut sft,
        &student_model,
        (
            format!("distillation of student {}", a.student),
            "distillation",
        ),
        run_dir.distill(&a.student).root(),
        (device, kind),
    )? {
        return Ok(());
    }
    let job = DistillJob {
        name: a.student.clone(),
        stage: run_dir.distill(&a.student),
        teacher: a
            .teacher
            .clone()
            .unwrap_or_else(|| run_dir.rl().final_dir()),
        student_model,
        examples: a.data.load(run)?,
        prompts: a.data.prompts.over(run),
        collect: a.collect_config(run),
        sft,
        attempt: a.stage.attempt,
        device: a.ranks.device(device),
        kind,
        // One metrics server per pod: its first local rank's.
        published: if a.ranks.local_rank.unwrap_or(0) == 0 {
            crate::stage::cli::publish(&a.stage)?
        } else {
            None
        },
    };
    let mut group = a.ranks.join(&a.stage.bind, a.stage.attempt, job.device)?;
    run_distill_ranks(job, &mut group).map(|_| ())
}

/// One student's distillation, wherever its directory is (the run's `distill/<student>/`, or
/// a benchmark's).
pub struct DistillJob {
    pub name: String,
    pub stage: StageDir,
    pub teacher: PathBuf,
    pub student_model: PathBuf,
    pub examples: Vec<Example>,
    pub prompts: Prompts,
    pub collect: CollectConfig,
    pub sft: SftConfig,
    pub attempt: u32,
    pub device: tch::Device,
    pub kind: tch::Kind,
    pub published: Option<Published>,
}

pub fn run_distill(job: DistillJob) -> Result<DistillOutcome> {
    run_distill_ranks(job, &mut Group::single())
}

/// [`run_distill`] as one of `group.world` data-parallel ranks: each collects the
/// explanations of every `world`-th row, then all fine-tune the student together.
pub fn run_distill_ranks(job: DistillJob, group: &mut Group) -> Result<DistillOutcome> {
    let DistillJob {
        name,
        stage,
        teacher,
        student_model,
        examples,
        prompts,
        collect: cfg,
        sft,
        attempt,
        device,
        kind,
        published,
    } = job;
    for (what, dir) in [("teacher", &teacher), ("student", &student_model)] {
        if !dir.join(crate::model::checkpoint::CONFIG_FILE).exists() {
            bail!(
                "{what} checkpoint {} does not exist (no config.json)",
                dir.display()
            );
        }
    }
    let student_tok = Tokenizer::from_dir(&student_model)?;

    // 1. Explanations, resumable, every rank writing its share of the rows.
    let traces_path = stage.traces();
    let collector = Collector {
        teacher: &teacher,
        student_tok: &student_tok,
        prompts: &prompts,
        examples: &examples,
        cfg: &cfg,
        device,
        kind,
        published: published.as_ref(),
        name: &name,
    };
    let (rows, rows_collected) = collector.run(&traces_path, group)?;
    let incomplete_rows = rows.iter().filter(|r| !r.complete).count();
    tracing::info!(file = %traces_path.display(), rows = rows.len(), incomplete_rows, "explanations ready");

    // 2. The student's fine-tune (shared SFT code; it skips a finished stage itself).
    let pairs = collect::student_pairs(&prompts, &rows, &examples);
    let n_pairs = pairs.len();
    let sft_job = SftJob {
        name: "distill".into(),
        stage: stage.clone(),
        attempt,
        init_model: student_model,
        device,
        kind,
        pairs,
        published,
        progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let outcome = run_sft_ranks(sft_job, &sft, group).context("fine-tuning the student")?;
    if !is_complete(&stage.final_dir()) {
        bail!(
            "the fine-tune finished without a complete {}",
            stage.final_dir().display()
        );
    }
    tracing::info!(student = %name, final_dir = %outcome.final_dir.display(), pairs = n_pairs, "distillation complete");
    Ok(DistillOutcome {
        traces_path,
        rows: rows.len(),
        rows_collected,
        incomplete_rows,
        pairs: n_pairs,
        sft: outcome,
    })
}

/// What collecting a student's explanations needs.
struct Collector<'a> {
    teacher: &'a std::path::Path,
    student_tok: &'a Tokenizer,
    prompts: &'a Prompts,
    examples: &'a [Example],
    cfg: &'a CollectConfig,
    device: tch::Device,
    kind: tch::Kind,
    published: Option<&'a Published>,
    name: &'a str,
}

impl Collector<'_> {
    /// The traces of every row, in `traces_path`, and how many rows this process collected.
    /// Rank r of W writes rows r, r + W, ... into its own part (resumable), rank 0 merges the
    /// parts once all are done; one rank writes `traces_path` itself.
    fn run(
        &self,
        traces_path: &std::path::Path,
        group: &mut Group,
    ) -> Result<(Vec<traces::TraceRow>, usize)> {
        let n = self.examples.len();
        if traces_path.exists() {
            let rows = traces::read_rows(traces_path)?;
            if rows.len() == n {
                return Ok((rows, 0));
            }
        }
        let (rank, world) = (group.rank, group.world);
        let part = |r: usize| {
            if world == 1 {
                traces_path.to_path_buf()
            } else {
                traces_path.with_extension(format!("part-{r}-of-{world}.jsonl"))
            }
        };
        let question_of = |i: usize| self.examples.get(i).map(|e| e.question.as_str());
        let (mut file, done) = traces::TraceFile::open_part(&part(rank), rank, world, question_of)?;
        let mine = n.saturating_sub(rank).div_ceil(world);
        let mut collected = 0;
        if done.len() < mine {
            collected = self.collect(&mut file, done.len(), mine, world)?;
        }
        if world > 1 {
            // The others may still be generating: wait without the collective's timeout.
            group.barrier_unbounded()?;
            if rank == 0 {
                let parts: Vec<_> = (0..world).map(part).collect();
                traces::merge_parts(traces_path, &parts)?;
            }
            group.barrier_unbounded()?;
        }
        Ok((traces::read_rows(traces_path)?, collected))
    }

    /// Collects this rank's remaining rows into `file`; returns how many.
    fn collect(
        &self,
        file: &mut traces::TraceFile,
        done: usize,
        mine: usize,
        world: usize,
    ) -> Result<usize> {
        let (teacher_lm, teacher_tok) = load_checkpoint(self.teacher, self.device, self.kind)?;
        if !teacher_tok.same_vocab(self.student_tok) {
            tracing::warn!("teacher and student tokenizers differ: trace budgets are counted in the student's tokens");
        }
        // Before generating anything: the rows per pass that fit the device.
        let mut prompt = 0;
        for e in self.examples {
            prompt = prompt.max(
                teacher_tok
                    .encode(&crate::data::teacher_rl_prompt(self.prompts, e))?
                    .len(),
            );
        }
        let cfg = CollectConfig {
            batch_size: crate::train::memory::check_collection(
                self.teacher,
                self.kind.elt_size_in_bytes() as u32,
                self.cfg.batch_size,
                prompt as u32,
                self.cfg.max_tokens_per_trace as u32,
                self.device,
            )
            .map_err(crate::exit::bad_config)?,
            ..self.cfg.clone()
        };
        let total = self.examples.len() as u64;
        tracing::info!(student = %self.name, teacher = %self.teacher.display(), rows = mine, resume_at = done, rows_per_pass = cfg.batch_size, "collecting explanations");
        let bar = crate::eval::run::progress_bar(mine as u64, &format!("traces {}", self.name));
        bar.set_position(done as u64);
        let mut rows = done;
        let show = |rows: usize| {
            if let Some(p) = self.published {
                // This rank's share, scaled to the whole dataset.
                p.set_figures(TrainingFigures {
                    step: ((rows * world) as u64).min(total),
                    total_steps: total,
                    ..Default::default()
                });
            }
        };
        show(rows);
        collect::collect(
            &teacher_lm,
            &teacher_tok,
            self.student_tok,
            self.prompts,
            self.examples,
            file,
            &cfg,
            |k| {
                rows += k;
                show(rows);
                bar.inc(k as u64)
            },
        )?;
        bar.finish_and_clear();
        Ok(rows - done)
    }
}
