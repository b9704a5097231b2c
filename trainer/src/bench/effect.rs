//! `rlt-trainer bench-effect`: shows the effect of RL on the teacher instead of assuming it.
//!
//! On a run over the synthetic task (default `manifests/bench-effect-cpu.yaml`; the pipeline
//! is run first, or resumed when done), using the task's held-out split, which no stage
//! trained on. The run's RL student is first replaced by one fine-tuned on the task's format
//! with gold reasoning (the paper's student is a pretrained instruct model; a random tiny one
//! cannot read an explanation, so its reward would be noise).
//!
//! (a) the mean RLT reward of the warm-up teacher vs the RL teacher: the same number of
//!     explanations per held-out row, the same sampling seeds, scored by the run's frozen RL
//!     student with the run's reward settings;
//! (b) four students, all from the same starting checkpoint and trained with the same
//!     fine-tune settings: distilled from the RL teacher's explanations (the pipeline's own
//!     output), distilled from the warm-up teacher's explanations, fine-tuned on question ->
//!     solution alone (no explanation), and the untouched starting student; each by greedy
//!     accuracy on the held-out questions and by the mean log-prob per token of the gold
//!     solution after its own thought.
//!
//! Figures are printed side by side and written to `<run>/bench-effect/report.json`.
use crate::data::{self, Example, Prompts};
use crate::distill::collect::CollectConfig;
use crate::distill::{run_distill, DistillJob};
use crate::eval::bench::{self, Benchmark};
use crate::eval::run::{evaluate, EvalArgs};
use crate::eval::Sampling;
use crate::model::checkpoint::load_checkpoint;
use crate::pipeline::{pipeline, PipelineArgs};
use crate::rl::reward::RewardConfig;
use crate::rl::rollout::GroupPrompt;
use crate::rl::score::Scorer;
use crate::stage::runconfig::{read_run, Inputs};
use crate::train::sft::{run_sft, SftConfig, SftJob};
use anyhow::{bail, Context, Result};
use clap::Args;
use rlt_api::layout::RunDir;
use rlt_api::spec::RlStage;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

