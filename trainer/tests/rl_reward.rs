//! The RL stage's learning signal on tiny models: the RLT reward computed through the models
//! matches a direct per-row computation, the mean reward rises over RL steps on the synthetic
//! task after the warm-up, and bad inputs fail fast.
use std::path::{Path, PathBuf};

use rlt_api::layout::RunDir;
use rlt_trainer::data::synthetic::{generate, SyntheticSpec};
use rlt_trainer::data::{student_chat, student_segments, teacher_chat, Example, Prompts};
use rlt_trainer::model::checkpoint::{save_checkpoint, CausalLm};
use rlt_trainer::model::config::TinySpec;
use rlt_trainer::model::tokenizer::Tokenizer;
use rlt_trainer::rl::grpo::GrpoConfig;
use rlt_trainer::rl::learner::{compute_step, LocalRun, Models};
use rlt_trainer::rl::reward::RewardConfig;
use rlt_trainer::rl::rollout::{score_completions, with_first_column, GroupPrompt, RolloutConfig};
use rlt_trainer::rl::shard::RlOptimizer;
use rlt_trainer::train::sft::{run_sft, SftConfig, SftJob};
use tch::{Device, Kind, Tensor};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlt-rlr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spec(seed: u64) -> TinySpec {
    TinySpec {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 128,
        seed,
    }
}

fn tiny(dir: &Path, seed: u64) {
    let tok = Tokenizer::tiny();
    save_checkpoint(
        dir,
        &CausalLm::tiny(&spec(seed), &tok, Device::Cpu, Kind::Float).unwrap(),
        &tok,
    )
    .unwrap();
}

/// Log-prob of `ids[p]` given `ids[..p]` for one unpadded row, computed directly.
fn direct_row_log_probs(lm: &CausalLm, ids: &[i64], temperature: f64) -> Vec<f64> {
    let _g = tch::no_grad_guard();
    let x = Tensor::from_slice(ids).unsqueeze(0);
    let logits = lm
        .model
        .forward(&x, None, None)
        .squeeze_dim(0)
        .to_kind(Kind::Double);
    (1..ids.len())
        .map(|p| {
            let row = logits.get(p as i64 - 1) / temperature;
            let lse = row.logsumexp([0i64].as_slice(), false).double_value(&[]);
            row.double_value(&[ids[p]]) - lse
        })
        .collect()
}

/// A completion's reward and the two terms it is made of.
#[derive(Debug, Clone, Copy)]
struct Terms {
    solution: f64,
    kl: f64,
    reward: f64,
}

impl Terms {
    /// Term by term within `tol`, naming the term that differs.
    fn assert_close(&self, expected: &Terms, tol: f64, what: &str) {
        for (name, got, want) in [
            ("solution term", self.solution, expected.solution),
            ("KL term", self.kl, expected.kl),
            ("reward", self.reward, expected.reward),
        ] {
            assert!(
                (got - want).abs() < tol,
                "{what}: {name} is {got}, computed by hand {want}"
            );
        }
    }
}

/// The reward of one completion computed by hand, row by row without padding: the student's
/// chat built as text with `explanation` as its thought and tokenized, the solution term over
/// the solution's tokens, the KL term over the explanation's tokens (the completion starts
/// with them: completions here are encoded text), the teacher in its own sequence.
fn reward_by_hand(
    models: &Models,
    e: &Example,
    prompt: &GroupPrompt,
    explanation: &str,
    completion: &[i64],
    well_formed: bool,
    cfg: &RewardConfig,
) -> Terms {
    let tok = &models.tokenizer;
    let [prefix, thought, middle, solution, suffix] =
        student_segments(&Prompts::short(), e, explanation);
    let before = tok.encode(&format!("{prefix}{thought}{middle}")).unwrap();
    let sol_ids = tok.encode(&solution).unwrap();
    let s_row = [
        before.clone(),
        sol_ids.clone(),
        tok.encode(&suffix).unwrap(),
    ]
    .concat();
    let s_lp = direct_row_log_probs(&models.student, &s_row, cfg.student_temperature);
    let sol: Vec<f64> = (before.len()..before.len() + sol_ids.len())
        .map(|p| s_lp[p - 1])
        .collect();
    let sol_term = sol.iter().sum::<f64>() / sol.len() as f64
        + 0.01 * sol.iter().cloned().fold(f64::INFINITY, f64::min);
    let expl = tok.encode(explanation).unwrap();
    assert_eq!(&completion[..expl.len()], &expl[..], "{explanation:?}");
    let p_len = prompt.teacher_prompt.len();
    let t_row = [prompt.teacher_prompt.clone(), completion.to_vec()].concat();
    let t_lp = direct_row_log_probs(&models.teacher, &t_row, cfg.teacher_temperature);
    let at = tok.encode(&prefix).unwrap().len();
    let kl: Vec<f64> = (0..expl.len())
        .map(|j| t_lp[p_len + j - 1] - s_lp[at + j - 1])
        .collect();
    let kl_term = if kl.is_empty() {
        0.0
    } else {
        3.0 * kl.iter().sum::<f64>() / kl.len() as f64
            + 0.03 * kl.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
    };
    let penalty = if well_formed { 0.0 } else { -1.0 };
    Terms {
        solution: sol_term,
        kl: kl_term,
        reward: sol_term - kl_term + penalty,
    }
}

