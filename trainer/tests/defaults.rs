//! One source of defaults: a role started by hand, with no flags beyond the required ones,
//! means what a pod started from an RltRun with every default means (`rlt_api::spec::defaults`).
use clap::{Args, Parser};
use rlt_api::spec::{defaults, TinyModel};
use rlt_trainer::cli::{TinyArgs, WarmupArgs};
use rlt_trainer::config::TinySpec;
use rlt_trainer::distill::collect::CollectConfig;
use rlt_trainer::distill::DistillArgs;
use rlt_trainer::rl::cli::{LearnerArgs, ParamServerArgs};
use rlt_trainer::rl::reward::RewardConfig;
use rlt_trainer::rl::shard::RlOptimizer;
use rlt_trainer::sft::SftConfig;

#[derive(Parser)]
struct Hand<A: Args> {
    #[command(flatten)]
    args: A,
}

fn hand<A: Args>(flags: &[&str]) -> A {
    let argv = std::iter::once("rlt-trainer").chain(flags.iter().copied());
    Hand::<A>::try_parse_from(argv).unwrap().args
}

const STAGE: [&str; 4] = ["--workspace", "/w", "--run", "r"];

#[test]
fn a_hand_run_learner_and_parameter_server_use_the_specs_rl_defaults() {
    let rl = defaults::rl();
    let flags = [
        &STAGE[..],
        &[
            "--param-servers",
            "ps:1",
            "--replica-index",
            "0",
            "--replicas",
            "1",
        ],
        &["--student", "/s", "--data", "/d.jsonl"],
    ]
    .concat();
    let l: LearnerArgs = hand(&flags);
    assert_eq!(l.rollout.max_new_tokens, 16384);
    assert_eq!(l.rollout.max_new_tokens, rl.max_new_tokens as usize);
    assert_eq!(l.rollout.groups_per_step, rl.batch_size as usize);
    assert_eq!(l.rollout.group_size, rl.group_size as usize);
    assert_eq!(l.rollout.temperature, rl.temperature);
    let rollout = l.rollout.config(l.optim.grpo());
    assert_eq!(rollout.reward, RewardConfig::of_rl(&rl));
    assert_eq!(l.optim.optimizer(), RlOptimizer::of_rl(&rl));
    assert_eq!(l.optim.steps, u64::from(rl.steps));
    assert_eq!(l.optim.beta, rl.beta);
    assert_eq!(l.optim.ref_mix_alpha, rl.reference_sync.mix);
    assert_eq!(
        l.optim.ref_sync_every,
        u64::from(rl.reference_sync.interval)
    );

    let flags = [
        &STAGE[..],
        &["--replica-index", "0", "--replicas", "1", "--learners", "1"],
    ]
    .concat();
    let p: ParamServerArgs = hand(&flags);
    assert_eq!(p.checkpoint_every, u64::from(rl.checkpoint_interval));
    assert_eq!(p.optim.optimizer(), RlOptimizer::of_rl(&rl));
    assert_eq!(p.optim.optimizer().max_grad_norm, 1.0);
}

#[test]
fn a_hand_run_warm_up_and_distillation_use_the_specs_recipes() {
    let w: WarmupArgs = hand(&[&STAGE[..], &["--model", "/m", "--data", "/d.jsonl"]].concat());
    assert_eq!(w.sft_config(), SftConfig::warmup(&defaults::warmup()));
    assert_eq!(SftConfig::default(), SftConfig::warmup(&defaults::warmup()));
    assert_eq!(w.sft_config().max_len, 16384);
    assert_eq!(w.sft_config().checkpoint_every, 50);

    let d: DistillArgs = hand(
        &[
            &STAGE[..],
            &[
                "--student",
                "s",
                "--student-model",
                "/m",
                "--data",
                "/d.jsonl",
            ],
        ]
        .concat(),
    );
    let spec = defaults::distillation();
    assert_eq!(d.sft_config(), SftConfig::distillation(&spec));
    assert_eq!(
        d.collect_config(),
        CollectConfig::of(&spec, defaults::temperature())
    );
    // And a flag still overrides its one setting.
    let d: DistillArgs = hand(
        &[
            &STAGE[..],
            &[
                "--student",
                "s",
                "--student-model",
                "/m",
                "--data",
                "/d.jsonl",
            ],
            &["--epochs", "7"],
        ]
        .concat(),
    );
    assert_eq!(d.sft_config().epochs, 7);
    assert_eq!(d.sft_config().batch_size, spec.batch_size as usize);
}

#[test]
fn a_hand_made_tiny_model_is_the_specs_tiny_model() {
    let t: TinyArgs = hand(&[]);
    assert_eq!(t.spec(), TinySpec::from(&TinyModel::default()));
    assert_eq!(TinySpec::default().intermediate_size, 128);
}

#[test]
fn distillation_defaults_to_the_reference_students_recipe() {
    let c = SftConfig::distillation(&defaults::distillation());
    assert_eq!((c.epochs, c.batch_size, c.lr), (3, 96, 1e-5));
    assert_eq!(c.warmup_ratio, 0.1);
    assert_eq!(
        (c.adamw.beta1, c.adamw.beta2, c.adamw.weight_decay),
        (0.9, 0.999, 0.0)
    );
    // The warm-up keeps the teacher's recipe.
    let w = SftConfig::warmup(&defaults::warmup());
    assert_eq!((w.batch_size, w.warmup_ratio), (16, 0.05));
    assert_eq!((w.adamw.beta2, w.adamw.weight_decay), (0.95, 1e-4));
}
