//! Which parameter server owns which parameters, and the state one server keeps for its shard
//! (weights, the trainer's one AdamW over them, the GRPO reference copy), with checkpoints in
//! the workspace.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rlt_api::layout;
use rlt_api::spec::{defaults, RlStage};
use tch::{Kind, Tensor};

use super::grpo::{ref_mix, ref_sync_due, GrpoConfig};
use crate::train::optim::{AdamW, AdamWConfig};

/// The shard's files in a checkpoint directory.
const PARAMS_FILE: &str = "params.safetensors";
const REFERENCE_FILE: &str = "reference.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The RL stage's optimizer: AdamW at a constant learning rate, the whole step's gradient
/// clipped to `max_grad_norm` (over every shard; 0 = no clipping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RlOptimizer {
    pub adamw: AdamWConfig,
    pub lr: f64,
    pub max_grad_norm: f64,
}

impl RlOptimizer {
    /// As `spec.rl` gives it.
    pub fn of_rl(rl: &RlStage) -> Self {
        RlOptimizer {
            adamw: AdamWConfig::from(&rl.optimizer),
            lr: rl.learning_rate,
            max_grad_norm: rl.optimizer.max_grad_norm,
        }
    }
}

impl Default for RlOptimizer {
    /// The spec's default RL recipe (lr 1e-6, betas (0.9, 0.999), clipping at 1).
    fn default() -> Self {
        RlOptimizer::of_rl(&defaults::rl())
    }
}

/// The names a shard owns, in a fixed (sorted) order.
pub fn shard_names(assignment: &BTreeMap<String, usize>, shard: usize) -> Vec<String> {
    assignment
        .iter()
        .filter(|(_, &s)| s == shard)
        .map(|(n, _)| n.clone())
        .collect()
}

/// One server's shard: fp32 weights, their AdamW (which holds the same tensors) and the
/// reference weights, all in the same name order. `version` counts applied updates (= RL
/// steps done).
pub struct ShardState {
    pub names: Vec<String>,
    pub params: Vec<Tensor>,
    pub optimizer: AdamW,
    pub reference: Vec<Tensor>,
    pub version: u64,
    /// Version at which the reference was last re-synced (0 = the initial weights).
    pub reference_version: u64,
}

impl ShardState {
    /// A fresh shard from initial weights (looked up by name in `weights`), the reference kept
    /// in `reference_kind` (the learners' dtype: they only ever read it in that dtype).
    pub fn fresh(
        names: Vec<String>,
        weights: &BTreeMap<String, Tensor>,
        adamw: AdamWConfig,
        reference_kind: Kind,
    ) -> Result<Self> {
        let mut params = Vec::new();
        for n in &names {
            let t = weights
                .get(n)
                .with_context(|| format!("initial checkpoint has no tensor {n:?}"))?;
            params.push(t.to_kind(Kind::Float).copy());
        }
        let reference = params
            .iter()
            .map(|p| p.to_kind(reference_kind).copy())
            .collect();
        Ok(Self::assemble(names, params, reference, adamw))
    }

    fn assemble(
        names: Vec<String>,
        params: Vec<Tensor>,
        reference: Vec<Tensor>,
        adamw: AdamWConfig,
    ) -> Self {
        let optimizer = AdamW::new(
            names
                .iter()
                .cloned()
                .zip(params.iter().map(Tensor::shallow_clone)),
            adamw,
        );
        ShardState {
            names,
            params,
            optimizer,
            reference,
            version: 0,
            reference_version: 0,
        }
    }

