//! The run configuration of a stage process.
//!
//! The operator starts every stage pod as plain `rlt-trainer <role>` with the stage contract's
//! environment (`rlt_api::contract::env`), the run configuration (the RltRun YAML, every
//! default filled in) mounted at `RLT_CONFIG`. A role reads it as a [`Staged`] run and builds
//! its typed configuration from the spec (`SftConfig::warmup`, `RlOptimizer::of_rl`,
//! `CollectConfig::of_run`, ...); the flags a user gives are overrides merged over it, and a
//! hand run without `RLT_CONFIG` merges them over the spec's defaults. So the operator's pods,
//! the local `pipeline` and a hand-written command line all mean the same thing.
//!
//! Preparing what the spec points at is the first step of the stage ([`Inputs::prepare`]):
//! a `tiny:` model is written once into `<run>/inputs/models/`, a `synthetic:` dataset (or a
//! `limit`ed one) into `<run>/inputs/data/` (train split; the held-out split beside it), each
//! written atomically so concurrent pods of one stage agree; a `path:` is resolved against
//! the workspace and must exist (the error names the field and the path).
//!
//! An invalid run configuration or a missing input is a bad configuration
//! ([`crate::exit::BAD_CONFIG`]: retrying cannot help); failing to write a prepared input is
//! not.
use crate::data::{self, synthetic};
use crate::exit::bad_config;
use crate::model::checkpoint;
use crate::model::config::TinySpec;
use crate::stage::cli::{PromptStyle, SYNTHETIC_HELD_OUT};
use anyhow::{anyhow, bail, Context, Result};
use rlt_api::contract::env;
use rlt_api::layout::{is_complete, RunDir, COMPLETE_MARKER};
use rlt_api::spec::{Dataset, ModelRef, TinyModel};
use rlt_api::RltRun;
use std::path::{Path, PathBuf};

/// The files a run's roles read, prepared by [`Inputs::prepare`].
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// The teacher's starting checkpoint (warm-up input).
    pub teacher: PathBuf,
    /// The teacher RL starts from: the warm-up output, or `teacher` when warm-up is skipped.
    pub rl_init: PathBuf,
    /// The frozen student that scores explanations in RL.
    pub rl_student: PathBuf,
    /// Each distillation student's starting checkpoint, by name.
    pub students: Vec<(String, PathBuf)>,
    /// The training rows (custom or Stratos format, JSON/JSONL).
    pub train: PathBuf,
    /// The held-out rows of a synthetic dataset (evaluation only; no stage reads them).
    pub held_out: Option<PathBuf>,
    /// Short system prompts for tiny byte-level models, standard ones otherwise.
    pub prompts: PromptStyle,
}

/// Where a run keeps its prepared inputs.
pub fn inputs_dir(run_dir: &RunDir) -> PathBuf {
    run_dir.root().join("inputs")
}

impl Inputs {
    /// Resolves and, where needed, materialises every input of `run`. Which ones a role needs
    /// is a subset, but they are cheap and deterministic, so every role prepares all: the
    /// first caller writes them, the others find them.
    pub fn prepare(run: &RltRun, workspace: &Path) -> Result<Inputs> {
        let run_dir = RunDir::new(workspace, &run_directory(run)?);
        let spec = &run.spec;
        let teacher = model_dir(&spec.teacher, "spec.teacher", workspace, &run_dir)?;
        let rl_student = match &spec.rl.student {
            Some(m) => model_dir(m, "spec.rl.student", workspace, &run_dir)?,
            None => teacher.clone(),
        };
        let rl_init = if spec.warmup.enabled {
            run_dir.warmup().final_dir()
        } else {
            teacher.clone()
        };
        let students = spec
            .distillation
            .students
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("spec.distillation.students[{i}].model");
                Ok((
                    s.name.clone(),
                    model_dir(&s.model, &field, workspace, &run_dir)?,
                ))
            })
            .collect::<Result<_>>()?;
        let (train, held_out) = dataset_files(&spec.dataset, workspace, &run_dir)?;
        let prompts = if spec.teacher.tiny.is_some() {
            PromptStyle::Short
        } else {
            PromptStyle::Standard
        };
        Ok(Inputs {
            teacher,
            rl_init,
            rl_student,
            students,
            train,
            held_out,
            prompts,
        })
    }
}

