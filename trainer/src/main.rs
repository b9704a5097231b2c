//! `rlt-trainer <role>`: one subcommand per role of the RLT pipeline. A failing role exits
//! with [`exit::BAD_CONFIG`] (do not retry) or [`exit::CRASH`] and leaves its error chain in
//! the termination message (see [`rlt_trainer::exit`]).
use anyhow::Result;
use clap::{Parser, Subcommand};
use rlt_trainer::exit;
use rlt_trainer::stage::cli;

#[derive(Parser)]
#[command(name = "rlt-trainer", version, about = "RLT trainer (tch/libtorch)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a tiny random Qwen2 model and the tiny tokenizer as a checkpoint directory.
    InitTiny(cli::InitTinyArgs),
    /// Sample continuations of prompts from a checkpoint (a smoke test of a model).
    Generate(cli::GenerateArgs),
    /// Warm-up stage: supervised fine-tuning of the teacher on the teacher format.
    Warmup(cli::WarmupArgs),
    /// GiB per GPU of a bf16 fine-tune by Qwen2 size, sequence length and ranks, and of an RL
    /// learner and parameter server (the README's tables; the memory preflight's arithmetic).
    Memory,
    /// Write the synthetic arithmetic task (train.jsonl, heldout.jsonl).
    Synth(cli::SynthArgs),
    /// Time the SFT step and batched sampling here and in transformers, side by side.
    Bench(rlt_trainer::bench::versus_transformers::BenchArgs),
    /// RL stage: a parameter server owning one shard of the teacher and its AdamW state.
    ParamServer(rlt_trainer::rl::cli::ParamServerArgs),
    /// RL stage: a learner (sample, score with the frozen student, GRPO gradients).
    Learner(rlt_trainer::rl::cli::LearnerArgs),
    /// The RLT reward of explanations (given in a file, or sampled by the teacher), term by
    /// term, as JSON lines: the RL stage's own scoring, for debugging a reward.
    Score(rlt_trainer::rl::score::ScoreArgs),
    /// Time RL steps (generation, scoring, backward, communication) for 1 vs 2 learners.
    RlBench(rlt_trainer::rl::bench::RlBenchArgs),
    /// Distillation: the teacher explains every dataset row, then the student is fine-tuned.
    Distill(rlt_trainer::distill::DistillArgs),
    /// Accuracy of a checkpoint on a benchmark file (MATH-500, AIME 2024, GPQA Diamond, custom).
    Eval(rlt_trainer::eval::run::EvalArgs),
    /// Run an RltRun's stages here as local processes, as the operator would on a cluster.
    Pipeline(rlt_trainer::pipeline::PipelineArgs),
    /// The trainer on a device in one JSON report: numerics and speed against transformers,
    /// an RL group's memory against its preflight (the GPU kit's check; CPU at small shapes).
    GpuCheck(rlt_trainer::bench::gpu_check::GpuCheckArgs),
    /// The effect of RL, measured: warm-up vs RL teacher reward, and students distilled from
    /// each (and from solutions alone) by held-out accuracy and solution log-likelihood.
    BenchEffect(rlt_trainer::bench::effect::BenchEffectArgs),
    /// What a data-parallel update moves across rank processes here, over libtorch's c10d (Gloo).
    BenchCollectives(rlt_trainer::bench::collectives::BenchCollectivesArgs),
    /// An RL group's generation (G samples of one prompt), rlt-trainer beside transformers.
    BenchGeneration(rlt_trainer::bench::generation::BenchGenerationArgs),
}

fn main() {
    exit::end_at_termination();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a pod's log (and the last line the operator lifts into
        // the run's condition from it) stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A role started with RLT_CONFIG (an operator pod) builds its configuration from the run
    // (`runconfig::Staged`); flags given on the command line override it.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and succeed.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            exit::write_termination_log(&e.render().to_string());
            std::process::exit(exit::BAD_CONFIG);
        }
    };
    if let Err(e) = run(cli) {
        std::process::exit(exit::report(&e));
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::InitTiny(a) => cli::init_tiny(a),
        Command::Generate(a) => cli::generate(a),
        Command::Warmup(a) => cli::warmup(a),
        Command::Memory => {
            use rlt_trainer::train::memory;
            print!(
                "{}\n{}",
                memory::table(&memory::README_LENGTHS, &memory::README_RANKS),
                memory::rl_table(&memory::README_LENGTHS)
            );
            Ok(())
        }
        Command::Synth(a) => cli::synth(a),
        Command::Bench(a) => rlt_trainer::bench::versus_transformers::bench(a),
        Command::ParamServer(a) => rlt_trainer::rl::cli::param_server(a),
        Command::Learner(a) => rlt_trainer::rl::cli::learner(a),
        Command::Score(a) => rlt_trainer::rl::score::score(a),
        Command::RlBench(a) => rlt_trainer::rl::bench::rl_bench(a),
        Command::Distill(a) => rlt_trainer::distill::distill(a),
        Command::Eval(a) => rlt_trainer::eval::run::eval(a).map(|_| ()),
        Command::Pipeline(a) => rlt_trainer::pipeline::pipeline(a).map(|_| ()),
        Command::GpuCheck(a) => rlt_trainer::bench::gpu_check::gpu_check(a),
        Command::BenchEffect(a) => rlt_trainer::bench::effect::bench_effect(a).map(|_| ()),
        Command::BenchCollectives(a) => rlt_trainer::bench::collectives::bench_collectives(a),
        Command::BenchGeneration(a) => rlt_trainer::bench::generation::bench_generation(a),
    }
}
