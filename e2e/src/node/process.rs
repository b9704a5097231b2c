//! A container as a local process: its own process group (so the whole tree is signalled),
//! a clean environment, stdout and stderr appended to one log file.
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub log: PathBuf,
}

pub struct Proc {
    child: Child,
    pub pid: i32,
    /// Size of the log file when this run started: its own output follows.
    pub log_offset: u64,
    exit: Option<i32>,
}

/// Exit code as a container runtime reports it: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Sends a signal to a process group; a group that is gone is not an error.
pub fn signal_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe {
            libc::killpg(pgid, sig);
        }
    }
}

pub fn spawn(spec: &Spec) -> Result<Proc> {
    if let Some(dir) = spec.log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("open {}", spec.log.display()))?;
    let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    std::fs::create_dir_all(&spec.cwd)?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child when
    // the agent dies, so no container outlives a crashed agent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("exec {}", spec.program.display()))?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    Ok(Proc {
        child,
        pid,
        log_offset,
        exit: None,
    })
}

impl Proc {
    /// Waits for the process to exit (cancel-safe; repeated calls return the same code). The
    /// rest of its process group is killed then, as a runtime tears down a container.
    pub async fn wait(&mut self) -> i32 {
        if let Some(code) = self.exit {
            return code;
        }
        let code = match self.child.wait().await {
            Ok(s) => exit_code(s),
            Err(_) => 255,
        };
        signal_group(self.pid, libc::SIGKILL);
        self.exit = Some(code);
        code
    }

    pub fn signal(&self, sig: i32) {
        if self.exit.is_none() {
            signal_group(self.pid, sig);
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit code.
    pub async fn stop(&mut self, grace: Duration) -> i32 {
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(code) => code,
            Err(_) => {
                self.signal(libc::SIGKILL);
                self.wait().await
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// This run's output: the log from `offset`, at most the last `max` bytes.
pub fn log_tail(log: &std::path::Path, offset: u64, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(max));
    let mut out = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.read_to_end(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_logs_and_stops_a_process_group() {
        let dir = std::env::temp_dir().join(format!("rlt-e2e-node-proc-{}", std::process::id()));
        let log = dir.join("x.log");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&log, "old\n").unwrap();
        let spec = |script: &str| Spec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hi".into())],
            cwd: dir.clone(),
            log: log.clone(),
        };
        let mut p = spawn(&spec(
            "echo $GREETING; echo err >&2; test -z \"$HOME\"; exit 3",
        ))
        .unwrap();
        assert_eq!(p.wait().await, 3);
        assert_eq!(p.wait().await, 3);
        assert_eq!(log_tail(&log, p.log_offset, 2048), b"hi\nerr\n");
        let mut p = spawn(&spec("sleep 30 & wait")).unwrap();
        let code = p.stop(Duration::from_secs(5)).await;
        assert_eq!(code, 128 + libc::SIGTERM);
        let mut p = spawn(&spec(
            "trap '' TERM; echo trapped; sleep 30 & wait; sleep 30",
        ))
        .unwrap();
        // Signal only once the shell ignores SIGTERM.
        while !log_tail(&log, p.log_offset, 64).starts_with(b"trapped") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let code = p.stop(Duration::from_millis(300)).await;
        assert_eq!(code, 128 + libc::SIGKILL);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