/// The run's directory in the workspace ([`rlt_api::layout::run_directory`]).
pub fn run_directory(run: &RltRun) -> Result<String> {
    rlt_api::layout::run_directory(run)
        .context("the run configuration has no metadata.name")
        .map_err(bad_config)
}

/// A path from the spec: absolute, or relative to the workspace root.
pub fn resolve_path(path: &str, workspace: &Path) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workspace.join(p)
    }
}

fn model_dir(m: &ModelRef, field: &str, workspace: &Path, run_dir: &RunDir) -> Result<PathBuf> {
    match (&m.path, &m.tiny) {
        (Some(path), _) => {
            let dir = resolve_path(path, workspace);
            if !dir.join(checkpoint::CONFIG_FILE).is_file() {
                return Err(bad_config(anyhow!(
                    "{field}.path: no model checkpoint at {} (config.json missing)",
                    dir.display()
                )));
            }
            Ok(dir)
        }
        (None, Some(tiny)) => {
            let dir = inputs_dir(run_dir).join("models").join(tiny_name(tiny));
            if !is_complete(&dir) {
                let spec = TinySpec::from(tiny);
                write_once(&dir, |tmp| {
                    checkpoint::init_tiny(tmp, &spec, tch::Kind::Float)
                })
                .with_context(|| format!("{field}.tiny: creating the tiny model"))?;
            }
            Ok(dir)
        }
        (None, None) => Err(bad_config(anyhow!(
            "{field}: exactly one of path or tiny must be set"
        ))),
    }
}

/// A directory name that identifies a tiny model by every number that shapes its weights.
pub fn tiny_name(t: &TinyModel) -> String {
    format!(
        "tiny-h{}-l{}-a{}-kv{}-i{}-s{}",
        t.hidden_size, t.layers, t.heads, t.kv_heads, t.intermediate_size, t.seed
    )
}

