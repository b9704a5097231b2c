//! Datasets and the chat formats of the RLT pipeline.
//!
//! Input rows come in two shapes, from `.json` (an array of rows), `.jsonl` (one row a line)
//! or `.parquet`:
//! - Bespoke-Stratos-17k: `{"system": ..., "conversations": [{"from": "user", "value": q},
//!   {"from": "assistant", "value": "<|begin_of_thought|>T<|end_of_thought|>
//!   <|begin_of_solution|>S<|end_of_solution|>"}]}` (`role`/`content` keys also accepted);
//! - custom: `{"question": q, "solution": s, "reasoning_trace": t (optional)}`.
//!
//! Each becomes an [`Example`]; the `format` functions render the teacher chat (warm-up), the
//! RL teacher prompt (cut right after the opening explanation tag) and the student chat
//! (Stratos style). A malformed row is an error naming the file and row (1-based line for
//! JSONL, array index for JSON, row number for Parquet), unless the caller asks to skip bad
//! rows, in which case every skipped row is counted and reported.
use crate::model::tokenizer::{
    BEGIN_OF_EXPLANATION, BEGIN_OF_SOLUTION, BEGIN_OF_THOUGHT, ENDOFTEXT, END_OF_EXPLANATION,
    END_OF_SOLUTION, END_OF_THOUGHT, IM_END, IM_START,
};
use anyhow::{anyhow, bail, Context, Result};
use rlt_api::spec::defaults;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

pub mod synthetic;

/// One (question, solution, optional reasoning) row, with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub question: String,
    pub solution: String,
    /// The reasoning trace (Stratos' thought); the teacher's explanation target in warm-up.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "reasoning_trace"
    )]
    pub reasoning: Option<String>,
    /// The row's own system prompt (Stratos rows carry one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

/// What [`load_examples`] read.
#[derive(Debug, Default)]
pub struct Loaded {
    pub examples: Vec<Example>,
    /// Rows skipped as malformed (only with `skip_malformed`): (row label, reason).
    pub skipped: Vec<(String, String)>,
}

/// Parses one row (either shape) into an [`Example`]; the error says which field is wrong.
pub fn parse_row(row: &Value) -> Result<Example> {
    let obj = row
        .as_object()
        .ok_or_else(|| anyhow!("row is not a JSON object"))?;
    if let Some(conv) = obj.get("conversations") {
        return parse_stratos(obj.get("system"), conv);
    }
    let text = |key: &str| -> Result<Option<String>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => bail!("field `{key}` is not a string"),
        }
    };
    let question = text("question")?
        .ok_or_else(|| anyhow!("missing field `question` (or `conversations`)"))?;
    let solution = text("solution")?.ok_or_else(|| anyhow!("missing field `solution`"))?;
    if question.trim().is_empty() {
        bail!("field `question` is empty");
    }
    if solution.trim().is_empty() {
        bail!("field `solution` is empty");
    }
    Ok(Example {
        question,
        solution,
        reasoning: text("reasoning_trace")?,
        system: text("system")?,
    })
}

fn parse_stratos(system: Option<&Value>, conv: &Value) -> Result<Example> {
    let turns = conv
        .as_array()
        .ok_or_else(|| anyhow!("field `conversations` is not a list"))?;
    let mut user = None;
    let mut assistant = None;
    for (i, t) in turns.iter().enumerate() {
        let role = t
            .get("from")
            .or_else(|| t.get("role"))
            .and_then(Value::as_str);
        let value = t
            .get("value")
            .or_else(|| t.get("content"))
            .and_then(Value::as_str);
        let (Some(role), Some(value)) = (role, value) else {
            bail!("conversations[{i}] lacks a string `from`/`role` or `value`/`content`");
        };
        match role {
            "user" | "human" if user.is_none() => user = Some(value.to_string()),
            "assistant" | "gpt" if assistant.is_none() => assistant = Some(value.to_string()),
            "system" | "user" | "human" | "assistant" | "gpt" => {}
            other => bail!("conversations[{i}] has unknown role {other:?}"),
        }
    }
    let question = user.ok_or_else(|| anyhow!("conversations has no user turn"))?;
    let answer = assistant.ok_or_else(|| anyhow!("conversations has no assistant turn"))?;
    let thought = between(&answer, BEGIN_OF_THOUGHT, END_OF_THOUGHT)
        .ok_or_else(|| anyhow!("assistant turn lacks {BEGIN_OF_THOUGHT}...{END_OF_THOUGHT}"))?;
    let solution = between(&answer, BEGIN_OF_SOLUTION, END_OF_SOLUTION)
        .ok_or_else(|| anyhow!("assistant turn lacks {BEGIN_OF_SOLUTION}...{END_OF_SOLUTION}"))?;
    if solution.is_empty() {
        bail!("assistant turn has an empty solution");
    }
    let system = system.and_then(Value::as_str).map(str::to_string);
    Ok(Example {
        question,
        solution,
        reasoning: Some(thought),
        system,
    })
}

