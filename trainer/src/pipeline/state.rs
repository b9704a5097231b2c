//! What the pipeline remembers between invocations (`<run>/pipeline-state.json`): when the run
//! was first started (the AGE column) and each stage's last attempt, so that a rerun starts a
//! new attempt and its checkpoint writes are fenced from the old one's (`rlt_api::layout`).
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

use rlt_api::stage::Stage;

pub const STATE_FILE: &str = "pipeline-state.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Unix seconds of the first invocation.
    pub created: u64,
    /// Last attempt started per stage label.
    #[serde(default)]
    pub attempts: BTreeMap<String, u32>,
    #[serde(default)]
    last: u32,
}

impl State {
    pub fn load(run_root: &Path) -> Result<State> {
        let path = run_root.join(STATE_FILE);
        if !path.exists() {
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            return Ok(State {
                created,
                attempts: BTreeMap::new(),
                last: 0,
            });
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a pipeline state file; delete it to start over",
                path.display()
            )
        })
    }

    pub fn save(&self, run_root: &Path) -> Result<()> {
        let path = run_root.join(STATE_FILE);
        let tmp = run_root.join(format!(".{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// The attempt to start for `stage`: 0 the first time, then one more than the last.
    pub fn next_attempt(&mut self, stage: Stage) -> u32 {
        let next = self.attempts.get(stage.label()).map_or(0, |a| a + 1);
        self.attempts.insert(stage.label().to_string(), next);
        self.last = next;
        next
    }

    /// The attempt of the stage started last (the ATTEMPT column once the run is done).
    pub fn last_attempt(&self) -> u32 {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_grow_per_stage_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("rlt-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = State::load(&dir).unwrap();
        assert_eq!(s.next_attempt(Stage::Warmup), 0);
        assert_eq!(s.next_attempt(Stage::Rl), 0);
        assert_eq!(s.next_attempt(Stage::Rl), 1);
        s.save(&dir).unwrap();
        let mut again = State::load(&dir).unwrap();
        assert_eq!(again.created, s.created);
        assert_eq!(again.next_attempt(Stage::Rl), 2);
        assert_eq!(again.next_attempt(Stage::Distillation), 0);
        std::fs::write(dir.join(STATE_FILE), "{").unwrap();
        assert!(format!("{:#}", State::load(&dir).unwrap_err()).contains(STATE_FILE));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