/// Writes a deterministic directory once: built under a private name, then renamed into place;
/// when another process got there first its (identical) copy stays and ours is dropped.
fn write_once(dir: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().context("no parent directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("input");
    let scratch = parent.join(format!(".{name}.build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let built = scratch.join(name);
    build(&built)?;
    if !is_complete(&built) {
        std::fs::write(built.join(COMPLETE_MARKER), "")?;
    }
    if std::fs::rename(&built, dir).is_err() && !is_complete(dir) {
        bail!(
            "could not move {} into place at {}",
            built.display(),
            dir.display()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The training file (and held-out file) of the dataset.
fn dataset_files(
    d: &Dataset,
    workspace: &Path,
    run_dir: &RunDir,
) -> Result<(PathBuf, Option<PathBuf>)> {
    let data_dir = inputs_dir(run_dir).join("data");
    match (&d.path, &d.synthetic) {
        (Some(path), _) => {
            let file = resolve_path(path, workspace);
            if !file.is_file() {
                return Err(bad_config(anyhow!(
                    "spec.dataset.path: no dataset file at {}",
                    file.display()
                )));
            }
            let Some(limit) = d.limit else {
                return Ok((file, None));
            };
            let dir = data_dir.join(format!("limit-{limit}"));
            if !is_complete(&dir) {
                let mut rows = data::load_examples(&file, false)
                    .with_context(|| "spec.dataset.path".to_string())
                    .map_err(bad_config)?
                    .examples;
                rows.truncate(limit as usize);
                write_once(&dir, |tmp| {
                    data::write_jsonl(&tmp.join("train.jsonl"), &rows)
                })?;
            }
            Ok((dir.join("train.jsonl"), None))
        }
        (None, Some(s)) => {
            let dir = data_dir.join(format!("synthetic-{}-s{}", s.rows, s.seed));
            if !is_complete(&dir) {
                let spec = synthetic::SyntheticSpec {
                    count: s.rows as usize,
                    seed: s.seed,
                    ..Default::default()
                };
                let (mut train, held) =
                    synthetic::split(synthetic::generate(&spec), SYNTHETIC_HELD_OUT, s.seed);
                if let Some(limit) = d.limit {
                    train.truncate(limit as usize);
                }
                if train.is_empty() {
                    return Err(bad_config(anyhow!("spec.dataset.synthetic: {} rows leave no training rows after the held-out split", s.rows)));
                }
                write_once(&dir, |tmp| {
                    data::write_jsonl(&tmp.join("train.jsonl"), &train)?;
                    data::write_jsonl(&tmp.join("heldout.jsonl"), &held)
                })?;
            }
            Ok((dir.join("train.jsonl"), Some(dir.join("heldout.jsonl"))))
        }
        (None, None) => Err(bad_config(anyhow!(
            "spec.dataset: exactly one of path or synthetic must be set"
        ))),
    }
}

/// A stage process's run: the rendered RltRun at `RLT_CONFIG` and its prepared inputs.
pub struct Staged {
    pub run: RltRun,
    pub inputs: Inputs,
}

impl Staged {
    /// The run this process was started for (`RLT_CONFIG`, in the workspace `RLT_WORKSPACE`),
    /// its inputs prepared; `None` for a hand run without `RLT_CONFIG`.
    pub fn from_env() -> Result<Option<Staged>> {
        let Some(config) = std::env::var_os(env::CONFIG) else {
            return Ok(None);
        };
        let config = PathBuf::from(config);
        let run = read_run(&config).map_err(bad_config)?;
        let workspace = std::env::var_os(env::WORKSPACE)
            .map(PathBuf::from)
            .with_context(|| format!("{} is set but {} is not", env::CONFIG, env::WORKSPACE))
            .map_err(bad_config)?;
        let inputs = Inputs::prepare(&run, &workspace)
            .with_context(|| format!("preparing the inputs of {}", config.display()))?;
        Ok(Some(Staged { run, inputs }))
    }

    pub fn spec(&self) -> &rlt_api::RltRunSpec {
        &self.run.spec
    }

    /// The run's name (its directory in the workspace).
    /// The run's directory in the workspace.
    pub fn directory(&self) -> Result<String> {
        run_directory(&self.run)
    }

    /// The starting checkpoint of the distillation student `name`.
    pub fn student_model(&self, name: &str) -> Result<PathBuf> {
        match self.inputs.students.iter().find(|(n, _)| n == name) {
            Some((_, model)) => Ok(model.clone()),
            None => {
                let names: Vec<&str> = self
                    .inputs
                    .students
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect();
                Err(bad_config(anyhow!(
                    "{}={name:?} is not a student of this run (spec.distillation.students: {names:?})",
                    env::STUDENT
                )))
            }
        }
    }
}

/// The run's directory in `workspace`: named by `--run`, else by the run configuration
/// (`spec.workspace.directory`, which the operator fills in; else the run's name).
pub fn run_dir(workspace: &Path, flag: Option<&str>, run: Option<&Staged>) -> Result<RunDir> {
    let name = flag_or_run(
        flag.map(str::to_string),
        run.map(Staged::directory).transpose()?,
        "--run",
    )?;
    Ok(RunDir::new(workspace, &name))
}

/// A setting a hand run gives as `flag` and a staged run takes from its spec: the flag when
/// given, else the run's value, else a bad configuration naming the flag.
pub fn flag_or_run<T>(flag: Option<T>, run: Option<T>, name: &str) -> Result<T> {
    flag.or(run).ok_or_else(|| {
        bad_config(anyhow!(
            "{name} is required unless the run configuration ({}) gives it",
            env::CONFIG
        ))
    })
}

/// Reads and validates a run configuration file (the same checks as the CRD).
pub fn read_run(path: &Path) -> Result<RltRun> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the run configuration {}", path.display()))?;
    rlt_api::parse_yaml(&text).map_err(|errors| {
        anyhow::anyhow!(
            "{}: invalid RltRun:\n{}",
            path.display(),
            rlt_api::validate::render(&errors)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_names_cover_every_weight_shaping_number() {
        let a = TinyModel::default();
        let b = TinyModel {
            seed: 2,
            ..TinyModel::default()
        };
        assert_ne!(tiny_name(&a), tiny_name(&b));
        assert_eq!(tiny_name(&a), tiny_name(&TinyModel::default()));
    }
}
