//! The termination message of a container, as the kubelet reads it.

/// The file's content is capped at this many bytes.
pub const MAX_FILE_BYTES: usize = 4096;
/// The log fallback: the last lines of the log, capped at this many bytes.
pub const FALLBACK_LINES: usize = 80;
pub const FALLBACK_BYTES: usize = 2048;

/// The message: the terminationMessagePath file's content (at most 4096 bytes); when that is
/// empty, the exit code non-zero and the policy `FallbackToLogsOnError`, the last 80 lines of
/// this run's log, at most 2048 bytes.
pub fn message(file: &[u8], exit_code: i32, policy: Option<&str>, log: &[u8]) -> Option<String> {
    let file = &file[..file.len().min(MAX_FILE_BYTES)];
    if !file.is_empty() {
        return Some(String::from_utf8_lossy(file).into_owned());
    }
    if exit_code == 0 || policy != Some("FallbackToLogsOnError") {
        return None;
    }
    let tail = &log[log.len().saturating_sub(FALLBACK_BYTES)..];
    let text = String::from_utf8_lossy(tail);
    let body = text.strip_suffix('\n').unwrap_or(&text);
    let lines: Vec<&str> = body.split('\n').collect();
    let start = lines.len().saturating_sub(FALLBACK_LINES);
    let mut out = lines[start..].join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FALLBACK: Option<&str> = Some("FallbackToLogsOnError");

    #[test]
    fn file_wins_and_is_capped() {
        assert_eq!(message(b"bye", 1, FALLBACK, b"log"), Some("bye".into()));
        assert_eq!(message(b"bye", 0, None, b""), Some("bye".into()));
        let big = vec![b'x'; 5000];
        assert_eq!(message(&big, 0, None, b"").unwrap().len(), 4096);
    }

    #[test]
    fn falls_back_to_the_log_tail_on_error_only() {
        assert_eq!(message(b"", 0, FALLBACK, b"log\n"), None);
        assert_eq!(message(b"", 2, Some("File"), b"log\n"), None);
        assert_eq!(message(b"", 2, None, b"log\n"), None);
        assert_eq!(message(b"", 2, FALLBACK, b""), None);
        assert_eq!(message(b"", 2, FALLBACK, b"a\nb\n"), Some("a\nb\n".into()));
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let m = message(b"", 1, FALLBACK, log.as_bytes()).unwrap();
        assert_eq!(m.lines().count(), 80);
        assert!(m.starts_with("line 20\n") && m.ends_with("line 99\n"));
        let long: String = (0..100).map(|i| format!("{i:>60}\n")).collect();
        let m = message(b"", 1, FALLBACK, long.as_bytes()).unwrap();
        assert!(m.len() <= 2048);
        assert!(m.ends_with("99\n"));
    }
}
