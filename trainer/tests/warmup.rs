//! The warm-up (SFT) stage on tiny models: the loss falls on the synthetic task, a killed run
//! resumes from its checkpoint and ends where an uninterrupted run ends, and a NaN loss stops
//! the stage keeping the last good checkpoint.
use rlt_api::layout::{latest_checkpoint, RunDir, COMPLETE_MARKER};
use rlt_trainer::data::synthetic::{generate, SyntheticSpec};
use rlt_trainer::data::{teacher_chat, Example, Prompts};
use rlt_trainer::model::checkpoint::{init_tiny, load_checkpoint, save_checkpoint, CausalLm};
use rlt_trainer::model::config::{Qwen2Config, TinySpec};
use rlt_trainer::model::tokenizer::Tokenizer;
use rlt_trainer::train::sft::{run_sft, SftConfig, SftJob, TrainerState};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlt-warmup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spec() -> TinySpec {
    TinySpec {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 128,
        seed: 3,
    }
}

fn job(root: &Path, model: &Path, examples: &[Example]) -> SftJob {
    // One intra-op thread: tiny models, and tests run side by side on 2 cores.
    tch::set_num_threads(1);
    let p = Prompts::short();
    SftJob {
        name: "warmup".into(),
        stage: RunDir::new(root.join("ws"), "run").warmup(),
        attempt: 0,
        init_model: model.to_path_buf(),
        device: Device::Cpu,
        kind: Kind::Float,
        pairs: examples
            .iter()
            .map(|e| teacher_chat(&p, e).unwrap())
            .collect(),
        published: None,
        progress_bar: false,
    }
}

#[test]
fn loss_goes_down_on_the_synthetic_task() {
    let root = tmpdir("loss");
    let model = root.join("tiny");
    init_tiny(&model, &spec(), Kind::Float).unwrap();
    let examples = generate(&SyntheticSpec {
        count: 256,
        ..Default::default()
    });
    let cfg = SftConfig {
        epochs: 4,
        batch_size: 16,
        lr: 3e-3,
        checkpoint_every: 1000,
        log_every: 8,
        ..Default::default()
    };
    let out = run_sft(job(&root, &model, &examples), &cfg).unwrap();
    assert_eq!(out.total_steps, 64);
    eprintln!("loss {} -> {}", out.first_losses, out.last_losses);
    // Seeded run: the mean loss of the first 8 updates is 4.79 (uniform over 272 tokens is
    // 5.6), of the last 8 (after 64 updates) 1.68: the chat format and tags are learned.
    assert!(out.first_losses > 4.0, "first {}", out.first_losses);
    assert!(
        out.last_losses < 0.5 * out.first_losses,
        "loss {} -> {}",
        out.first_losses,
        out.last_losses
    );
    assert!(out.final_dir.join(COMPLETE_MARKER).exists());
    let (_lm, tok) = load_checkpoint(&out.final_dir, Device::Cpu, Kind::Float).unwrap();
    assert!(tok.same_vocab(&Tokenizer::tiny()));
    // Running the stage again finds it complete and does nothing.
    let again = run_sft(job(&root, &model, &examples), &cfg).unwrap();
    assert_eq!(again.steps_run, 0);
    std::fs::remove_dir_all(&root).unwrap();
}

fn warmup_cmd(model: &Path, ws: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlt-trainer"));
    c.args([
        "warmup",
        "--synthetic",
        "600",
        "--prompts",
        "short",
        "--run",
        "r",
        "--epochs",
        "100",
        "--max-steps",
        "120",
    ]);
    c.args([
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--checkpoint-every",
        "10",
        "--lr",
        "1e-3",
        "--log-every",
        "20",
    ]);
    c.args(["--threads", "1"]);
    c.arg("--model").arg(model).arg("--workspace").arg(ws);
    c.env_remove("RLT_ATTEMPT")
        .env_remove("RLT_METRICS_PORT")
        .env("RUST_LOG", "warn");
    c
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

#[test]
fn killed_warmup_resumes_from_its_checkpoint() {
    let root = tmpdir("kill");
    let model = root.join("tiny");
    init_tiny(&model, &spec(), Kind::Float).unwrap();
    let ws = root.join("ws");
    let stage = RunDir::new(&ws, "r").warmup();

    let mut child = warmup_cmd(&model, &ws).spawn().unwrap();
    let t = Instant::now();
    let killed_at = loop {
        if let Some((step, _)) = latest_checkpoint(&stage.checkpoints(), 0) {
            child.kill().unwrap();
            child.wait().unwrap();
            break step;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "warm-up exited before its first checkpoint"
        );
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        !stage.final_dir().exists(),
        "the run finished before it was killed"
    );

    let out = warmup_cmd(&model, &ws).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(stage.final_dir().join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state.step, 120);
    let resumed = state.resumed_from_step.expect("the second run resumed");
    assert!(
        resumed >= killed_at && resumed.is_multiple_of(10),
        "resumed from {resumed}, killed at {killed_at}"
    );

    // An uninterrupted run ends at the same weights: the resumed run continued the same
    // data order with the same optimizer state.
    let ws2 = root.join("ws2");
    let out = warmup_cmd(&model, &ws2).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for ((name, a), (_, b)) in final_weights(&ws).iter().zip(final_weights(&ws2)) {
        let d = (a - &b).abs().max().double_value(&[]);
        assert!(
            d < 1e-4,
            "{name} differs by {d} between resumed and uninterrupted runs"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let root = tmpdir("nan");
    // Untied head, so a NaN embedding row only poisons rows that contain its token.
    let tok = Tokenizer::tiny();
    let mut cfg = Qwen2Config::tiny(&spec(), 272);
    cfg.tie_word_embeddings = false;
    let lm = CausalLm::random(&cfg, 1, Device::Cpu, Kind::Float).unwrap();
    let poison = "é".as_bytes()[0] as i64; // byte-level: token id = byte value
    tch::no_grad(|| {
        let emb = lm.vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = emb.get(poison).fill_(f64::NAN);
    });
    let model = root.join("poisoned");
    save_checkpoint(&model, &lm, &tok).unwrap();

    let mut examples = generate(&SyntheticSpec {
        count: 40,
        ..Default::default()
    });
    examples[17].question.push_str(" é");
    let sft = SftConfig {
        epochs: 1,
        batch_size: 4,
        lr: 1e-3,
        checkpoint_every: 1,
        keep_checkpoints: 100,
        ..Default::default()
    };
    let j = job(&root, &model, &examples);
    let stage = j.stage.clone();
    let err = format!("{:#}", run_sft(j, &sft).unwrap_err());
    assert!(err.contains("loss is NaN"), "{err}");
    let failed: u64 = err
        .split("at step ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        failed > 0,
        "choose a seed where the poisoned row is not in the first batch"
    );
    assert!(!stage.final_dir().exists());
    // The checkpoint after the last good update is there, and its weights (apart from the
    // poisoned row itself) are finite.
    let (step, dir) = latest_checkpoint(&stage.checkpoints(), 0).unwrap();
    assert_eq!(step, failed);
    let (good, _) = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap();
    for (name, t) in good.vs.variables() {
        let t = if name == "model.embed_tokens.weight" {
            t.narrow(0, poison + 1, 272 - poison - 1)
        } else {
            t
        };
        assert_eq!(t.isfinite().all().int64_value(&[]), 1, "{name} not finite");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
