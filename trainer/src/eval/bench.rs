//! Benchmark files in the formats the public sets are published in, so users can mount the
//! real sets unchanged:
//!
//! - MATH-500 (`HuggingFaceH4/MATH-500`): JSON/JSONL rows with `problem` and `answer`
//!   (plus `unique_id`, `solution`, `subject`, `level`, which are kept or ignored).
//! - AIME 2024: JSON/JSONL rows with `problem`/`Problem` and `answer`/`Answer` (the answer is
//!   an integer in some exports, a string in others) and `id`/`ID`.
//! - GPQA Diamond (`gpqa_diamond.csv`): CSV (or JSON/JSONL) rows with `Question`,
//!   `Correct Answer`, `Incorrect Answer 1..3`, `Record ID`. The four options are shuffled
//!   deterministically per question (seeded by the question's text), so every run, machine
//!   and model sees the same letters, and the correct letter is not always `A`.
//! - custom: the project's own dataset rows (`question`, `solution`), e.g. the synthetic
//!   task's held-out split; the gold answer is the solution's last `\boxed{}` or, without
//!   one, the whole solution. The solution text is kept for log-likelihood scoring.
use super::extract::last_boxed;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Benchmark {
    Math500,
    Aime2024,
    GpqaDiamond,
    Custom,
}

impl std::str::FromStr for Benchmark {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "math500" | "math-500" => Ok(Benchmark::Math500),
            "aime2024" | "aime-2024" | "aime24" => Ok(Benchmark::Aime2024),
            "gpqa-diamond" | "gpqa" => Ok(Benchmark::GpqaDiamond),
            "custom" => Ok(Benchmark::Custom),
            other => bail!(
                "unknown benchmark {other:?}: expected math500, aime2024, gpqa-diamond or custom"
            ),
        }
    }
}

impl std::fmt::Display for Benchmark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Benchmark::Math500 => "math500",
            Benchmark::Aime2024 => "aime2024",
            Benchmark::GpqaDiamond => "gpqa-diamond",
            Benchmark::Custom => "custom",
        })
    }
}

/// What a correct completion must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gold {
    /// A math answer, compared after normalisation.
    Math(String),
    /// The letter of the correct option among `choices`.
    Choice(char),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub id: String,
    pub question: String,
    /// Multiple-choice options in presentation order (`A`, `B`, ...); empty for math.
    pub choices: Vec<String>,
    pub gold: Gold,
    /// The reference solution text, when the set has one to score log-likelihood on
    /// (custom rows).
    pub solution: Option<String>,
    /// Whether the prompt asks for a boxed answer (the public sets) or the question is shown
    /// as the training data showed it (custom rows).
    pub boxed_instruction: bool,
}

/// The instruction appended to every question, in the words the Stratos/RLT student format
/// uses, so a model trained on that format answers in a box.
pub const BOXED_INSTRUCTION: &str = "Return your final response within \\boxed{}.";

impl Problem {
    /// The user turn shown to the model: the question, the lettered options if any, and the
    /// instruction to box the final answer.
    pub fn prompt(&self) -> String {
        let mut out = self.question.trim().to_string();
        if !self.boxed_instruction {
            return self.question.clone();
        }
        if !self.choices.is_empty() {
            out.push_str("\n\n");
            for (letter, choice) in ('A'..).zip(&self.choices) {
                out.push_str(&format!("{letter}) {}\n", choice.trim()));
            }
            out.push_str("\nAnswer with the letter of the correct option. ");
        } else {
            out.push_str("\n\n");
        }
        out.push_str(BOXED_INSTRUCTION);
        out
    }

    /// The gold answer as text (the letter for multiple choice).
    pub fn gold_text(&self) -> String {
        match &self.gold {
            Gold::Math(answer) => answer.clone(),
            Gold::Choice(letter) => letter.to_string(),
        }
    }
}

/// Loads every problem of `path`; a bad row fails with the file and its line (JSONL, CSV) or
/// element index (JSON array) and the missing field.
pub fn load(benchmark: Benchmark, path: &Path) -> Result<Vec<Problem>> {
    let rows = read_rows(path)?;
    if rows.is_empty() {
        bail!("{}: no problems in the file", path.display());
    }
    rows.into_iter()
        .map(|(location, row)| {
            parse_row(benchmark, &row).with_context(|| format!("{}: {location}", path.display()))
        })
        .collect()
}

