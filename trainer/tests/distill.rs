//! Distillation on tiny models: raw explanations for every row (resumable; several whole
//! explanations per row that fit the student's context), the student's fine-tune into a
//! loadable HF checkpoint.
use rlt_api::layout::{RunDir, COMPLETE_MARKER};
use rlt_trainer::data::{synthetic, Example, Prompts};
use rlt_trainer::distill::collect::{collect, student_pairs, trace_budget, CollectConfig};
use rlt_trainer::distill::traces::{read_rows, TraceFile, TraceRow};
use rlt_trainer::distill::{run_distill, DistillJob};
use rlt_trainer::model::checkpoint::{init_tiny, load_checkpoint};
use rlt_trainer::model::config::TinySpec;
use rlt_trainer::train::sft::SftConfig;
use std::path::PathBuf;
use tch::{Device, Kind};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlt-distill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny(dir: &std::path::Path, seed: u64) -> PathBuf {
    // Tiny models run fastest on one intra-op thread, above all on a busy 2-core machine.
    tch::set_num_threads(1);
    let spec = TinySpec {
        hidden_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        intermediate_size: 64,
        seed,
    };
    init_tiny(dir, &spec, Kind::Float).unwrap();
    dir.to_path_buf()
}

fn examples(n: usize) -> Vec<Example> {
    synthetic::generate(&synthetic::SyntheticSpec {
        count: n,
        ..Default::default()
    })
}

fn cfg(max_tokens: usize, traces: usize) -> CollectConfig {
    CollectConfig {
        max_tokens_per_trace: max_tokens,
        traces,
        temperature: 1.0,
        top_p: 1.0,
        batch_size: 3,
        seed: 7,
    }
}