/// The trimmed text between the first `open` and the following `close`.
pub fn between(text: &str, open: &str, close: &str) -> Option<String> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(text[start..end].trim().to_string())
}

/// Reads a dataset file (`.json`, `.jsonl`, `.parquet`). With `skip_malformed`, bad rows are
/// counted in [`Loaded::skipped`] instead of failing the load.
pub fn load_examples(path: &Path, skip_malformed: bool) -> Result<Loaded> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let rows: Vec<(String, Result<Value>)> = match ext {
        "jsonl" => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    (
                        format!("line {}", i + 1),
                        serde_json::from_str(l).map_err(|e| anyhow!("invalid JSON: {e}")),
                    )
                })
                .collect()
        }
        "json" => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", path.display()))?;
            let Value::Array(items) = v else {
                bail!("{}: expected a JSON array of rows", path.display());
            };
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("row {i}"), Ok(v)))
                .collect()
        }
        "parquet" => parquet_rows(path)?,
        _ => bail!(
            "{}: unknown dataset extension {ext:?} (expected .json, .jsonl or .parquet)",
            path.display()
        ),
    };
    let mut out = Loaded::default();
    for (label, row) in rows {
        match row.and_then(|r| parse_row(&r)) {
            Ok(e) => out.examples.push(e),
            Err(e) if skip_malformed => out.skipped.push((label, e.to_string())),
            Err(e) => bail!("{}: {label}: {e}", path.display()),
        }
    }
    if out.examples.is_empty() {
        bail!(
            "{}: no usable rows ({} skipped as malformed)",
            path.display(),
            out.skipped.len()
        );
    }
    Ok(out)
}

/// Parquet rows as JSON values (nested lists/structs become arrays/objects), row numbers 0-based.
#[cfg(feature = "parquet")]
fn parquet_rows(path: &Path) -> Result<Vec<(String, Result<Value>)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let rows = reader
        .get_row_iter(None)
        .with_context(|| format!("{}: reading rows", path.display()))?;
    Ok(rows
        .enumerate()
        .map(|(i, r)| {
            (
                format!("row {i}"),
                r.map(|row| row.to_json_value())
                    .map_err(|e| anyhow!("unreadable row: {e}")),
            )
        })
        .collect())
}

#[cfg(not(feature = "parquet"))]
fn parquet_rows(path: &Path) -> Result<Vec<(String, Result<Value>)>> {
    bail!(
        "{}: this build has no Parquet support (build rlt-trainer with `--features parquet`)",
        path.display()
    )
}

/// Writes examples as JSONL in the custom format.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let mut text = String::new();
    for e in examples {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// System prompts of the two chat formats (see `spec.prompts`; the texts live in
/// [`rlt_api::spec::defaults`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompts {
    pub teacher_system: String,
    pub student_system: String,
}

impl Prompts {
    /// Full-length prompts for real models.
    pub fn standard() -> Self {
        Prompts {
            teacher_system: defaults::teacher_system(),
            student_system: defaults::student_system(),
        }
    }

    /// One-line prompts, for tiny byte-level models where every character is a token.
    pub fn short() -> Self {
        Prompts {
            teacher_system: defaults::tiny_teacher_system(),
            student_system: defaults::tiny_student_system(),
        }
    }