fn parse_row(benchmark: Benchmark, row: &Map<String, Value>) -> Result<Problem> {
    match benchmark {
        Benchmark::Math500 | Benchmark::Aime2024 => {
            let question = field(row, &["problem", "question"])?;
            let answer = field(row, &["answer"])?;
            let id = field(row, &["unique_id", "id"]).unwrap_or_default();
            Ok(Problem {
                id,
                question,
                choices: Vec::new(),
                gold: Gold::Math(answer),
                solution: None,
                boxed_instruction: true,
            })
        }
        Benchmark::Custom => {
            let question = field(row, &["question"])?;
            let solution = field(row, &["solution"])?;
            let answer = last_boxed(&solution).unwrap_or_else(|| solution.trim().to_string());
            let id = field(row, &["id"]).unwrap_or_default();
            Ok(Problem {
                id,
                question,
                choices: Vec::new(),
                gold: Gold::Math(answer),
                solution: Some(solution),
                boxed_instruction: false,
            })
        }
        Benchmark::GpqaDiamond => {
            let question = field(row, &["Question"])?;
            let correct = field(row, &["Correct Answer"])?;
            let mut options = vec![correct.trim().to_string()];
            for i in 1..=3 {
                options.push(
                    field(row, &[&format!("Incorrect Answer {i}")])?
                        .trim()
                        .to_string(),
                );
            }
            let order = shuffled_order(&question, options.len());
            let choices: Vec<String> = order.iter().map(|&i| options[i].clone()).collect();
            let correct_at = order
                .iter()
                .position(|&i| i == 0)
                .expect("0 is in the permutation");
            let letter = (b'A' + correct_at as u8) as char;
            let id = field(row, &["Record ID", "id"]).unwrap_or_default();
            Ok(Problem {
                id,
                question,
                choices,
                gold: Gold::Choice(letter),
                solution: None,
                boxed_instruction: true,
            })
        }
    }
}

/// A field by any of its names, matched case-insensitively; numbers are accepted as text
/// (AIME answers are integers in some exports).
fn field(row: &Map<String, Value>, names: &[&str]) -> Result<String> {
    for name in names {
        let found = row
            .iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name));
        match found.map(|(_, v)| v) {
            Some(Value::String(s)) if !s.trim().is_empty() => return Ok(s.clone()),
            Some(Value::Number(n)) => return Ok(n.to_string()),
            Some(Value::String(_)) | Some(Value::Null) | None => continue,
            Some(other) => bail!("field `{name}` must be text or a number, got {other}"),
        }
    }
    bail!("missing field `{}`", names.join("` / `"))
}

/// A permutation of `0..n` that depends only on `question`: FNV-1a of its text seeds a
/// splitmix64 Fisher-Yates shuffle (fixed algorithms, so it never changes with a library).
pub fn shuffled_order(question: &str, n: usize) -> Vec<usize> {
    let mut state = question.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Rows of a JSON array, JSONL or CSV file, each with a human-readable location.
fn read_rows(path: &Path) -> Result<Vec<(String, Map<String, Value>)>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext == "csv" {
        return read_csv(path);
    }
    if ext == "parquet" {
        bail!(
            "{}: Parquet benchmark files are not read; export the set as JSONL or CSV",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        let rows: Vec<Value> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON array", path.display()))?;
        return rows
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(m) => Ok((format!("element {i}"), m)),
                other => bail!(
                    "{}: element {i}: expected an object, got {other}",
                    path.display()
                ),
            })
            .collect();
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let location = format!("line {}", i + 1);
            match serde_json::from_str(line) {
                Ok(Value::Object(m)) => Ok((location, m)),
                Ok(other) => bail!(
                    "{}: {location}: expected a JSON object, got {other}",
                    path.display()
                ),
                Err(e) => bail!("{}: {location}: {e}", path.display()),
            }
        })
        .collect()
}

