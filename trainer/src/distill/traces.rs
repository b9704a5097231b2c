//! `distill/<student>/traces.jsonl`: the teacher's raw explanations, one row per dataset row,
//! in dataset order.
//!
//! Resumable: a restarted job reads the rows already there, checks they belong to this
//! dataset (same row index and question), and appends from the next row. Each batch of rows
//! goes out in one write followed by an fsync, and a row is a single line ending in `\n`; a
//! crash can therefore leave at most a torn *last* line, which [`TraceFile::open`] cuts off
//! before appending, so the file never keeps a half-written row.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One dataset row's explanation(s), exactly as the teacher wrote them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRow {
    /// The dataset row (0-based).
    pub index: usize,
    pub question: String,
    pub solution: String,
    /// The explanation, raw, as a one-element list: the first sample that closed and fits the
    /// student's context, or, when none did, the first sample cut to the budget.
    pub traces: Vec<String>,
    /// Generated tokens per trace.
    pub tokens: Vec<usize>,
    /// Whether a sample closed and fits (false: `traces` is the cut fallback).
    pub complete: bool,
}

/// An open traces file positioned for appending. It holds every `stride`-th dataset row from
/// row `first` (the whole dataset: 0 and 1; one data-parallel rank's part: its rank and the
/// number of ranks).
pub struct TraceFile {
    path: PathBuf,
    file: File,
    rows: usize,
    first: usize,
    stride: usize,
}

impl TraceFile {
    /// Opens (or creates) `path`, returning the rows already written. `question_of(i)` is the
    /// question of dataset row `i` (`None` past the dataset's end): a row that does not match
    /// means the file belongs to another dataset and is an error, never silently mixed.
    pub fn open<'a>(
        path: &Path,
        question_of: impl Fn(usize) -> Option<&'a str>,
    ) -> Result<(TraceFile, Vec<TraceRow>)> {
        Self::open_part(path, 0, 1, question_of)
    }

    /// [`TraceFile::open`] for the file of rows `first`, `first + stride`, ...
    pub fn open_part<'a>(
        path: &Path,
        first: usize,
        stride: usize,
        question_of: impl Fn(usize) -> Option<&'a str>,
    ) -> Result<(TraceFile, Vec<TraceRow>)> {
        let stride = stride.max(1);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            tracing::warn!(
                file = %path.display(),
                bytes = bytes.len() - whole,
                "cutting off a torn last row (the previous run stopped mid-write)"
            );
            file.set_len(whole as u64)
                .with_context(|| format!("truncating {}", path.display()))?;
        }
        let text = std::str::from_utf8(&bytes[..whole])
            .with_context(|| format!("{}: not UTF-8", path.display()))?;
        let rows = parse_rows(path, text)?;
        for (k, row) in rows.iter().enumerate() {
            let (line, i) = (k + 1, first + k * stride);
            if row.index != i {
                bail!(
                    "{}: line {line} is row {}, expected row {i}",
                    path.display(),
                    row.index
                );
            }
            match question_of(i) {
                Some(q) if q == row.question => {}
                Some(_) => bail!(
                    "{}: line {line} was written for a different dataset (its question differs \
                     from dataset row {i}); remove the file to collect the traces again",
                    path.display()
                ),
                None => bail!(
                    "{}: has more rows ({}) than the dataset; remove the file to collect again",
                    path.display(),
                    rows.len()
                ),
            }
        }
        file.seek(SeekFrom::End(0))?;
        Ok((
            TraceFile {
                path: path.to_path_buf(),
                file,
                rows: rows.len(),
                first,
                stride,
            },
            rows,
        ))
    }

    /// Rows in the file.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The dataset row the `k`-th row after those written must be.
    pub fn next_row(&self, k: usize) -> usize {
        self.first + (self.rows + k) * self.stride
    }

    /// Appends rows (which must continue the file's sequence) in one write, then syncs.
    pub fn append(&mut self, rows: &[TraceRow]) -> Result<()> {
        let mut buf = String::new();
        for (k, row) in rows.iter().enumerate() {
            if row.index != self.next_row(k) {
                bail!(
                    "appending row {} where row {} comes next",
                    row.index,
                    self.next_row(k)
                );
            }
            buf.push_str(&serde_json::to_string(row)?);
            buf.push('\n');
        }
        self.file
            .write_all(buf.as_bytes())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.rows += rows.len();
        Ok(())
    }
}

