//! The reference test: our Qwen2 against Hugging Face transformers' Qwen2ForCausalLM, on the
//! same libtorch. Checkpoints we save load in transformers and give the same logits and greedy
//! generations; checkpoints transformers saves (untied head, sharded) load here likewise.
//! Needs Python with torch + transformers: `RLT_PYTHON`, else `python3` (see scripts/dev).
use rlt_trainer::engine::sampling::{generate, left_pad, SamplingConfig};
use rlt_trainer::model::checkpoint::{load_checkpoint, save_checkpoint, CausalLm};
use rlt_trainer::model::config::{Qwen2Config, TinySpec};
use rlt_trainer::model::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn python() -> String {
    std::env::var("RLT_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/hf_reference.py")
}

fn py(args: &[&str]) {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .expect("running the Python reference");
    assert!(
        out.status.success(),
        "hf_reference.py {args:?} failed (is transformers installed in RLT_PYTHON?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlt-hfref-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const TEXT: &str = "<|im_start|>user\nCompute 17 * 3 + 4.<|im_end|>\n<|begin_of_solution|>55<|end_of_solution|> ünï";

/// Runs transformers on `dir` and checks it agrees with our model loaded from the same dir.
fn compare(dir: &Path, tok: &Tokenizer, check_tokenizer: bool) {
    tch::set_num_threads(1);
    let (lm, _) = load_checkpoint(dir, Device::Cpu, Kind::Float).unwrap();
    let prompts: Vec<Vec<i64>> = [
        "What is 2 + 2?",
        "<|im_start|>system\nBe brief.<|im_end|>\nHi",
        "1",
    ]
    .iter()
    .map(|p| tok.encode(p).unwrap())
    .collect();
    let max_new = 12;
    let input = dir.with_extension("in.json");
    let output = dir.with_extension("out.json");
    let spec = json!({"prompts": prompts, "pad_id": tok.pad_id(), "max_new_tokens": max_new,
                      "text": check_tokenizer.then_some(TEXT)});
    std::fs::write(&input, spec.to_string()).unwrap();
    py(&[
        "run",
        dir.to_str().unwrap(),
        input.to_str().unwrap(),
        output.to_str().unwrap(),
    ]);
    let hf: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();

    assert_eq!(hf["num_parameters"].as_i64().unwrap(), lm.num_parameters());
    assert_eq!(lm.num_parameters(), lm.config.num_parameters());

    // Logits of the left-padded batch, compared on real (non-pad) positions.
    let (ids, mask) = left_pad(&prompts, tok.pad_id(), Device::Cpu);
    let ours = lm.model.forward(&ids, Some(&mask), None);
    let theirs: Vec<Vec<Vec<f32>>> = serde_json::from_value(hf["logits"].clone()).unwrap();
    let theirs = Tensor::from_slice(&theirs.concat().concat()).view(ours.size().as_slice());
    let m = mask.unsqueeze(-1).to_kind(Kind::Float);
    let diff = ((&ours - &theirs).abs() * &m).max().double_value(&[]);
    let scale = theirs.abs().max().double_value(&[]);
    assert!(
        diff < 1e-4 * scale.max(1.0),
        "logits differ from transformers by {diff} (scale {scale})"
    );

    // Greedy generations, token for token.
    let g = generate(
        &lm.model,
        &prompts,
        tok.pad_id(),
        &SamplingConfig {
            max_new_tokens: max_new,
            temperature: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let theirs: Vec<Vec<i64>> = serde_json::from_value(hf["generated"].clone()).unwrap();
    assert_eq!(
        g.token_lists(),
        theirs,
        "greedy generations differ from transformers"
    );

    if check_tokenizer {
        let theirs: Vec<i64> = serde_json::from_value(hf["text_ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(TEXT).unwrap(),
            theirs,
            "AutoTokenizer ids differ"
        );
        assert_eq!(hf["decoded"].as_str().unwrap(), TEXT);
    }
    let _ = std::fs::remove_file(input);
    let _ = std::fs::remove_file(output);
}

#[test]
fn our_checkpoint_matches_transformers() {
    let tok = Tokenizer::tiny();
    let spec = TinySpec {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 128,
        seed: 11,
    };
    // A non-default rope_theta, so a config field transformers ignored would show.
    let mut cfg = Qwen2Config::tiny(&spec, 272);
    cfg.rope_theta = Some(50000.0);
    let lm = CausalLm::random(&cfg, spec.seed, Device::Cpu, Kind::Float).unwrap();
    // Larger-than-init weights so logits are not all near zero; biases and norms random too.
    tch::no_grad(|| {
        for (_, mut v) in lm.vs.variables() {
            let noise = v.randn_like() * 0.15;
            let _ = v.g_add_(&noise);
        }
    });
    let dir = tmpdir("ours");
    save_checkpoint(&dir, &lm, &tok).unwrap();
    compare(&dir, &tok, true);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn transformers_checkpoint_loads_and_matches() {
    let dir = tmpdir("theirs");
    py(&["create", dir.to_str().unwrap(), "5"]);
    assert!(
        dir.join("model.safetensors.index.json").exists(),
        "expected a sharded checkpoint from transformers"
    );
    let tok = Tokenizer::tiny();
    tok.save(&dir).unwrap();
    compare(&dir, &tok, false);
    std::fs::remove_dir_all(&dir).unwrap();
}
