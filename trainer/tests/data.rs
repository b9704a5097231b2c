//! Dataset files: the shipped fixtures parse; malformed rows fail with file and row, or are
//! skipped and counted when asked.
use rlt_trainer::data::{load_examples, student_chat, teacher_chat, teacher_rl_prompt, Prompts};
use rlt_trainer::model::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tmpfile(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rlt-data-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn stratos_fixture_becomes_teacher_and_student_chats() {
    let loaded = load_examples(&fixture("stratos_sample.jsonl"), false).unwrap();
    assert_eq!(loaded.examples.len(), 4);
    assert!(loaded.skipped.is_empty());
    let e = &loaded.examples[1];
    assert!(e.question.contains("perimeter 20"));
    assert!(e.solution.contains("\\boxed{24}"));
    assert!(e.reasoning.as_deref().unwrap().starts_with("Perimeter is"));
    let p = Prompts::standard();
    let t = teacher_chat(&p, e).unwrap();
    assert!(t.prompt.starts_with("<|im_start|>system\n"));
    // Warm-up trains on the explanation only: the solution is in the (masked) prompt.
    assert!(t.prompt.contains("<|begin_of_solution|>\n\nThe width"));
    assert!(t.completion.starts_with("Perimeter is"));
    assert!(t
        .completion
        .ends_with("\n\n<|end_of_explanation|><|im_end|>"));
    let rl = teacher_rl_prompt(&p, e);
    assert_eq!(rl, t.prompt);
    assert!(rl.ends_with("\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n"));
    // The student keeps the row's own (Stratos) system prompt.
    let s = student_chat(&p, e, "thinking");
    assert!(s.prompt.contains("Your role as an assistant"));
    assert!(s
        .completion
        .starts_with("<|begin_of_thought|>\n\nthinking\n\n<|end_of_thought|>"));
    // The tiny tokenizer keeps every tag as one token.
    let tok = Tokenizer::tiny();
    let ids = tok.encode(&rl).unwrap();
    let newline = tok.encode("\n").unwrap()[0];
    assert_eq!(
        ids[ids.len() - 3..],
        [
            tok.token_id("<|begin_of_explanation|>").unwrap(),
            newline,
            newline
        ]
    );
}

#[cfg(feature = "parquet")]
#[test]
fn stratos_parquet_reads_like_the_jsonl() {
    // Written by tests/fixtures/make_parquet.py (pyarrow) from the JSONL fixture.
    let pq = load_examples(&fixture("stratos_sample.parquet"), false).unwrap();
    let jsonl = load_examples(&fixture("stratos_sample.jsonl"), false).unwrap();
    assert_eq!(pq.examples, jsonl.examples);
    let garbage = tmpfile("garbage.parquet", "not parquet at all");
    let err = format!("{:#}", load_examples(&garbage, false).unwrap_err());
    assert!(
        err.contains("garbage.parquet") && err.contains("Parquet"),
        "{err}"
    );
    std::fs::remove_file(garbage).unwrap();
}

#[test]
fn custom_fixture_with_optional_reasoning() {
    let loaded = load_examples(&fixture("custom_sample.json"), false).unwrap();
    assert_eq!(loaded.examples.len(), 3);
    assert!(loaded.examples[2].reasoning.is_none());
    assert!(teacher_chat(&Prompts::short(), &loaded.examples[2]).is_err());
}

#[test]
fn malformed_jsonl_row_names_file_and_line() {
    let text =
        "{\"question\": \"q1\", \"solution\": \"s1\"}\n\n{\"question\": \"q2\"}\n{not json}\n";
    let p = tmpfile("bad.jsonl", text);
    let err = format!("{:#}", load_examples(&p, false).unwrap_err());
    assert!(
        err.contains("bad.jsonl") && err.contains("line 3") && err.contains("solution"),
        "{err}"
    );
    // Skipping counts both bad rows (line 3: missing field, line 4: invalid JSON).
    let loaded = load_examples(&p, true).unwrap();
    assert_eq!(loaded.examples.len(), 1);
    let rows: Vec<&str> = loaded.skipped.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(rows, ["line 3", "line 4"]);
    std::fs::remove_file(p).unwrap();
}

#[test]
fn malformed_json_row_and_bad_files_are_named() {
    let p = tmpfile(
        "bad.json",
        r#"[{"question": "q", "solution": "s"}, {"conversations": "x"}]"#,
    );
    let err = format!("{:#}", load_examples(&p, false).unwrap_err());
    assert!(
        err.contains("bad.json") && err.contains("row 1") && err.contains("conversations"),
        "{err}"
    );
    std::fs::remove_file(&p).unwrap();
    let p = tmpfile("x.csv", "a,b");
    assert!(format!("{:#}", load_examples(&p, false).unwrap_err()).contains("extension"));
    std::fs::remove_file(&p).unwrap();
    let missing = Path::new("/nonexistent/data.jsonl");
    assert!(format!("{:#}", load_examples(missing, false).unwrap_err())
        .contains("/nonexistent/data.jsonl"));
}