    pub fn shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.names
            .iter()
            .zip(&self.params)
            .map(|(n, p)| (n.clone(), p.size()))
            .collect()
    }

    /// Applies one synchronous step with the averaged gradients (one per name, same order)
    /// multiplied by `scale` (the clipping coefficient of the whole step's gradient, over
    /// every shard), then re-syncs the reference when due.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64, scale: f64, grpo: &GrpoConfig) {
        assert_eq!(grads.len(), self.params.len());
        self.optimizer.step_with(lr, grads, scale);
        let step = self.version + 1;
        self.version = step;
        if ref_sync_due(step, grpo) {
            for (r, p) in self.reference.iter_mut().zip(&self.params) {
                ref_mix(r, p, grpo.ref_mix_alpha);
            }
            self.reference_version = step;
        }
    }

    /// Writes the shard to `<dir>/<checkpoint_name(version, attempt)>/`, the COMPLETE marker
    /// last, so a kill mid-write leaves a directory that resume ignores.
    pub fn save(&self, dir: &Path, attempt: u32) -> Result<PathBuf> {
        let out = dir.join(layout::checkpoint_name(self.version, attempt));
        if out.exists() {
            std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
        }
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        for (file, tensors) in [
            (PARAMS_FILE, &self.params),
            (REFERENCE_FILE, &self.reference),
        ] {
            let named: Vec<(&str, &Tensor)> = self
                .names
                .iter()
                .map(String::as_str)
                .zip(tensors.iter())
                .collect();
            let path = out.join(file);
            Tensor::write_safetensors(&named, &path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        self.optimizer.save(&out.join(OPTIMIZER_FILE))?;
        let meta = serde_json::json!({
            "version": self.version,
            "reference_version": self.reference_version,
            "names": self.names,
        });
        std::fs::write(out.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
        std::fs::write(out.join(layout::COMPLETE_MARKER), b"")?;
        Ok(out)
    }

    /// Loads a shard checkpoint and checks it holds exactly the expected tensors with the
    /// expected shapes (a checkpoint of another model or another shard count fails here).
    pub fn load(
        path: &Path,
        expected: &[(String, Vec<i64>)],
        adamw: AdamWConfig,
        reference_kind: Kind,
    ) -> Result<Self> {
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(path.join("meta.json"))
                .with_context(|| format!("reading {}/meta.json", path.display()))?,
        )
        .with_context(|| format!("parsing {}/meta.json", path.display()))?;
        let version = meta["version"]
            .as_u64()
            .context("meta.json: missing version")?;
        let reference_version = meta["reference_version"]
            .as_u64()
            .context("meta.json: missing reference_version")?;
        let read = |file: &str, kind: Kind| -> Result<Vec<Tensor>> {
            let p = path.join(file);
            let map: BTreeMap<String, Tensor> = Tensor::read_safetensors(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .into_iter()
                .collect();
            if map.len() != expected.len() {
                bail!(
                    "{}: holds {} tensors but this shard owns {} (checkpoint of another model or shard count?)",
                    p.display(),
                    map.len(),
                    expected.len()
                );
            }
            let mut out = Vec::new();
            for (name, shape) in expected {
                let t = map
                    .get(name)
                    .with_context(|| format!("{}: no tensor {name:?}", p.display()))?;
                if &t.size() != shape {
                    bail!(
                        "{}: tensor {name:?} has shape {:?}, the model needs {shape:?}",
                        p.display(),
                        t.size()
                    );
                }
                out.push(t.to_kind(kind));
            }
            Ok(out)
        };
        let names = expected.iter().map(|(n, _)| n.clone()).collect();
        let (params, reference) = (
            read(PARAMS_FILE, Kind::Float)?,
            read(REFERENCE_FILE, reference_kind)?,
        );
        let mut state = Self::assemble(names, params, reference, adamw);
        let opt_path = path.join(OPTIMIZER_FILE);
        state
            .optimizer
            .load(&opt_path)
            .with_context(|| format!("reading {}", opt_path.display()))?;
        if state.optimizer.steps() != version {
            bail!(
                "{}: the optimizer has taken {} steps but the shard is at version {version}",
                path.display(),
                state.optimizer.steps()
            );
        }
        state.version = version;
        state.reference_version = reference_version;
        Ok(state)
    }
}

/// The newest version every one of `num_shards` shards has a complete checkpoint of (attempts
/// up to `attempt`): what a new attempt of the stage can resume all servers from together.
pub fn common_version(stage: &layout::StageDir, num_shards: usize, attempt: u32) -> Option<u64> {
    (0..num_shards)
        .map(|i| layout::latest_checkpoint(&stage.shard(i), attempt).map(|(v, _)| v))
        .min()
        .flatten()
}

/// Deletes shard `shard`'s checkpoints older than the newest version complete on every shard
/// (at 7B one version is ~120 GB of the workspace): that version stays, with anything newer.
pub fn prune_checkpoints(stage: &layout::StageDir, shard: usize, num_shards: usize, attempt: u32) {
    let Some(keep) = common_version(stage, num_shards, attempt) else {
        return;
    };
    let dir = stage.shard(shard);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((version, a)) = name.to_str().and_then(layout::parse_checkpoint_name) else {
            continue;
        };
        if version < keep && a <= attempt {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), %err, "could not delete an old shard checkpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::assign_shards;

    #[test]
    fn assignment_is_deterministic_balanced_and_complete() {
        let params: Vec<(String, i64)> = [
            ("emb", 1000),
            ("a", 300),
            ("b", 300),
            ("c", 200),
            ("d", 200),
            ("e", 10),
        ]
        .iter()
        .map(|(n, s)| (n.to_string(), *s))
        .collect();
        let a = assign_shards(&params, 2);
        let mut shuffled = params.clone();
        shuffled.reverse();
        assert_eq!(
            a,
            assign_shards(&shuffled, 2),
            "input order must not matter"
        );
        assert_eq!(a.len(), params.len());
        let load = |s| {
            params
                .iter()
                .filter(|(n, _)| a[n] == s)
                .map(|(_, k)| k)
                .sum::<i64>()
        };
        // emb on 0 (1000); a, b, c, d on 1 (1000); e breaks the tie to the lower index.
        assert_eq!((load(0), load(1)), (1010, 1000));
        assert_eq!(shard_names(&a, 0), vec!["e".to_string(), "emb".to_string()]);
        let one = assign_shards(&params, 1);
        assert!(one.values().all(|&s| s == 0));
    }

    #[test]
    fn checkpoint_round_trip_and_shape_mismatch_fails() {
        let dir = std::env::temp_dir().join(format!("rlt-shard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = BTreeMap::new();
        w.insert("x".to_string(), Tensor::from_slice(&[1.0f32, 2.0, 3.0]));
        w.insert(
            "y".to_string(),
            Tensor::from_slice(&[4.0f32, 5.0]).view([1, 2]),
        );
        let adamw = AdamWConfig::rl();
        let mut s =
            ShardState::fresh(vec!["x".into(), "y".into()], &w, adamw, Kind::Float).unwrap();
        let grads = vec![
            Tensor::from_slice(&[1.0f32, -1.0, 0.5]),
            Tensor::from_slice(&[0.1f32, 0.2]).view([1, 2]),
        ];
        let grpo = GrpoConfig {
            ref_sync_every: 1,
            ..GrpoConfig::default()
        };
        s.apply(&grads, 0.1, 1.0, &grpo);
        let path = s.save(&dir, 3).unwrap();
        assert_eq!(
            layout::latest_checkpoint(&dir, 3).unwrap(),
            (1, path.clone())
        );
        let back = ShardState::load(&path, &s.shapes(), adamw, Kind::Float).unwrap();
        assert_eq!((back.version, back.reference_version), (1, 1));
        for (a, b) in back.params.iter().zip(&s.params) {
            assert!(a.equal(b));
        }
        let (state, back_state) = (s.optimizer.state(), back.optimizer.state());
        assert_eq!(
            state.keys().collect::<Vec<_>>(),
            back_state.keys().collect::<Vec<_>>()
        );
        for (k, t) in &state {
            assert!(t.equal(&back_state[k]), "{k}");
        }
        let wrong = vec![("x".to_string(), vec![4]), ("y".to_string(), vec![1, 2])];
        let err = ShardState::load(&path, &wrong, adamw, Kind::Float)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("\"x\" has shape [3], the model needs [4]"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Each shard keeps the newest version every shard has whole (a new attempt resumes all
    /// servers from it) and newer ones; older ones go. Bf16 learners' reference is kept and
    /// checkpointed in bf16 (half the bytes).
    #[test]
    fn shards_keep_the_newest_common_version_and_a_bf16_reference() {
        let root = std::env::temp_dir().join(format!("rlt-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let stage = layout::RunDir::new(&root, "run").rl();
        let mut w = BTreeMap::new();
        w.insert("x".to_string(), Tensor::from_slice(&[1.0f32, 2.0, 3.0]));
        let adamw = AdamWConfig::rl();
        let grads = vec![Tensor::from_slice(&[1.0f32, -1.0, 0.5])];
        let shard = || ShardState::fresh(vec!["x".into()], &w, adamw, Kind::BFloat16).unwrap();
        let (mut a, mut b) = (shard(), shard());
        assert_eq!(a.reference[0].kind(), Kind::BFloat16);
        let versions = |i: usize| -> Vec<u64> {
            let mut v: Vec<u64> = std::fs::read_dir(stage.shard(i))
                .unwrap()
                .flatten()
                .filter_map(|e| layout::parse_checkpoint_name(e.file_name().to_str()?))
                .map(|(v, _)| v)
                .collect();
            v.sort();
            v
        };
        let grpo = GrpoConfig::default();
        for _ in 0..3 {
            a.apply(&grads, 0.1, 1.0, &grpo);
            a.save(&stage.shard(0), 0).unwrap();
            prune_checkpoints(&stage, 0, 2, 0);
        }
        // Shard 1 never checkpointed: shard 0 keeps everything.
        assert_eq!(versions(0), vec![1, 2, 3]);
        b.apply(&grads, 0.1, 1.0, &grpo);
        b.apply(&grads, 0.1, 1.0, &grpo);
        b.save(&stage.shard(1), 0).unwrap();
        prune_checkpoints(&stage, 0, 2, 0);
        prune_checkpoints(&stage, 1, 2, 0);
        assert_eq!(common_version(&stage, 2, 0), Some(2));
        assert_eq!((versions(0), versions(1)), (vec![2, 3], vec![2]));
        let path = layout::latest_checkpoint(&stage.shard(1), 0).unwrap().1;
        let back = ShardState::load(&path, &b.shapes(), adamw, Kind::BFloat16).unwrap();
        assert_eq!(back.reference[0].kind(), Kind::BFloat16);
        assert!(back.reference[0].equal(&b.reference[0]));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