/// Writes the rows of every rank's part, in dataset order, as `path` (atomically: a reader
/// finds the whole file or none), then removes the parts.
pub fn merge_parts(path: &Path, parts: &[PathBuf]) -> Result<Vec<TraceRow>> {
    let mut rows = Vec::new();
    for part in parts {
        rows.extend(read_rows(part)?);
    }
    rows.sort_by_key(|r| r.index);
    if let Some((k, r)) = rows.iter().enumerate().find(|(k, r)| r.index != *k) {
        bail!(
            "the ranks' trace files lack row {k} (found row {})",
            r.index
        );
    }
    let mut text = String::new();
    for r in &rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    for part in parts {
        let _ = std::fs::remove_file(part);
    }
    Ok(rows)
}

/// Reads every row of a finished traces file (for the fine-tune).
pub fn read_rows(path: &Path) -> Result<Vec<TraceRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_rows(path, &text)
}

fn parse_rows(path: &Path, text: &str) -> Result<Vec<TraceRow>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}: line {}: not a trace row", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(index: usize, q: &str) -> TraceRow {
        TraceRow {
            index,
            question: q.into(),
            solution: "s".into(),
            traces: vec![format!("explanation {index}")],
            tokens: vec![3],
            complete: true,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rlt-traces-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("traces.jsonl")
    }

    const QS: [&str; 4] = ["q0", "q1", "q2", "q3"];
    fn questions(i: usize) -> Option<&'static str> {
        QS.get(i).copied()
    }

    #[test]
    fn appends_and_resumes_after_the_rows_written() {
        let path = tmp("resume");
        let (mut f, done) = TraceFile::open(&path, questions).unwrap();
        assert!(done.is_empty());
        f.append(&[row(0, "q0"), row(1, "q1")]).unwrap();
        drop(f);
        let (mut f, done) = TraceFile::open(&path, questions).unwrap();
        assert_eq!(done, vec![row(0, "q0"), row(1, "q1")]);
        assert_eq!(f.rows(), 2);
        f.append(&[row(2, "q2")]).unwrap();
        assert_eq!(read_rows(&path).unwrap().len(), 3);
        // Out-of-sequence rows are refused.
        assert!(f.append(&[row(5, "q3")]).is_err());
    }

    #[test]
    fn a_torn_last_row_is_cut_off() {
        let path = tmp("torn");
        let (mut f, _) = TraceFile::open(&path, questions).unwrap();
        f.append(&[row(0, "q0")]).unwrap();
        drop(f);
        // A crash in the middle of writing row 1.
        let full = serde_json::to_string(&row(1, "q1")).unwrap();
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&full.as_bytes()[..full.len() / 2]).unwrap();
        drop(raw);
        let (mut f, done) = TraceFile::open(&path, questions).unwrap();
        assert_eq!(done.len(), 1);
        f.append(&[row(1, "q1")]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(read_rows(&path).unwrap(), vec![row(0, "q0"), row(1, "q1")]);
    }

    #[test]
    fn rows_of_another_dataset_are_an_error() {
        let path = tmp("other");
        let (mut f, _) = TraceFile::open(&path, questions).unwrap();
        f.append(&[row(0, "q0"), row(1, "something else")]).unwrap();
        drop(f);
        let err = format!("{:#}", TraceFile::open(&path, questions).err().unwrap());
        assert!(
            err.contains("line 2") && err.contains("different dataset"),
            "{err}"
        );
        // More rows than the dataset has.
        let err = format!(
            "{:#}",
            TraceFile::open(&path, |i| (i == 0).then_some("q0"))
                .err()
                .unwrap()
        );
        assert!(err.contains("more rows"), "{err}");
        // A corrupt row in the middle names its line.
        std::fs::write(&path, "not json\n").unwrap();
        let err = format!("{:#}", TraceFile::open(&path, questions).err().unwrap());
        assert!(err.contains("line 1"), "{err}");
    }
}