/// Scores completions (given as text) through `score_completions` (batched, left-padded
/// student chats, right-padded teacher completions): the terms and which parsed.
fn score_texts(models: &Models, prompt: &GroupPrompt, texts: &[String]) -> (Vec<Terms>, Vec<bool>) {
    let tok = &models.tokenizer;
    let ids = models.special_ids().unwrap();
    let cfg = RewardConfig::default();
    let completions: Vec<Vec<i64>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    // Teacher log-probs of prompt + completion, batched with right padding (as generated).
    let p_len = prompt.teacher_prompt.len();
    let rows: Vec<Vec<i64>> = completions
        .iter()
        .map(|c| [prompt.teacher_prompt.clone(), c.clone()].concat())
        .collect();
    let (t_ids, t_mask) = rlt_trainer::engine::sampling::right_pad(&rows, ids.pad, Device::Cpu);
    let t_lp = tch::no_grad(|| {
        with_first_column(rlt_trainer::engine::logprobs::sequence_logprobs(
            &models.teacher.model,
            &t_ids,
            Some(&t_mask),
            cfg.teacher_temperature,
        ))
    });
    let (got, well_formed) = score_completions(
        &models.student,
        tok,
        &t_lp,
        p_len,
        prompt,
        &completions,
        &ids,
        &cfg,
        2,
    )
    .unwrap();
    let values = |t: &tch::Tensor| Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap();
    let (solution, kl, reward) = (values(&got.solution), values(&got.kl), values(&got.reward));
    let terms = (0..texts.len())
        .map(|k| Terms {
            solution: solution[k],
            kl: kl[k],
            reward: reward[k],
        })
        .collect();
    (terms, well_formed)
}

fn sum_example() -> Example {
    Example {
        question: "Compute 2 + 3.".into(),
        solution: "5".into(),
        reasoning: None,
        system: None,
    }
}

/// The reward through `score_completions` equals a per-row computation with no padding at
/// all, including the min/max reductions and the format penalty of a completion without its
/// closing tag.
#[test]
fn reward_through_tiny_models_matches_direct_computation() {
    tch::set_num_threads(1);
    let root = tmpdir("direct");
    tiny(&root.join("t"), 11);
    tiny(&root.join("s"), 12);
    let models = Models::load(&root.join("t"), &root.join("s"), Device::Cpu, Kind::Float).unwrap();
    let e = sum_example();
    let prompt = models.group_prompt(&Prompts::short(), &e).unwrap();
    // Completions of different lengths: two well formed, one cut off (no closing tag).
    let cases = [
        (
            "2 + 3 = 5.",
            "2 + 3 = 5.<|end_of_explanation|><|im_end|>",
            true,
        ),
        ("add them", "add them<|end_of_explanation|><|im_end|>", true),
        ("2 plus 3 is fi", "2 plus 3 is fi", false),
    ];
    let texts: Vec<String> = cases.iter().map(|c| c.1.to_string()).collect();
    let (got, well_formed) = score_texts(&models, &prompt, &texts);
    assert_eq!(well_formed, vec![true, true, false]);
    for (k, (explanation, text, closed)) in cases.iter().enumerate() {
        let completion = models.tokenizer.encode(text).unwrap();
        let cfg = RewardConfig::default();
        let expected = reward_by_hand(
            &models,
            &e,
            &prompt,
            explanation,
            &completion,
            *closed,
            &cfg,
        );
        got[k].assert_close(&expected, 1e-3, &format!("row {k}"));
    }
}

