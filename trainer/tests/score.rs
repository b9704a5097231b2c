//! `rlt-trainer score`: the reward of given or sampled explanations, term by term, through the
//! RL stage's scoring, as JSON lines.
use std::path::{Path, PathBuf};
use std::process::Command;

use rlt_trainer::data::synthetic::{generate, SyntheticSpec};
use rlt_trainer::data::{write_jsonl, Example};
use rlt_trainer::model::checkpoint::{save_checkpoint, CausalLm};
use rlt_trainer::model::config::TinySpec;
use serde_json::Value;
use tch::{Device, Kind};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlt-score-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny(dir: &Path, seed: u64) {
    tch::set_num_threads(1);
    let spec = TinySpec {
        hidden_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        intermediate_size: 64,
        seed,
    };
    let tok = rlt_trainer::model::tokenizer::Tokenizer::tiny();
    save_checkpoint(
        dir,
        &CausalLm::tiny(&spec, &tok, Device::Cpu, Kind::Float).unwrap(),
        &tok,
    )
    .unwrap();
}

fn score(dir: &Path, extra: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_rlt-trainer"))
        .arg("score")
        .args(["--teacher", dir.join("teacher").to_str().unwrap()])
        .args(["--student", dir.join("student").to_str().unwrap()])
        .args(["--rows", dir.join("rows.jsonl").to_str().unwrap()])
        .args(["--prompts", "short", "--threads", "1"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
}

#[test]
fn given_explanations_are_scored_term_by_term_with_the_specs_weights() {
    let dir = tmpdir("given");
    tiny(&dir.join("teacher"), 1);
    tiny(&dir.join("student"), 2);
    let rows: Vec<Example> = generate(&SyntheticSpec {
        count: 2,
        ..Default::default()
    });
    write_jsonl(&dir.join("rows.jsonl"), &rows).unwrap();
    std::fs::write(
        dir.join("explanations.jsonl"),
        concat!(
            "{\"row\": 1, \"explanation\": \"Add, then multiply.\"}\n",
            "{\"row\": 1, \"explanation\": \"cut short <|im_end|>\"}\n",
        ),
    )
    .unwrap();
    let lines = score(
        &dir,
        &[
            "--explanations",
            dir.join("explanations.jsonl").to_str().unwrap(),
        ],
    );
    assert_eq!(lines.len(), 2, "only row 1 has explanations: {lines:?}");
    for (k, l) in lines.iter().enumerate() {
        let f = |key: &str| l[key].as_f64().unwrap_or_else(|| panic!("{key} in {l}"));
        assert_eq!(
            (l["row"].as_u64(), l["explanation"].as_u64()),
            (Some(1), Some(k as u64))
        );
        // The paper's weights: r_SS = mean + 0.01 min, r_KL = 3 mean + 0.03 max.
        close(
            f("solution_term"),
            f("solution_mean") + 0.01 * f("solution_min"),
        );
        close(f("kl_term"), 3.0 * f("kl_mean") + 0.03 * f("kl_max"));
        close(
            f("reward"),
            f("solution_term") - f("kl_term") + f("format_penalty"),
        );
        assert!(f("solution_min") <= f("solution_mean") && f("kl_max") >= f("kl_mean"));
    }
    // A written explanation gets the closing tag the teacher would write; one that ends its
    // turn without the tag takes the format penalty.
    assert_eq!(lines[0]["well_formed"], true);
    assert_eq!(lines[0]["format_penalty"].as_f64(), Some(0.0));
    assert!(lines[0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Add, then multiply.\n\n<|end_of_explanation|>"));
    assert_eq!(lines[1]["well_formed"], false);
    assert_eq!(lines[1]["format_penalty"].as_f64(), Some(-1.0));

    // Without explanations the teacher samples a group per row.
    let sampled = score(
        &dir,
        &["--group-size", "3", "--max-new-tokens", "8", "--limit", "1"],
    );
    assert_eq!(sampled.len(), 3);
    assert!(sampled
        .iter()
        .all(|l| l["row"] == 0 && l["reward"].is_f64()));
    std::fs::remove_dir_all(&dir).unwrap();
}
