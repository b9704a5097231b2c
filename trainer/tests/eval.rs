//! `rlt-trainer eval` as a user runs it: a checkpoint on the shipped benchmark fixtures, greedy
//! and with k samples, into a JSON report; a missing checkpoint names its path.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_rlt-trainer")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/eval")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlt-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `rlt-trainer eval` and returns its report.
fn eval(model: &Path, benchmark: &str, file: &str, extra: &[&str], out: &Path) -> Value {
    let o = Command::new(bin())
        .args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--benchmark",
            benchmark,
        ])
        .args([
            "--file",
            fixture(file).to_str().unwrap(),
            "--prompts",
            "short",
        ])
        .args([
            "--max-new-tokens",
            "12",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn rows(file: &str) -> usize {
    if file.ends_with(".csv") {
        // GPQA's CSV has quoted fields that span lines.
        csv::Reader::from_path(fixture(file))
            .unwrap()
            .records()
            .count()
    } else {
        let text = std::fs::read_to_string(fixture(file)).unwrap();
        text.lines().filter(|l| !l.trim().is_empty()).count()
    }
}

#[test]
fn every_benchmark_format_gives_a_report_and_greedy_runs_repeat() {
    let dir = tmp("formats");
    let model = dir.join("model");
    let o = Command::new(bin())
        .args(["init-tiny", "--out", model.to_str().unwrap(), "--seed", "5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    for (benchmark, file) in [
        ("math500", "math500.jsonl"),
        ("aime2024", "aime2024.jsonl"),
        ("gpqa-diamond", "gpqa_diamond.csv"),
    ] {
        let out = dir.join(format!("{benchmark}.json"));
        let r = eval(&model, benchmark, file, &[], &out);
        assert_eq!(r["problems"], rows(file), "{benchmark}");
        assert_eq!(r["samples_per_problem"], 1);
        assert_eq!(r["results"].as_array().unwrap().len(), rows(file));
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{benchmark}: {acc}");
        // Greedy decoding is a pure function of the weights: a second run agrees exactly.
        let again = eval(&model, benchmark, file, &[], &dir.join("again.json"));
        assert_eq!(r["results"], again["results"], "{benchmark}");
    }

    // k samples per problem: pass@k is at least the per-sample accuracy.
    let r = eval(
        &model,
        "math500",
        "math500.jsonl",
        &["-k", "3", "--temperature", "1.0", "--keep-completions"],
        &dir.join("k3.json"),
    );
    assert_eq!(r["samples_per_problem"], 3);
    for p in r["results"].as_array().unwrap() {
        assert_eq!(p["correct"].as_array().unwrap().len(), 3);
        assert_eq!(p["completions"].as_array().unwrap().len(), 3);
    }
    assert!(r["pass_at_k"].as_f64().unwrap() >= r["accuracy"].as_f64().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_checkpoint_names_its_path() {
    let dir = tmp("missing");
    let o = Command::new(bin())
        .args([
            "eval",
            "--model",
            "/nonexistent/ckpt",
            "--benchmark",
            "math500",
        ])
        .args(["--file", fixture("math500.jsonl").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/ckpt"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