/// The student reads the explanation as the teacher wrote it: only the layout's padding (one
/// `\n\n`) before the closing tag is removed, so an explanation ending in a space, in `\n`, in
/// its own blank line, or in nothing, is scored with exactly those characters in the student's
/// chat and the KL span.
#[test]
fn an_explanations_own_trailing_whitespace_is_scored_as_written() {
    tch::set_num_threads(1);
    let root = tmpdir("endings");
    tiny(&root.join("t"), 13);
    tiny(&root.join("s"), 14);
    let models = Models::load(&root.join("t"), &root.join("s"), Device::Cpu, Kind::Float).unwrap();
    let e = sum_example();
    let prompt = models.group_prompt(&Prompts::short(), &e).unwrap();
    let explanations = [
        "2 + 3 = 5. ",
        "2 + 3 = 5.\n",
        "2 + 3 = 5.\n\n\n\n",
        "2 + 3 = 5.",
    ];
    // As the teacher writes them: the explanation, the layout's padding, the tag, end of turn.
    let texts: Vec<String> = explanations
        .iter()
        .map(|x| format!("{x}\n\n<|end_of_explanation|><|im_end|>"))
        .collect();
    let (got, well_formed) = score_texts(&models, &prompt, &texts);
    assert_eq!(well_formed, vec![true; 4]);
    let cfg = RewardConfig::default();
    for (k, x) in explanations.iter().enumerate() {
        let completion = models.tokenizer.encode(&texts[k]).unwrap();
        let expected = reward_by_hand(&models, &e, &prompt, x, &completion, true, &cfg);
        got[k].assert_close(&expected, 1e-3, &format!("explanation {x:?}"));
    }
    // The endings matter: the same text with its trailing whitespace trimmed scores otherwise.
    let trimmed = reward_by_hand(
        &models,
        &e,
        &prompt,
        "2 + 3 = 5.",
        &models.tokenizer.encode(&texts[0]).unwrap(),
        true,
        &cfg,
    );
    assert!(
        (got[0].kl - trimmed.kl).abs() > 1e-3,
        "{:?} vs {trimmed:?}",
        got[0]
    );
}

fn sft_job(
    root: &Path,
    name: &str,
    model: &Path,
    pairs: Vec<rlt_trainer::data::PromptCompletion>,
) -> SftJob {
    SftJob {
        name: name.into(),
        stage: RunDir::new(root.join(format!("ws-{name}")), "run").warmup(),
        attempt: 0,
        init_model: model.to_path_buf(),
        device: Device::Cpu,
        kind: Kind::Float,
        pairs,
        published: None,
        progress_bar: false,
    }
}

/// After a short warm-up of the teacher (teacher format) and of the student (student format),
/// GRPO with the RLT reward raises the mean reward on the synthetic task.
#[test]
fn mean_reward_rises_over_rl_steps_after_warmup() {
    tch::set_num_threads(1);
    let root = tmpdir("rises");
    tiny(&root.join("t0"), 3);
    tiny(&root.join("s0"), 4);
    let examples = generate(&SyntheticSpec {
        count: 256,
        ..Default::default()
    });
    let p = Prompts::short();
    let sft = SftConfig {
        epochs: 4,
        batch_size: 16,
        lr: 3e-3,
        checkpoint_every: 1000,
        log_every: 1000,
        ..Default::default()
    };
    let teacher_pairs = examples
        .iter()
        .map(|e| teacher_chat(&p, e).unwrap())
        .collect();
    let student_pairs = examples
        .iter()
        .map(|e| student_chat(&p, e, e.reasoning.as_deref().unwrap()))
        .collect();
    let teacher = run_sft(
        sft_job(&root, "teacher", &root.join("t0"), teacher_pairs),
        &sft,
    )
    .unwrap()
    .final_dir;
    let student = run_sft(
        sft_job(&root, "student", &root.join("s0"), student_pairs),
        &sft,
    )
    .unwrap()
    .final_dir;

    let models = Models::load(&teacher, &student, Device::Cpu, Kind::Float).unwrap();
    let prompts: Vec<_> = examples[..64]
        .iter()
        .map(|e| models.group_prompt(&p, e).unwrap())
        .collect();
    let ids = models.special_ids().unwrap();
    let cfg = RolloutConfig {
        group_size: 8,
        max_new_tokens: 48,
        temperature: 0.7,
        top_p: 1.0,
        reward: RewardConfig::default(),
        grpo: GrpoConfig::default(),
        seed: 0,
        micro_batch: 0,
        generation_batch: 0,
        activation_checkpointing: false,
    };
    // Evaluated on a fixed set of 8 groups with fixed sampling seeds (the groups of step
    // EVAL), so before and after differ only by the teacher's weights.
    let eval = |models: &Models| {
        let (_, c) = compute_step(models, &prompts, &ids, &cfg, EVAL, 8, (0, 1)).unwrap();
        c.reward_sum / c.samples as f64
    };
    let before = eval(&models);
    let mut run = LocalRun::new(
        &models,
        RlOptimizer {
            lr: 1e-3,
            ..RlOptimizer::default()
        },
        GrpoConfig::default(),
    )
    .unwrap();
    let mut means = Vec::new();
    for _ in 0..STEPS {
        let c = run.step(&models, &prompts, &ids, &cfg, 4).unwrap();
        means.push(c.reward_sum / c.samples as f64);
    }
    let after = eval(&models);
    eprintln!("training-step mean rewards: {means:?}\nheld-fixed evaluation: before {before:.3}, after {after:.3}");
    assert!(
        after > before + RISE,
        "mean reward did not rise: {before:.3} -> {after:.3} ({means:?})"
    );
}