#[test]
fn every_row_gets_raw_traces_and_a_restart_continues_where_it_stopped() {
    let dir = tmp("resume");
    let teacher = tiny(&dir.join("teacher"), 1);
    let (lm, tok) = load_checkpoint(&teacher, Device::Cpu, Kind::Float).unwrap();
    let prompts = Prompts::short();
    let rows = examples(7);
    let path = dir.join("traces.jsonl");
    let q = |i: usize| rows.get(i).map(|e| e.question.as_str());

    // A first job that stops after 4 rows (a kill between batches)...
    let (mut f, done) = TraceFile::open(&path, q).unwrap();
    assert!(done.is_empty());
    collect(
        &lm,
        &tok,
        &tok,
        &prompts,
        &rows[..4],
        &mut f,
        &cfg(200, 1),
        |_| {},
    )
    .unwrap();
    drop(f);
    let first = std::fs::read_to_string(&path).unwrap();
    // ...and a torn fifth row, as a kill in the middle of a write leaves it.
    std::fs::write(&path, format!("{first}{{\"index\": 4, \"quest")).unwrap();

    let (mut f, done) = TraceFile::open(&path, q).unwrap();
    assert_eq!(done.len(), 4, "the torn row is not counted");
    collect(
        &lm,
        &tok,
        &tok,
        &prompts,
        &rows,
        &mut f,
        &cfg(200, 1),
        |_| {},
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with(&first),
        "rows already written are never rewritten"
    );
    let got = read_rows(&path).unwrap();
    assert_eq!(got.len(), 7);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.index, i);
        assert_eq!(r.question, rows[i].question);
        assert_eq!(r.solution, rows[i].solution);
        assert_eq!(r.traces.len(), 1);
        assert_eq!(r.tokens.len(), 1);
        // Raw: the stored text is the decoded generated tokens, nothing stripped. (A random
        // byte-level model writes bytes that are not UTF-8 on their own; they decode to
        // U+FFFD, three bytes, so only clean text re-encodes to the same count.)
        let n = tok.encode(&r.traces[0]).unwrap().len();
        if r.traces[0].contains('\u{FFFD}') {
            assert!(n > r.tokens[0], "{r:?}");
        } else {
            assert_eq!(n, r.tokens[0], "{r:?}");
        }
    }
    // A finished file: nothing left to collect, nothing appended.
    let (mut f, done) = TraceFile::open(&path, q).unwrap();
    assert_eq!(done.len(), 7);
    collect(
        &lm,
        &tok,
        &tok,
        &prompts,
        &rows,
        &mut f,
        &cfg(200, 1),
        |_| panic!("nothing to collect"),
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One explanation per row, as the method collects them: a row whose sample does not close
/// within the student's context is sampled again (up to `traces` samples), the first that
/// fits is its one training example, and a row none of whose samples fits keeps its first,
/// cut. More samples per row make more rows complete, never more examples per row.
#[test]
fn collection_resamples_until_an_explanation_fits_and_keeps_one_per_row() {
    let dir = tmp("one-per-row");
    let teacher = tiny(&dir.join("teacher"), 3);
    let (lm, tok) = load_checkpoint(&teacher, Device::Cpu, Kind::Float).unwrap();
    let prompts = Prompts::short();
    let rows = examples(8);
    // A random tiny teacher samples almost uniformly: it ends its turn (3 stop tokens of 265)
    // within a few dozen tokens about half of the time, and about half of its byte tokens are
    // not UTF-8 on their own (each costs the student three tokens). So some samples are whole
    // and fit, some are cut.
    let max_tokens = 300;
    let budget = trace_budget(&tok, &prompts, &rows[0], max_tokens).unwrap();
    assert!(budget > 150 && budget < 260, "budget {budget}");
    let run = |traces: usize| {
        let path = dir.join(format!("traces-{traces}.jsonl"));
        let (mut f, _) =
            TraceFile::open(&path, |i| rows.get(i).map(|e| e.question.as_str())).unwrap();
        let cfg = cfg(max_tokens, traces);
        collect(&lm, &tok, &tok, &prompts, &rows, &mut f, &cfg, |_| {}).unwrap();
        read_rows(&path).unwrap()
    };
    let (once, resampled) = (run(1), run(4));
    let complete = |got: &[TraceRow]| got.iter().filter(|r| r.complete).count();
    assert!(
        complete(&resampled) > complete(&once),
        "resampling made no more rows complete ({} vs {})",
        complete(&resampled),
        complete(&once)
    );
    let stops = ["<|im_end|>", "<|endoftext|>", "<|end_of_explanation|>"];
    for r in &resampled {
        assert_eq!(r.traces.len(), 1, "one explanation per row: {r:?}");
        let budget = trace_budget(&tok, &prompts, &rows[r.index], max_tokens).unwrap();
        assert!(r.tokens[0] <= budget, "{r:?} over {budget}");
        if r.complete {
            // A whole explanation, ended by the teacher, not a piece of one.
            assert!(
                stops.iter().any(|s| r.traces[0].ends_with(s)),
                "a cut trace was kept: {r:?}"
            );
        }
    }
    // One training example per row, each inside the student's context.
    let pairs = student_pairs(&prompts, &resampled, &rows);
    assert_eq!(pairs.len(), rows.len());
    for p in &pairs {
        let n = tok.encode(&p.prompt).unwrap().len() + tok.encode(&p.completion).unwrap().len();
        assert!(
            n <= max_tokens,
            "student chat of {n} tokens exceeds {max_tokens}"
        );
    }
    // A context too small for even the question and solution is an error naming the setting.
    let err = trace_budget(&tok, &prompts, &rows[0], 20)
        .unwrap_err()
        .to_string();
    assert!(err.contains("maxTokensPerTrace"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_student_is_fine_tuned_into_a_complete_checkpoint_and_a_rerun_does_nothing() {
    let dir = tmp("student");
    let teacher = tiny(&dir.join("teacher"), 1);
    let student = tiny(&dir.join("student-init"), 2);
    let run = RunDir::new(dir.join("ws"), "r");
    let job = || DistillJob {
        name: "s".into(),
        stage: run.distill("s"),
        teacher: teacher.clone(),
        student_model: student.clone(),
        examples: examples(12),
        prompts: Prompts::short(),
        collect: cfg(200, 1),
        sft: SftConfig {
            epochs: 2,
            batch_size: 4,
            lr: 3e-3,
            max_len: 256,
            checkpoint_every: 2,
            log_every: 1,
            ..SftConfig::default()
        },
        attempt: 0,
        device: Device::Cpu,
        kind: Kind::Float,
        published: None,
    };
    let out = run_distill(job()).unwrap();
    assert_eq!(out.rows, 12);
    assert_eq!(out.rows_collected, 12);
    assert_eq!(out.pairs, 12);
    assert_eq!(out.sft.total_steps, 6);
    assert!(
        out.sft.last_losses < out.sft.first_losses,
        "loss {} -> {}",
        out.sft.first_losses,
        out.sft.last_losses
    );
    let final_dir = run.distill("s").final_dir();
    assert!(final_dir.join(COMPLETE_MARKER).exists());
    let (lm, _) = load_checkpoint(&final_dir, Device::Cpu, Kind::Float).unwrap();
    let (init, _) = load_checkpoint(&student, Device::Cpu, Kind::Float).unwrap();
    let changed = lm.vs.variables().iter().any(|(n, t)| {
        let before = &init.vs.variables()[n];
        (t - before).abs().max().double_value(&[]) > 0.0
    });
    assert!(changed, "the student's weights did not change");

    let again = run_distill(job()).unwrap();
    assert_eq!(again.rows_collected, 0);
    assert_eq!(again.sft.steps_run, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
