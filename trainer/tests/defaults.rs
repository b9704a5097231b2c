//! One source of configuration: a role builds its typed configuration from the run's spec
//! (`RLT_CONFIG`) or, in a hand run, from the spec's defaults (`rlt_api::spec::defaults`), and
//! the flags given are overrides over it. So a hand run with no flags means what a pod of a run
//! with every default means.
use clap::{Args, Parser};
use rlt_api::spec::{defaults, TinyModel};
use rlt_trainer::data::Prompts;
use rlt_trainer::distill::collect::CollectConfig;
use rlt_trainer::distill::DistillArgs;
use rlt_trainer::model::config::TinySpec;
use rlt_trainer::rl::cli::{LearnerArgs, ParamServerArgs};
use rlt_trainer::rl::reward::RewardConfig;
use rlt_trainer::rl::shard::RlOptimizer;
use rlt_trainer::stage::cli::{TinyArgs, WarmupArgs};
use rlt_trainer::stage::runconfig::{Inputs, Staged};
use rlt_trainer::train::sft::SftConfig;

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
const LEARNER: [&str; 6] = [
    "--param-servers",
    "ps:1",
    "--replica-index",
    "0",
    "--replicas",
    "1",
];

#[test]
fn a_hand_run_learner_and_parameter_server_use_the_specs_rl_defaults() {
    let rl = defaults::rl();
    let l: LearnerArgs = hand(&[&STAGE[..], &LEARNER].concat());
    let grpo = l.optim.grpo(&rl);
    let rollout = l.rollout.config(&rl, grpo.clone());
    assert_eq!(rollout.max_new_tokens, 16384);
    assert_eq!(rollout.max_new_tokens, rl.max_new_tokens as usize);
    assert_eq!(l.rollout.groups_per_step(&rl), rl.batch_size as usize);
    assert_eq!(rollout.group_size, rl.group_size as usize);
    assert_eq!(rollout.temperature, rl.temperature);
    assert_eq!(rollout.reward, RewardConfig::of_rl(&rl));
    assert_eq!(rollout.reward, RewardConfig::default());
    assert_eq!(l.optim.optimizer(&rl), RlOptimizer::of_rl(&rl));
    assert_eq!(l.optim.steps(&rl), u64::from(rl.steps));
    assert_eq!(grpo.beta, rl.beta);
    assert_eq!(grpo.ref_mix_alpha, rl.reference_sync.mix);
    assert_eq!(grpo.ref_sync_every, u64::from(rl.reference_sync.interval));

    let flags = [&STAGE[..], &["--replica-index", "0", "--replicas", "1"]].concat();
    let p: ParamServerArgs = hand(&flags);
    assert_eq!(p.optim.optimizer(&rl), RlOptimizer::of_rl(&rl));
    assert_eq!(p.optim.optimizer(&rl).max_grad_norm, 1.0);
    assert_eq!(p.checkpoint_every, None, "the spec's interval applies");
}

#[test]
fn a_hand_run_warm_up_and_distillation_use_the_specs_recipes() {
    let w: WarmupArgs = hand(&STAGE);
    assert_eq!(w.sft_config(None), SftConfig::warmup(&defaults::warmup()));
    assert_eq!(SftConfig::default(), SftConfig::warmup(&defaults::warmup()));
    assert_eq!(w.sft_config(None).max_len, 16384);
    assert_eq!(w.sft_config(None).checkpoint_every, 50);

    let d: DistillArgs = hand(&[&STAGE[..], &["--student", "s"]].concat());
    let spec = defaults::distillation();
    assert_eq!(d.sft_config(None), SftConfig::distillation(&spec));
    assert_eq!(
        d.collect_config(None),
        CollectConfig::of(&spec, defaults::temperature())
    );
    // And a flag still overrides its one setting.
    let d: DistillArgs = hand(&[&STAGE[..], &["--student", "s", "--epochs", "7"]].concat());
    assert_eq!(d.sft_config(None).epochs, 7);
    assert_eq!(d.sft_config(None).batch_size, spec.batch_size as usize);
}

fn staged(yaml: &str) -> Staged {
    let run = rlt_api::parse_yaml(yaml).unwrap();
    Staged {
        run,
        inputs: Inputs {
            teacher: "/w/t".into(),
            rl_init: "/w/t".into(),
            rl_student: "/w/s".into(),
            students: vec![("s".into(), "/w/s".into())],
            train: "/w/train.jsonl".into(),
            held_out: None,
            prompts: rlt_trainer::stage::cli::PromptStyle::Standard,
        },
    }
}

const RUN: &str = "apiVersion: rlt.dev/v1alpha1
kind: RltRun
metadata: {name: r}
spec:
  image: i
  teacher: {path: t}
  dataset: {path: d.jsonl}
  prompts: {teacher: 'Explain it.', student: 'Solve it.'}
  warmup: {epochs: 2, warmupRatio: 0.2, optimizer: {beta1: 0.8, beta2: 0.9, weightDecay: 0.01, maxGradNorm: 2.0}}
  rl: {student: {path: s}, maxNewTokens: 99, groupSize: 4, optimizer: {beta1: 0.9, beta2: 0.99, weightDecay: 0.0, maxGradNorm: 0.5}}
  distillation: {batchSize: 8, traceSplitting: {traces: 3}, students: [{name: s, model: {path: s}}]}
";

#[test]
fn a_staged_role_builds_its_configuration_from_the_runs_spec_and_flags_override_it() {
    let s = staged(RUN);
    let spec = s.spec().clone();
    let w: WarmupArgs = hand(&STAGE);
    assert_eq!(w.sft_config(Some(&s)), SftConfig::warmup(&spec.warmup));
    assert_eq!(w.sft_config(Some(&s)).adamw.beta1, 0.8);
    assert_eq!(w.sft_config(Some(&s)).clip_grad_norm, 2.0);
    // The system prompts reach every chat from spec.prompts.
    let p = w.data.prompts.over(Some(&s));
    assert_eq!(
        p,
        Prompts {
            teacher_system: "Explain it.".into(),
            student_system: "Solve it.".into()
        }
    );
    let w: WarmupArgs = hand(&[&STAGE[..], &["--teacher-system", "Mine."]].concat());
    assert_eq!(w.data.prompts.over(Some(&s)).teacher_system, "Mine.");
    assert_eq!(w.data.prompts.over(Some(&s)).student_system, "Solve it.");

    let l: LearnerArgs = hand(&[&STAGE[..], &LEARNER, &["--group-size", "6"]].concat());
    let rollout = l.rollout.config(&spec.rl, l.optim.grpo(&spec.rl));
    assert_eq!((rollout.max_new_tokens, rollout.group_size), (99, 6));
    assert_eq!(l.optim.optimizer(&spec.rl).max_grad_norm, 0.5);

    let d: DistillArgs = hand(&[&STAGE[..], &["--student", "s"]].concat());
    assert_eq!(d.collect_config(Some(&s)), CollectConfig::of_run(&spec));
    assert_eq!(d.collect_config(Some(&s)).traces, 3);
    assert_eq!(d.sft_config(Some(&s)).batch_size, 8);
    assert_eq!(
        s.student_model("s").unwrap(),
        std::path::PathBuf::from("/w/s")
    );
    assert!(s.student_model("other").is_err());
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
