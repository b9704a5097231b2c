//! How a role ends when it fails, so whoever started it can act on it: the exit code tells a
//! configuration that cannot run ([`BAD_CONFIG`]: do not retry) from a crash ([`CRASH`]:
//! retrying may help), and the final error chain goes to stderr and, when
//! `RLT_TERMINATION_LOG` is set (operator pods set it to their `terminationMessagePath`), to
//! that file as the container's termination message, which the operator lifts into the
//! run's condition and an Event.
use rlt_api::contract::env;
use std::path::Path;

/// A failure that retrying may fix (I/O, a peer that went away, out of memory...).
pub const CRASH: i32 = 1;
/// The configuration cannot run: invalid flags or run configuration, a missing input.
/// Also clap's exit code for usage errors. The operator reads it (the stage contract).
pub const BAD_CONFIG: i32 = rlt_api::contract::EXIT_BAD_CONFIG;

/// A peer this process trains with went away (a data-parallel rank, a parameter server that
/// stayed unreachable): the failure is that peer's. The operator reads it (the stage
/// contract): with a disrupted pod in the attempt, the attempt is not counted as a failure.
pub const PEER_LOST: i32 = rlt_api::contract::EXIT_PEER_LOST;

/// Ends the process at once at SIGTERM or SIGINT, with 128 + the signal. In its pod the
/// trainer is the container's PID 1, for which the kernel ignores a signal left at its default
/// action: without a handler, a stopped pod (a suspended, evicted or preempted attempt, a
/// deleted run) would keep computing and hold its GPUs until the kubelet's SIGKILL at the end
/// of the grace period (30 s by default). Nothing is lost by stopping mid-step: a checkpoint
/// counts only once it is complete.
pub fn end_at_termination() {
    extern "C" fn end(signal: libc::c_int) {
        // Async-signal-safe: no allocation, no lock, no unwinding.
        unsafe { libc::_exit(128 + signal) };
    }
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only calls `_exit`.
        unsafe { libc::signal(signal, end as *const () as libc::sighandler_t) };
    }
}

/// Back to the default action, for a server that then installs a graceful handler of its own
/// (the parameter servers once their stage is done).
pub fn default_termination() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: restores the default disposition.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}

/// The kubelet reads at most this many bytes of a termination message.
pub const TERMINATION_MESSAGE_MAX: usize = 4096;

/// Marks an error as a bad configuration; its message is the inner error's, unchanged.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BadConfig(#[from] pub anyhow::Error);

/// Wraps an error as a bad configuration.
pub fn bad_config(e: anyhow::Error) -> anyhow::Error {
    BadConfig(e).into()
}

/// Marks an error as the loss of a peer; its message is the inner error's, unchanged.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PeerLost(#[from] pub anyhow::Error);

/// Wraps an error as the loss of a peer.
pub fn peer_lost(e: anyhow::Error) -> anyhow::Error {
    PeerLost(e).into()
}

/// The exit code for an error: [`BAD_CONFIG`] when anything in its chain is a [`BadConfig`],
/// else [`PEER_LOST`] when anything is a [`PeerLost`], else [`CRASH`].
pub fn code(e: &anyhow::Error) -> i32 {
    if e.chain().any(|c| c.is::<BadConfig>()) {
        BAD_CONFIG
    } else if e.chain().any(|c| c.is::<PeerLost>()) {
        PEER_LOST
    } else {
        CRASH
    }
}

/// The error chain as one paragraph (one line: the operator shows the last line of a
/// termination message) of at most [`TERMINATION_MESSAGE_MAX`] bytes. When too long, the
/// start (what was being done) and the end (the root cause) are kept.
pub fn termination_message(text: &str) -> String {
    let one: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if one.len() <= TERMINATION_MESSAGE_MAX {
        return one;
    }
    const CUT: &str = " \u{2026} ";
    let half = (TERMINATION_MESSAGE_MAX - CUT.len()) / 2;
    let mut head = half;
    while !one.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = one.len() - half;
    while !one.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}{CUT}{}", &one[..head], &one[tail..])
}

/// Reports a failure at the process boundary (stderr, and the termination log when
/// `RLT_TERMINATION_LOG` is set) and returns the exit code.
pub fn report(e: &anyhow::Error) -> i32 {
    let text = format!("{e:#}");
    eprintln!("error: {text}");
    write_termination_log(&text);
    code(e)
}

/// Writes the termination message, if the environment asks for one. Best effort: a message
/// that cannot be written must not hide the error itself (already on stderr).
pub fn write_termination_log(text: &str) {
    let Some(path) = std::env::var_os(env::TERMINATION_LOG).filter(|p| !p.is_empty()) else {
        return;
    };
    let path = Path::new(&path);
    if let Err(e) = std::fs::write(path, termination_message(text)) {
        eprintln!(
            "warning: could not write the termination message to {}: {e}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn bad_configuration_is_told_from_a_crash_through_context() {
        let crash = anyhow::anyhow!("connection reset").context("pushing gradients");
        assert_eq!(code(&crash), CRASH);
        let bad = bad_config(anyhow::anyhow!("spec.teacher.path: no model checkpoint"))
            .context("preparing the inputs");
        assert_eq!(code(&bad), BAD_CONFIG);
        assert_eq!(
            format!("{bad:#}"),
            "preparing the inputs: spec.teacher.path: no model checkpoint"
        );
        let r: anyhow::Result<()> = Err(anyhow::anyhow!("x"));
        assert_eq!(code(&r.context("y").unwrap_err()), CRASH);
        let lost = peer_lost(anyhow::anyhow!("receiving from the previous rank"))
            .context("reduce-scatter step 1");
        assert_eq!(code(&lost), PEER_LOST);
        assert_eq!(
            format!("{lost:#}"),
            "reduce-scatter step 1: receiving from the previous rank"
        );
    }

    #[test]
    fn the_termination_message_is_one_bounded_paragraph_keeping_both_ends() {
        assert_eq!(
            termination_message("reading x: invalid RltRun:\n  spec.a: bad\n\n  spec.b: bad\n"),
            "reading x: invalid RltRun: spec.a: bad spec.b: bad"
        );
        let long = format!("start {} root cause", "\u{e9}".repeat(5000));
        let m = termination_message(&long);
        assert!(m.len() <= TERMINATION_MESSAGE_MAX, "{}", m.len());
        assert!(m.starts_with("start ") && m.ends_with(" root cause"));
        assert!(m.contains('\u{2026}'));
    }
}