#[derive(Args, Debug)]
pub struct BenchEffectArgs {
    /// The RltRun YAML (synthetic dataset, warm-up and distillation enabled).
    #[arg(default_value = "manifests/bench-effect-cpu.yaml")]
    pub config: PathBuf,
    /// Workspace root (its own, so the comparison never mixes with a demo run's outputs).
    #[arg(long, default_value = "runs/bench-effect")]
    pub workspace: PathBuf,
    /// Explanations sampled per held-out row for the reward comparison.
    #[arg(long, default_value_t = 8)]
    pub reward_samples: usize,
    /// Longest student answer when measuring accuracy.
    #[arg(long, default_value_t = 96)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RewardFigures {
    pub teacher: String,
    pub rows: usize,
    pub samples: usize,
    pub mean_reward: f64,
    pub mean_solution_term: f64,
    pub mean_kl_term: f64,
    pub well_formed: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StudentFigures {
    pub student: String,
    pub checkpoint: String,
    pub rows: usize,
    pub accuracy: f64,
    pub mean_solution_logprob: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EffectReport {
    pub run: String,
    pub held_out: String,
    pub rewards: Vec<RewardFigures>,
    pub students: Vec<StudentFigures>,
}

pub fn bench_effect(a: BenchEffectArgs) -> Result<EffectReport> {
    let mut run = read_run(&a.config)?;
    let spec = &run.spec;
    if !spec.warmup.enabled || !spec.distillation.enabled || spec.dataset.synthetic.is_none() {
        bail!("bench-effect needs a run with warm-up, distillation and a synthetic dataset (its held-out split)");
    }
    let name = run.metadata.name.clone().context("metadata.name")?;
    std::fs::create_dir_all(&a.workspace)
        .with_context(|| format!("creating {}", a.workspace.display()))?;
    let workspace = a.workspace.canonicalize()?;
    let run_dir = RunDir::new(&workspace, &name);
    let mut inputs = Inputs::prepare(&run, &workspace)?;
    let prompts = Prompts::of_run(&run.spec);
    let train = data::load_examples(&inputs.train, false)?.examples;
    let device = Device::Cpu;

    // The RL reward is only as good as the student that reads the explanations. The paper's
    // student is a pretrained instruct model; a tiny random one cannot read anything, so the
    // run's RL student is first fine-tuned on the task's format with its gold reasoning
    // (question -> reasoning + solution, the warm-up's recipe), and the run uses it instead.
    // run_sft skips a fine-tune whose output is complete, so a rerun reuses it.
    let w = &spec.warmup;
    let reader = run_sft(
        SftJob {
            name: "rl-student".into(),
            stage: RunDir::new(run_dir.root(), "bench-effect").distill("rl-student"),
            attempt: 0,
            init_model: inputs.rl_student.clone(),
            device,
            kind: Kind::Float,
            pairs: train
                .iter()
                .map(|e| {
                    data::student_chat(&prompts, e, e.reasoning.as_deref().unwrap_or_default())
                })
                .collect(),
            published: None,
            progress_bar: false,
        },
        &SftConfig::warmup(w),
    )
    .context("fine-tuning the RL student on the task's format")?
    .final_dir;
    run.spec.rl.student = Some(rlt_api::spec::ModelRef {
        path: Some(reader.display().to_string()),
        tiny: None,
    });
    let config = workspace.join(format!("{name}.bench-effect.yaml"));
    std::fs::write(&config, rlt_api::contract::render_config(&run))?;
    let outcome = pipeline(PipelineArgs {
        config,
        workspace: workspace.clone(),
        stage_log: "warn".into(),
    })?;
    let spec = &run.spec;
    inputs.rl_student = reader;
    let held_path = inputs
        .held_out
        .clone()
        .context("the synthetic dataset has no held-out split")?;
    let held = data::load_examples(&held_path, false)?.examples;
    let warm = run_dir.warmup().final_dir();
    let rl = run_dir.rl().final_dir();

    // (a) Teachers.
    let mut rewards = Vec::new();
    for (name, dir) in [("warm-up teacher", &warm), ("RL teacher", &rl)] {
        let f = held_out_reward(
            dir,
            &inputs.rl_student,
            &held,
            &prompts,
            &spec.rl,
            a.reward_samples,
            a.seed,
            device,
        )
        .with_context(|| format!("scoring the {name}"))?;
        rewards.push(RewardFigures {
            teacher: name.into(),
            ..f
        });
    }

    // (b) Students from one starting checkpoint, one fine-tune recipe.
    let (student_name, student_init) = inputs
        .students
        .first()
        .cloned()
        .context("the run has no student")?;
    let d = &spec.distillation;
    let sft = SftConfig::distillation(d);
    let bench_dir = RunDir::new(run_dir.root(), "bench-effect");
    let from_warm = bench_dir.distill("from-warmup-teacher");
    run_distill(DistillJob {
        name: "from-warmup-teacher".into(),
        stage: from_warm.clone(),
        teacher: warm.clone(),
        student_model: student_init.clone(),
        examples: train.clone(),
        prompts: prompts.clone(),
        collect: CollectConfig::of_run(spec),
        sft: sft.clone(),
        attempt: 0,
        device,
        kind: Kind::Float,
        published: None,
    })?;
    let solution_only = bench_dir.distill("solution-only");
    run_sft(
        SftJob {
            name: "solution-only".into(),
            stage: solution_only.clone(),
            attempt: 0,
            init_model: student_init.clone(),
            device,
            kind: Kind::Float,
            pairs: train
                .iter()
                .map(|e| data::student_chat(&prompts, e, ""))
                .collect(),
            published: None,
            progress_bar: false,
        },
        &sft,
    )?;

    let candidates = [
        (
            "distilled from RL teacher",
            run_dir.distill(&student_name).final_dir(),
        ),
        ("distilled from warm-up teacher", from_warm.final_dir()),
        ("question -> solution only", solution_only.final_dir()),
        ("starting student (untrained)", student_init.clone()),
    ];
    let problems = bench::load(Benchmark::Custom, &held_path)?;
    let eval_args = EvalArgs {
        model: PathBuf::new(),
        benchmark: Benchmark::Custom,
        file: held_path.clone(),
        samples: 1,
        temperature: 0.0,
        top_p: 1.0,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
        batch_size: 16,
        limit: None,
        prompts: inputs.prompts,
        out: None,
        keep_completions: false,
        device: crate::stage::cli::DeviceArgs {
            device: "cpu".into(),
            dtype: Some("f32".into()),
            threads: None,
        },
    };
    let mut students = Vec::new();
    for (name, dir) in candidates {
        let (lm, tok) = load_checkpoint(&dir, device, Kind::Float)?;
        let r = evaluate(&lm, &tok, &prompts, &problems, &eval_args, Sampling::Greedy)?;
        students.push(StudentFigures {
            student: name.into(),
            checkpoint: dir.display().to_string(),
            rows: r.problems,
            accuracy: r.accuracy,
            mean_solution_logprob: r.mean_solution_logprob.unwrap_or(f64::NAN),
        });
    }

    let report = EffectReport {
        run: outcome.run_dir.display().to_string(),
        held_out: held_path.display().to_string(),
        rewards,
        students,
    };
    print_report(&report);
    let path = bench_dir.root().join("report.json");
    std::fs::create_dir_all(bench_dir.root())?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    eprintln!("report: {}", path.display());
    Ok(report)
}

fn print_report(r: &EffectReport) {
    println!();
    println!(
        "(a) teachers on the held-out split ({} rows x {} explanations)",
        r.rewards[0].rows, r.rewards[0].samples
    );
    println!(
        "{:<34}{:>12}{:>14}{:>10}{:>13}",
        "teacher", "mean reward", "solution term", "KL term", "well-formed"
    );
    for t in &r.rewards {
        println!(
            "{:<34}{:>12.4}{:>14.4}{:>10.4}{:>12.0}%",
            t.teacher,
            t.mean_reward,
            t.mean_solution_term,
            t.mean_kl_term,
            t.well_formed * 100.0
        );
    }
    println!();
    println!(
        "(b) students on the held-out split ({} rows, greedy)",
        r.students[0].rows
    );
    println!(
        "{:<34}{:>10}{:>26}",
        "student", "accuracy", "solution log-prob/token"
    );
    for s in &r.students {
        println!(
            "{:<34}{:>9.1}%{:>26.4}",
            s.student,
            s.accuracy * 100.0,
            s.mean_solution_logprob
        );
    }
}

/// Mean RLT reward of `teacher`'s explanations for `examples`, `samples` per row, sampled and
/// scored as the RL stage does ([`Scorer`]).
#[allow(clippy::too_many_arguments)]
pub fn held_out_reward(
    teacher: &Path,
    student: &Path,
    examples: &[Example],
    prompts: &Prompts,
    rl: &RlStage,
    samples: usize,
    seed: u64,
    device: Device,
) -> Result<RewardFigures> {
    let scorer = Scorer::load(teacher, student, RewardConfig::of_rl(rl), device)?;
    let (mut reward, mut solution, mut kl, mut well, mut n) = (0.0, 0.0, 0.0, 0usize, 0usize);
    for (i, e) in examples.iter().enumerate() {
        let gp = GroupPrompt::new(&scorer.tok, prompts, e)?;
        // The same seeds for both teachers: a paired comparison.
        let completions = scorer.sample(&gp, samples, rl.max_new_tokens as usize, seed, i)?;
        let (b, wf) = scorer.score(&gp, &completions)?;
        reward += b.reward.sum(Kind::Double).double_value(&[]);
        solution += b.solution.sum(Kind::Double).double_value(&[]);
        kl += b.kl.sum(Kind::Double).double_value(&[]);
        well += wf.iter().filter(|w| **w).count();
        n += completions.len();
    }
    let n_f = n.max(1) as f64;
    Ok(RewardFigures {
        teacher: teacher.display().to_string(),
        rows: examples.len(),
        samples,
        mean_reward: reward / n_f,
        mean_solution_term: solution / n_f,
        mean_kl_term: kl / n_f,
        well_formed: well as f64 / n_f,
    })
}
