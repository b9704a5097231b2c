//! The shared workspace layout. Every stage reads the previous stage's output directory and
//! writes its own; the operator reports these paths in status and the trainer writes them.
//!
//! ```text
//! <workspace>/<run>/
//!   warmup/checkpoints/step-<N>-attempt-<A>/   resumable training state
//!   warmup/final/                              HF checkpoint (config.json, tokenizer.json, *.safetensors)
//!   rl/shards/ps-<i>/step-<N>-attempt-<A>/     one parameter-server shard + its AdamW state
//!   rl/final/                                  HF checkpoint of the RL teacher
//!   rl/metrics.json                            latest training figures (also served over HTTP)
//!   distill/<student>/traces.jsonl             raw teacher explanations, one row per dataset row
//!   distill/<student>/checkpoints/...          resumable fine-tune state
//!   distill/<student>/final/                   HF checkpoint of the distilled student
//! ```
use std::path::{Path, PathBuf};

/// The run's directory in the workspace: `spec.workspace.directory`; else, for a run the API
/// server gave a UID, [`keyed_directory`]; else (a local run) the run's name.
/// [`crate::contract::render_config`] writes it into the configuration every pod reads.
pub fn run_directory(run: &crate::RltRun) -> Option<String> {
    let name = run.metadata.name.as_deref()?;
    Some(match (&run.spec.workspace.directory, &run.metadata.uid) {
        (Some(dir), _) => dir.clone(),
        (None, Some(uid)) => keyed_directory(name, uid),
        (None, None) => name.to_string(),
    })
}

/// The directory of a cluster run: its name and the start of its UID, so a run deleted and
/// created again under the same name starts afresh instead of finding the earlier one's
/// outputs.
pub fn keyed_directory(name: &str, uid: &str) -> String {
    let key: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    format!("{name}-{key}")
}

/// Marker written last into a finished output directory, so a reader never mistakes a
/// half-written checkpoint for a complete one.
pub const COMPLETE_MARKER: &str = "COMPLETE";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(PathBuf);

impl RunDir {
    pub fn new(workspace: impl AsRef<Path>, run: &str) -> Self {
        RunDir(workspace.as_ref().join(run))
    }
    pub fn root(&self) -> &Path {
        &self.0
    }
    pub fn warmup(&self) -> StageDir {
        StageDir(self.0.join("warmup"))
    }
    pub fn rl(&self) -> StageDir {
        StageDir(self.0.join("rl"))
    }
    pub fn distill(&self, student: &str) -> StageDir {
        StageDir(self.0.join("distill").join(student))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageDir(PathBuf);

impl StageDir {
    pub fn root(&self) -> &Path {
        &self.0
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.0.join("checkpoints")
    }
    pub fn final_dir(&self) -> PathBuf {
        self.0.join("final")
    }
    /// Parameter-server shard checkpoints (RL only).
    pub fn shard(&self, index: usize) -> PathBuf {
        self.0.join("shards").join(format!("ps-{index}"))
    }
    pub fn traces(&self) -> PathBuf {
        self.0.join("traces.jsonl")
    }
    pub fn metrics(&self) -> PathBuf {
        self.0.join("metrics.json")
    }
}

/// Name of one checkpoint directory. The attempt fences writers: a pod of attempt A only writes
/// `*-attempt-A` directories, so a straggler from an older attempt cannot clobber a newer one.
/// Whether a stage output or checkpoint directory was written whole (its marker goes in last).
pub fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE_MARKER).exists()
}

pub fn checkpoint_name(step: u64, attempt: u32) -> String {
    format!("step-{step:08}-attempt-{attempt}")
}

/// Parses [`checkpoint_name`] back into (step, attempt).
pub fn parse_checkpoint_name(name: &str) -> Option<(u64, u32)> {
    let rest = name.strip_prefix("step-")?;
    let (step, attempt) = rest.split_once("-attempt-")?;
    Some((step.parse().ok()?, attempt.parse().ok()?))
}

/// The checkpoint to resume from: the highest step among complete checkpoints written by
/// attempts up to `attempt` (later attempts' writes are never read by an older pod).
pub fn latest_checkpoint(dir: &Path, attempt: u32) -> Option<(u64, PathBuf)> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (step, a) = parse_checkpoint_name(&name)?;
            let path = e.path();
            (a <= attempt && is_complete(&path)).then_some((step, a, path))
        })
        .max_by_key(|(step, a, _)| (*step, *a))
        .map(|(step, _, path)| (step, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_round_trip() {
        assert_eq!(
            parse_checkpoint_name(&checkpoint_name(42, 3)),
            Some((42, 3))
        );
        assert_eq!(parse_checkpoint_name("step-x-attempt-1"), None);
        assert_eq!(parse_checkpoint_name("final"), None);
    }

    #[test]
    fn latest_checkpoint_skips_incomplete_and_future_attempts() {
        let tmp = std::env::temp_dir().join(format!("rlt-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        for (step, attempt, complete) in
            [(10, 0, true), (20, 1, true), (30, 1, false), (40, 2, true)]
        {
            let d = tmp.join(checkpoint_name(step, attempt));
            std::fs::create_dir_all(&d).unwrap();
            if complete {
                std::fs::write(d.join(COMPLETE_MARKER), "").unwrap();
            }
        }
        assert_eq!(latest_checkpoint(&tmp, 1).unwrap().0, 20);
        assert_eq!(latest_checkpoint(&tmp, 2).unwrap().0, 40);
        assert_eq!(latest_checkpoint(&tmp, 0).unwrap().0, 10);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