fn read_csv(path: &Path) -> Result<Vec<(String, Map<String, Value>)>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: reading the CSV header", path.display()))?
        .clone();
    reader
        .records()
        .map(|record| {
            let record = record.with_context(|| format!("{}: malformed CSV", path.display()))?;
            let line = record.position().map_or(0, |p| p.line());
            let row = headers
                .iter()
                .zip(record.iter())
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect();
            Ok((format!("line {line}"), row))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/eval")
            .join(name)
    }

    fn temp_file(name: &str, content: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rlt-eval-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn loads_the_math500_fixture() {
        let problems = load(Benchmark::Math500, &fixture("math500.jsonl")).unwrap();
        assert_eq!(problems.len(), 8);
        assert_eq!(problems[0].id, "test/prealgebra/1.json");
        assert_eq!(problems[0].gold, Gold::Math("9".into()));
        assert!(problems.iter().all(|p| p.choices.is_empty()));
        assert!(problems[0].prompt().ends_with(BOXED_INSTRUCTION));
    }

    #[test]
    fn loads_the_aime_fixture_with_integer_answers() {
        let problems = load(Benchmark::Aime2024, &fixture("aime2024.jsonl")).unwrap();
        assert_eq!(problems.len(), 5);
        assert_eq!(problems[0].id, "2024-I-1");
        // The fixture stores answers as JSON integers, as the public export does.
        assert_eq!(problems[0].gold, Gold::Math("33".into()));
    }

    #[test]
    fn loads_the_gpqa_fixture_and_shuffles_deterministically() {
        let a = load(Benchmark::GpqaDiamond, &fixture("gpqa_diamond.csv")).unwrap();
        let b = load(Benchmark::GpqaDiamond, &fixture("gpqa_diamond.csv")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 6);
        for p in &a {
            assert_eq!(p.choices.len(), 4);
            let Gold::Choice(letter) = p.gold else {
                panic!("not a choice")
            };
            // The correct text sits at the gold letter.
            assert!(!p.choices[(letter as u8 - b'A') as usize].is_empty());
            assert!(p.prompt().contains(&format!("{letter}) ")));
        }
        // The shuffle really moves the correct answer: not every question has it under A.
        let letters: std::collections::HashSet<_> = a.iter().map(|p| p.gold_text()).collect();
        assert!(
            letters.len() > 1,
            "all correct answers under one letter: {letters:?}"
        );
        // The correct option is the fixture's "Correct Answer" text.
        let first = &a[0];
        let Gold::Choice(letter) = first.gold else {
            unreachable!()
        };
        assert_eq!(first.choices[(letter as u8 - b'A') as usize], "Ar");
    }

    #[test]
    fn shuffle_is_a_permutation_fixed_by_the_question() {
        let o = shuffled_order("What is 2+2?", 4);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
        assert_eq!(o, shuffled_order("What is 2+2?", 4));
        // Over many questions every slot receives the correct answer.
        let mut seen = [0usize; 4];
        for i in 0..400 {
            let order = shuffled_order(&format!("question {i}"), 4);
            seen[order.iter().position(|&x| x == 0).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 60), "unbalanced shuffle: {seen:?}");
    }

    #[test]
    fn json_array_files_load() {
        let path = temp_file(
            "array.json",
            r#"[{"problem": "1+1?", "answer": "2"}, {"Problem": "2+2?", "Answer": 4, "ID": "x"}]"#,
        );
        let problems = load(Benchmark::Aime2024, &path).unwrap();
        assert_eq!(problems[1].gold, Gold::Math("4".into()));
        assert_eq!(problems[1].id, "x");
    }

    #[test]
    fn bad_rows_name_the_file_line_and_field() {
        let path = temp_file(
            "bad.jsonl",
            "{\"problem\": \"1+1?\", \"answer\": \"2\"}\n\n{\"problem\": \"no answer\"}\n",
        );
        let err = format!("{:#}", load(Benchmark::Math500, &path).unwrap_err());
        assert!(err.contains("bad.jsonl: line 3"), "{err}");
        assert!(err.contains("missing field `answer`"), "{err}");

        let path = temp_file("broken.jsonl", "{\"problem\": \"1+1?\", \n");
        let err = format!("{:#}", load(Benchmark::Math500, &path).unwrap_err());
        assert!(err.contains("broken.jsonl: line 1"), "{err}");

        let path = temp_file(
            "bad.csv",
            "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2\nq,a,b,c\n",
        );
        let err = format!("{:#}", load(Benchmark::GpqaDiamond, &path).unwrap_err());
        assert!(err.contains("bad.csv: line 2"), "{err}");
        assert!(err.contains("Incorrect Answer 3"), "{err}");

        let err = format!(
            "{:#}",
            load(Benchmark::Math500, Path::new("/nonexistent/m.jsonl")).unwrap_err()
        );
        assert!(err.contains("/nonexistent/m.jsonl"), "{err}");

        let path = temp_file("empty.jsonl", "\n");
        let err = format!("{:#}", load(Benchmark::Math500, &path).unwrap_err());
        assert!(err.contains("no problems"), "{err}");
    }

    #[test]
    fn custom_rows_keep_the_solution_and_take_its_box() {
        let path = temp_file(
            "custom.jsonl",
            "{\"question\": \"Compute 2 + 3, left to right.\", \"solution\": \"5\"}\n\
             {\"question\": \"q2\", \"solution\": \"so \\\\boxed{\\\\frac{1}{2}}\", \"reasoning_trace\": \"t\"}\n",
        );
        let problems = load(Benchmark::Custom, &path).unwrap();
        assert_eq!(problems[0].gold, Gold::Math("5".into()));
        assert_eq!(problems[0].solution.as_deref(), Some("5"));
        // Custom questions are shown as the training data showed them, without instruction.
        assert_eq!(problems[0].prompt(), "Compute 2 + 3, left to right.");
        assert_eq!(problems[1].gold, Gold::Math("\\frac{1}{2}".into()));
    }

    #[test]
    fn benchmark_names_parse() {
        assert_eq!("MATH-500".parse::<Benchmark>().unwrap(), Benchmark::Math500);
        assert_eq!("aime24".parse::<Benchmark>().unwrap(), Benchmark::Aime2024);
        assert_eq!(
            "gpqa_diamond".parse::<Benchmark>().unwrap(),
            Benchmark::GpqaDiamond
        );
        assert_eq!("custom".parse::<Benchmark>().unwrap(), Benchmark::Custom);
        assert!("mmlu".parse::<Benchmark>().is_err());
    }
}