    /// The prompts a run uses (`spec.prompts`, else the defaults for its teacher).
    pub fn of_run(spec: &rlt_api::RltRunSpec) -> Self {
        let (teacher_system, student_system) = spec.system_prompts();
        Prompts {
            teacher_system,
            student_system,
        }
    }
}

/// The blank lines around every tag's content, as in the reference layout and Stratos: a tag
/// always stands apart from the text, so a byte-level BPE never glues the text's last
/// punctuation to the tag's first characters.
pub const PAD: &str = "\n\n";

/// `open`, padded content, `close`.
fn wrap(open: &str, content: &str, close: &str) -> String {
    format!("{open}{PAD}{content}{PAD}{close}")
}

/// A chat rendered as a prompt (not trained on) and a completion (trained on / generated).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptCompletion {
    pub prompt: String,
    pub completion: String,
}

fn chat_prefix(system: &str, user: &str) -> String {
    format!(
        "{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    )
}

/// The teacher's warm-up chat. The prompt (not trained on) runs up to and including the
/// opening explanation tag and its padding, exactly the RL prompt; the completion (trained on)
/// is the explanation, its closing tag and the end of turn, as in the reference, which masks
/// the restated solution too. Needs a reasoning trace.
pub fn teacher_chat(p: &Prompts, e: &Example) -> Result<PromptCompletion> {
    let explanation = e
        .reasoning
        .as_deref()
        .ok_or_else(|| anyhow!("example has no reasoning trace to teach from"))?;
    Ok(PromptCompletion {
        prompt: teacher_rl_prompt(p, e),
        completion: format!("{explanation}{PAD}{END_OF_EXPLANATION}{IM_END}"),
    })
}

/// The RL teacher prompt: the teacher's chat cut right after the opening explanation tag and
/// its padding, so the teacher sees question and solution and generates the explanation
/// (ending with `<|end_of_explanation|>`):
/// `<|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n`.
pub fn teacher_rl_prompt(p: &Prompts, e: &Example) -> String {
    format!(
        "{}{}{PAD}{BEGIN_OF_EXPLANATION}{PAD}",
        chat_prefix(&p.teacher_system, &e.question),
        wrap(BEGIN_OF_SOLUTION, &e.solution, END_OF_SOLUTION),
    )
}

/// The student chat (Stratos format), in the five pieces the RLT reward needs to locate the
/// thought and the solution tokens: `[prefix, thought, middle, solution, suffix]`, whose
/// concatenation is the full chat; `prefix` ends with the opening thought tag.
pub fn student_segments(p: &Prompts, e: &Example, thought: &str) -> [String; 5] {
    let system = e.system.as_deref().unwrap_or(&p.student_system);
    [
        format!(
            "{}{BEGIN_OF_THOUGHT}{PAD}",
            chat_prefix(system, &e.question)
        ),
        thought.to_string(),
        format!("{PAD}{END_OF_THOUGHT}{PAD}{BEGIN_OF_SOLUTION}{PAD}"),
        e.solution.clone(),
        format!("{PAD}{END_OF_SOLUTION}{IM_END}"),
    ]
}

/// The student chat as prompt + completion (the completion is the assistant turn).
pub fn student_chat(p: &Prompts, e: &Example, thought: &str) -> PromptCompletion {
    let s = student_segments(p, e, thought);
    let system = e.system.as_deref().unwrap_or(&p.student_system);
    let prompt = chat_prefix(system, &e.question);
    let full = s.concat();
    PromptCompletion {
        completion: full[prompt.len()..].to_string(),
        prompt,
    }
}

/// The explanation in a teacher's generated text, and whether its closing tag came: the text
/// up to the closing tag (or, without one, up to the end of turn or text), less exactly the
/// layout's [`PAD`] before the tag. The RL reward, `score`, bench-effect and distillation all
/// take the explanation from here, so the student reads what the teacher wrote (trailing
/// spaces and blank lines of its own included), not a trimmed copy.
pub fn explanation_of(generated: &str) -> (&str, bool) {
    let cut = [END_OF_EXPLANATION, IM_END, ENDOFTEXT]
        .into_iter()
        .filter_map(|m| generated.find(m).map(|i| (i, m)))
        .min();
    match cut {
        Some((i, END_OF_EXPLANATION)) => {
            let before = &generated[..i];
            (before.strip_suffix(PAD).unwrap_or(before), true)
        }
        Some((i, _)) => (&generated[..i], false),
        None => (generated, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ex() -> Example {
        Example {
            question: "What is 2+3?".into(),
            solution: "5".into(),
            reasoning: Some("2+3=5.".into()),
            system: None,
        }
    }

    #[test]
    fn stratos_row_parses_thought_and_solution() {
        let row = json!({"system": "SYS", "conversations": [
            {"from": "user", "value": "Q?"},
            {"from": "assistant", "value": "<|begin_of_thought|>\n\nthink\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\nS\n\n<|end_of_solution|>"}]});
        let e = parse_row(&row).unwrap();
        assert_eq!(
            (
                e.question.as_str(),
                e.solution.as_str(),
                e.reasoning.as_deref(),
                e.system.as_deref()
            ),
            ("Q?", "S", Some("think"), Some("SYS"))
        );
    }

    #[test]
    fn malformed_rows_say_what_is_wrong() {
        let cases = [
            (json!({"question": "q"}), "solution"),
            (json!({"solution": "s"}), "question"),
            (json!({"question": 3, "solution": "s"}), "not a string"),
            (
                json!({"conversations": [{"from": "user", "value": "q"}]}),
                "no assistant",
            ),
            (
                json!({"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "no tags"}]}),
                "begin_of_thought",
            ),
            (json!([1, 2]), "not a JSON object"),
        ];
        for (row, want) in cases {
            let err = parse_row(&row).unwrap_err().to_string();
            assert!(err.contains(want), "{row}: {err}");
        }
    }

    #[test]
    fn the_rl_prompt_is_the_reference_layout_cut_after_the_explanation_padding() {
        let p = Prompts::short();
        let rl = teacher_rl_prompt(&p, &ex());
        assert!(rl.ends_with(
            "<|im_start|>assistant\n<|begin_of_solution|>\n\n5\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n"
        ), "{rl:?}");
        assert!(rl.contains("<|im_start|>user\nWhat is 2+3?<|im_end|>\n"));
    }

    #[test]
    fn warm_up_trains_on_the_explanation_its_closing_tag_and_the_end_of_turn_only() {
        let p = Prompts::short();
        let chat = teacher_chat(&p, &ex()).unwrap();
        // Everything up to and including the explanation's opening padding is the prompt,
        // the RL prompt exactly, so the restated solution is never a training target.
        assert_eq!(chat.prompt, teacher_rl_prompt(&p, &ex()));
        assert_eq!(
            chat.completion,
            "2+3=5.\n\n<|end_of_explanation|><|im_end|>"
        );
    }

    #[test]
    fn a_rows_own_system_prompt_wins_over_the_runs_for_the_student_only() {
        let p = Prompts {
            teacher_system: "T-SYS".into(),
            student_system: "S-SYS".into(),
        };
        let mut e = ex();
        assert!(student_chat(&p, &e, "x")
            .prompt
            .contains("system\nS-SYS<|im_end|>"));
        e.system = Some("ROW-SYS".into());
        assert!(student_chat(&p, &e, "x")
            .prompt
            .contains("system\nROW-SYS<|im_end|>"));
        assert!(teacher_rl_prompt(&p, &e).contains("system\nT-SYS<|im_end|>"));
    }

    #[test]
    fn student_segments_concatenate_to_the_chat() {
        let p = Prompts::short();
        let s = student_segments(&p, &ex(), "because");
        let chat = student_chat(&p, &ex(), "because");
        assert_eq!(s.concat(), format!("{}{}", chat.prompt, chat.completion));
        assert!(s[0].ends_with("<|begin_of_thought|>\n\n"));
        assert_eq!(s[3], "5");
        assert_eq!(
            explanation_of("a b\n\n<|end_of_explanation|><|im_end|>"),
            ("a b", true)
        );
        assert_eq!(
            explanation_of(" a b \n\n\n<|end_of_explanation|>"),
            (" a b \n", true)
        );
        assert_eq!(explanation_of("cut off<|im_end|>"), ("cut off", false));
        assert_eq!(explanation_of("no tag"), ("no tag", false));
    }
}