/// Steps of the evaluation set (never a training step).
const EVAL: u64 = 1000;
const STEPS: usize = 12;
/// Seeded run (1 thread, CPU): the evaluation mean goes from -6.93 to -6.05 after 12 steps
/// (+0.88); training-step means are noisier because each step draws other questions.
const RISE: f64 = 0.5;

/// A student whose tokenizer differs from the teacher's is refused at load time.
#[test]
fn student_with_another_tokenizer_fails_fast() {
    let root = tmpdir("tok");
    tiny(&root.join("t"), 1);
    tiny(&root.join("s"), 2);
    let path = root.join("s").join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    let mut extra = added[0].clone();
    let next = added
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .max()
        .unwrap()
        + 1;
    extra["id"] = next.into();
    extra["content"] = "<|student_only|>".into();
    added.push(extra);
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let err = Models::load(&root.join("t"), &root.join("s"), Device::Cpu, Kind::Float)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("student's tokenizer") && err.contains("differs from the teacher's"),
        "{err}"
    );
}

/// A learner whose teacher has another shape than the parameter servers' weights stops
/// before any step, naming the parameter.
#[test]
fn learner_with_a_teacher_of_another_shape_fails_fast() {
    use rlt_trainer::rl::learner::{run_learner, LearnerConfig};
    use rlt_trainer::rl::param_server::{
        read_checkpoint_tensors, ParamServer, ServeUntil, ServerConfig,
    };
    let root = tmpdir("shape");
    tiny(&root.join("t"), 1);
    tiny(&root.join("s"), 2);
    let tok = Tokenizer::tiny();
    let other = TinySpec {
        hidden_size: 32,
        intermediate_size: 64,
        ..spec(1)
    };
    save_checkpoint(
        &root.join("other"),
        &CausalLm::tiny(&other, &tok, Device::Cpu, Kind::Float).unwrap(),
        &tok,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = ParamServer::new(
        ServerConfig {
            shard: 0,
            num_shards: 1,
            num_learners: 1,
            total_steps: 1,
            optimizer: RlOptimizer::default(),
            grpo: GrpoConfig::default(),
            checkpoint_every: 1,
            stage_dir: RunDir::new(root.join("ws"), "run").rl(),
            attempt: 0,
            reference_kind: Kind::Float,
        },
        &read_checkpoint_tensors(&root.join("other")).unwrap(),
    )
    .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(server.serve(listener, None, ServeUntil::AllLearnersDone));
    let models = Models::load(&root.join("t"), &root.join("s"), Device::Cpu, Kind::Float).unwrap();
    let cfg = LearnerConfig {
        param_servers: vec![addr],
        learner: 0,
        learners: 1,
        groups_per_step: 1,
        rollout: RolloutConfig {
            group_size: 2,
            max_new_tokens: 4,
            temperature: 0.7,
            top_p: 1.0,
            reward: RewardConfig::default(),
            grpo: GrpoConfig::default(),
            seed: 0,
            micro_batch: 0,
            generation_batch: 0,
            activation_checkpointing: false,
        },
        retry_for: std::time::Duration::from_secs(5),
        final_dir: None,
        prune_after_final: None,
    };
    let examples = generate(&SyntheticSpec {
        count: 4,
        ..Default::default()
    });
    let err = rt
        .block_on(run_learner(
            &models,
            &examples,
            &Prompts::short(),
            &cfg,
            |_| {},
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("on the parameter servers but") && err.contains("in the teacher model"),
        "{err}"
    );
}
