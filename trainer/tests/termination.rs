//! A failing role at its process boundary, as the operator sees it: the exit code tells a bad
//! configuration (2: do not retry) from a crash (1), the error chain is on stderr and in the
//! file `RLT_TERMINATION_LOG` names (the container's termination message), and the listeners
//! bind the address `RLT_BIND_ADDRESS` gives.
use std::path::PathBuf;
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlt-term-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the trainer with a termination log; returns the output and the log's content.
fn run(name: &str, args: &[&str], envs: &[(&str, &str)]) -> (Output, String) {
    let dir = tmp(name);
    let log = dir.join("termination-log");
    let out = Command::new(env!("CARGO_BIN_EXE_rlt-trainer"))
        .args(args)
        .env_remove("RLT_CONFIG")
        .env_remove("RLT_BIND_ADDRESS")
        .env("RLT_TERMINATION_LOG", &log)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let message = std::fs::read_to_string(&log).unwrap_or_default();
    (out, message)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_crash_exits_1_and_leaves_its_error_chain_as_the_termination_message() {
    let (out, message) = run(
        "crash",
        &["generate", "--model", "/nonexistent/model", "--prompt", "x"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(message.contains("/nonexistent/model"), "{message:?}");
    assert!(
        !message.contains('\n') && message.len() <= 4096,
        "{message:?}"
    );
    assert!(
        stderr(&out).contains(&format!("error: {message}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_bad_run_configuration_exits_2() {
    let dir = tmp("config");
    let config = dir.join("run.yaml");
    std::fs::write(
        &config,
        "apiVersion: rlt.dev/v1alpha1\nkind: RltRun\nspec: {}\n",
    )
    .unwrap();
    let (out, message) = run(
        "config-run",
        &["warmup"],
        &[
            ("RLT_CONFIG", config.to_str().unwrap()),
            ("RLT_WORKSPACE", dir.to_str().unwrap()),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(message.contains("invalid RltRun"), "{message:?}");
}

#[test]
fn a_usage_error_exits_2_with_the_reason_in_the_termination_message() {
    let (out, message) = run("usage", &["warmup", "--no-such-flag"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(message.contains("--no-such-flag"), "{message:?}");
    // --help is no failure.
    let (out, message) = run("help", &["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(message, "");
}

#[test]
fn the_parameter_server_binds_the_address_from_rlt_bind_address() {
    let dir = tmp("bind");
    let args = [
        "param-server",
        "--workspace",
        dir.to_str().unwrap(),
        "--run",
        "r",
        "--replica-index",
        "0",
        "--replicas",
        "1",
        "--learners",
        "1",
    ];
    let (out, message) = run("bind", &args, &[("RLT_BIND_ADDRESS", "not-an-ip")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(message.contains("--bind \"not-an-ip\""), "{message:?}");
}

#[test]
fn cuda_asked_for_on_a_machine_without_it_exits_2_naming_spec_device() {
    if tch::Cuda::device_count() > 0 {
        return; // a GPU machine: CUDA is there.
    }
    let dir = tmp("cuda");
    let model = dir.join("model");
    let init = Command::new(env!("CARGO_BIN_EXE_rlt-trainer"))
        .args(["init-tiny", "--out", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    let (out, message) = run(
        "cuda-run",
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        &[("RLT_DEVICE", "cuda")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(message.contains("spec.device"), "{message:?}");
    // The binary carries the CUDA backend (tests/cuda_link.rs), so the reason is the missing
    // device, not a missing library.
    assert!(!message.contains("no CUDA backend"), "{message:?}");
}
