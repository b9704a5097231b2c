//! `rlt-trainer pipeline` end to end on the tiny CPU run (manifests/tiny-cpu.yaml), as the
//! binary a user runs: stages as local processes, the kubectl-style rows, every artifact in
//! the shared layout, a failing stage stopping the run with its error while completed stages
//! keep their outputs, and a rerun resuming after the last completed stage.
use rlt_api::layout::{RunDir, COMPLETE_MARKER};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_rlt-trainer")
}

fn manifest() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/tiny-cpu.yaml");
    std::fs::read_to_string(path).unwrap()
}

fn workspace(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlt-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pipeline(yaml: &Path, ws: &Path) -> Output {
    Command::new(bin())
        .args([
            "pipeline",
            yaml.to_str().unwrap(),
            "--workspace",
            ws.to_str().unwrap(),
        ])
        .env_remove("RLT_CONFIG")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// The phase column of every row printed after the header.
fn phases(stdout: &str) -> Vec<String> {
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().expect("a header");
    assert!(
        header.starts_with("NAME") && header.contains("STAGE PROGRESS") && header.ends_with("AGE"),
        "{header}"
    );
    let mut phases: Vec<String> = lines
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    // A phase prints a row on every change of its progress; the order of phases is the point.
    phases.dedup();
    phases
}

fn complete(dir: &Path) -> bool {
    dir.join(COMPLETE_MARKER).exists()
}

#[test]
fn tiny_run_fails_at_a_broken_stage_keeps_outputs_and_resumes_to_succeeded() {
    let ws = workspace("tiny");
    // The shipped manifest, with the student pointing at a checkpoint directory that is
    // broken on the first run (its config.json is not a model config).
    let yaml = manifest().replace(
        "students: [{name: student, model: {tiny: {seed: 2}}}]",
        "students: [{name: student, model: {path: student-init}}]",
    );
    assert!(
        yaml.contains("path: student-init"),
        "manifest changed: update this test"
    );
    let yaml_path = ws.join("run.yaml");
    std::fs::write(&yaml_path, &yaml).unwrap();
    let student = ws.join("student-init");
    std::fs::create_dir_all(&student).unwrap();
    std::fs::write(student.join("config.json"), "{\"not\": \"a model\"}").unwrap();

    let out = pipeline(&yaml_path, &ws);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "a broken student must fail the run\n{stdout}\n{stderr}"
    );
    assert_eq!(
        phases(&stdout),
        ["Pending", "WarmUp", "RL", "Distillation", "Failed"],
        "{stdout}"
    );
    assert!(stderr.contains("stage distillation failed"), "{stderr}");
    assert_eq!(
        stderr.matches("retrying (").count(),
        2,
        "failurePolicy.retries (2) retries first:\n{stderr}"
    );
    assert!(
        stderr.contains("student-init"),
        "the error names the broken checkpoint:\n{stderr}"
    );
    let run = RunDir::new(&ws, "tiny-cpu");
    assert!(complete(&run.warmup().final_dir()), "warm-up output kept");
    assert!(complete(&run.rl().final_dir()), "RL output kept");
    let rl_weights = std::fs::read(run.rl().final_dir().join("model.safetensors")).unwrap();

    // Fix the student and rerun: warm-up and RL are not run again.
    let fixed = Command::new(bin())
        .args([
            "init-tiny",
            "--out",
            student.to_str().unwrap(),
            "--seed",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        fixed.status.success(),
        "{}",
        String::from_utf8_lossy(&fixed.stderr)
    );
    let out = pipeline(&yaml_path, &ws);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "rerun failed\n{stdout}\n{stderr}");
    assert_eq!(
        phases(&stdout),
        ["Pending", "Distillation", "Succeeded"],
        "{stdout}"
    );
    assert!(
        stderr.contains("warmup: already complete") && stderr.contains("rl: already complete"),
        "{stderr}"
    );
    assert!(
        stdout.lines().last().unwrap().contains("3/3 done"),
        "{stdout}"
    );
    // The distillation ran as a new attempt: the failed run used attempts 0, 1 and 2
    // (failurePolicy.retries defaults to 2).
    let attempt = |l: &str| {
        let t: Vec<&str> = l.split_whitespace().collect();
        t[t.len() - 2].to_string()
    };
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("Distillation") && attempt(l) == "3"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(run.rl().final_dir().join("model.safetensors")).unwrap(),
        rl_weights
    );

    // Every artifact the kind e2e and the lead's CI check.
    for f in ["config.json", "tokenizer.json"] {
        assert!(
            run.warmup().final_dir().join(f).is_file(),
            "warmup/final/{f}"
        );
    }
    for f in ["config.json", "model.safetensors"] {
        assert!(run.rl().final_dir().join(f).is_file(), "rl/final/{f}");
    }
    let d = run.distill("student");
    assert!(complete(&d.final_dir()));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(d.final_dir().join(f).is_file(), "distill/student/final/{f}");
    }
    // One raw trace row per training row, in order.
    let train =
        std::fs::read_to_string(run.root().join("inputs/data/synthetic-256-s0/train.jsonl"))
            .unwrap();
    let traces = std::fs::read_to_string(d.traces()).unwrap();
    assert_eq!(traces.lines().count(), train.lines().count());
    for (i, line) in traces.lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["index"], i);
        assert!(!row["traces"].as_array().unwrap().is_empty());
    }
    // The run configuration the stages read is the validated spec with defaults filled in.
    let config = std::fs::read_to_string(run.root().join("run.yaml")).unwrap();
    assert!(
        config.contains("groupSize: 8") && config.contains("klMeanWeight: 3.0"),
        "{config}"
    );
    std::fs::remove_dir_all(&ws).unwrap();
}

#[test]
fn a_run_the_crd_rejects_is_rejected_with_the_same_message() {
    let ws = workspace("invalid");
    let yaml = manifest().replace("groupSize: 8", "groupSize: 1");
    assert_ne!(yaml, manifest(), "manifest changed: update this test");
    let path = ws.join("bad.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let expected = rlt_api::validate::render(&rlt_api::parse_yaml(&yaml).unwrap_err());
    assert!(expected.contains("groupSize"), "{expected}");
    let out = pipeline(&path, &ws);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in\n{stderr}"
    );
    assert!(stdout.is_empty(), "nothing ran: {stdout}");
    assert!(
        !ws.join("tiny-cpu").exists(),
        "no workspace written for an invalid run"
    );
    std::fs::remove_dir_all(&ws).unwrap();
}

#[test]
fn a_missing_model_or_dataset_path_is_named() {
    let ws = workspace("missing");
    for (from, to, field) in [
        (
            "teacher: {tiny: {seed: 1}}",
            "teacher: {path: /nonexistent/teacher}",
            "spec.teacher.path",
        ),
        (
            "dataset: {synthetic: {rows: 256}}",
            "dataset: {path: data/none.jsonl}",
            "spec.dataset.path",
        ),
    ] {
        // A teacher given by path needs its scoring student named.
        let yaml = manifest()
            .replace(from, to)
            .replace("  rl:\n", "  rl:\n    student: {tiny: {seed: 2}}\n");
        assert!(yaml.contains(to), "manifest changed: update this test");
        let path = ws.join("run.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let out = pipeline(&path, &ws);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success());
        assert!(stderr.contains(field), "{field} in\n{stderr}");
        let shown = to.split("path: ").nth(1).unwrap().trim_end_matches('}');
        assert!(stderr.contains(shown), "{shown} in\n{stderr}");
        assert_eq!(phases(&stdout), ["Pending", "Failed"], "{stdout}");
    }
    std::fs::remove_dir_all(&ws).unwrap();
}
