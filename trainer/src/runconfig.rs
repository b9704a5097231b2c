//! The run configuration as a role's flags.
//!
//! The operator starts every stage pod as plain `rlt-trainer <role>` with the stage contract's
//! environment (`rlt_api::contract::env`), the run configuration (the RltRun YAML, every
//! default filled in) mounted at `RLT_CONFIG`. The roles themselves take flags; this module is
//! the one place that turns the run's spec into them, so the operator's pods, the local
//! `pipeline` and a user's hand-written command line all mean the same thing:
//!
//! - [`expand_argv`]: when `RLT_CONFIG` is set and the subcommand is a role, the flags derived
//!   from the spec are added for every flag the command line does not already give (an
//!   explicit flag always wins);
//! - [`Inputs::prepare`]: what the flags point at is made to exist first: a `tiny:` model is
//!   written once into `<run>/inputs/models/`, a `synthetic:` dataset (or a `limit`ed one)
//!   into `<run>/inputs/data/` (train split; the held-out split beside it), each written
//!   atomically so concurrent pods of one stage agree; a `path:` is resolved against the
//!   workspace and must exist (the error names the field and the path);
//! - [`role_flags`]: pure, spec + prepared inputs -> flags.
//!
//! An invalid run configuration, a missing input or a role the spec cannot give flags to is
//! a bad configuration ([`crate::exit::BAD_CONFIG`]: retrying cannot help); failing to write
//! a prepared input is not.
use crate::checkpoint;
use crate::cli::{PromptStyle, SYNTHETIC_HELD_OUT};
use crate::config::TinySpec;
use crate::data::{self, synthetic};
use crate::exit::bad_config;
use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use rlt_api::contract::{env, Role};
use rlt_api::layout::{is_complete, RunDir, COMPLETE_MARKER};
use rlt_api::spec::{Dataset, ModelRef, TinyModel};
use rlt_api::RltRun;
use std::ffi::OsString;
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
        let run_dir = RunDir::new(workspace, &run_name(run)?);
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

fn run_name(run: &RltRun) -> Result<String> {
    run.metadata
        .name
        .clone()
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

/// The flags the spec gives `role` (the per-pod facts come from the environment).
pub fn role_flags(
    role: Role,
    run: &RltRun,
    inputs: &Inputs,
    student: Option<&str>,
) -> Result<Vec<(String, String)>> {
    let spec = &run.spec;
    let path = |p: &Path| p.display().to_string();
    // The flag's own spelling (clap's value name), so it always parses back.
    let prompts_flag = inputs
        .prompts
        .to_possible_value()
        .expect("every prompt style has a name")
        .get_name()
        .to_string();
    let mut f: Vec<(&str, String)> = Vec::new();
    let (teacher_system, student_system) = spec.system_prompts();
    let prompt_flags = |f: &mut Vec<(&str, String)>| {
        f.push(("--prompts", prompts_flag.clone()));
        f.push(("--teacher-system", teacher_system.clone()));
        f.push(("--student-system", student_system.clone()));
    };
    let rl = &spec.rl;
    let rl_optim = |f: &mut Vec<(&str, String)>| {
        f.push(("--steps", rl.steps.to_string()));
        f.push(("--lr", rl.learning_rate.to_string()));
        f.push(("--adam-beta1", rl.optimizer.beta1.to_string()));
        f.push(("--adam-beta2", rl.optimizer.beta2.to_string()));
        f.push(("--weight-decay", rl.optimizer.weight_decay.to_string()));
        f.push(("--max-grad-norm", rl.optimizer.max_grad_norm.to_string()));
        f.push(("--beta", rl.beta.to_string()));
        f.push(("--ref-mix-alpha", rl.reference_sync.mix.to_string()));
        f.push(("--ref-sync-every", rl.reference_sync.interval.to_string()));
    };
    // The fine-tune flags warm-up and distillation share (both run the SFT code).
    let sft = |f: &mut Vec<(&str, String)>, c: crate::sft::SftConfig| {
        f.push(("--epochs", c.epochs.to_string()));
        f.push(("--batch-size", c.batch_size.to_string()));
        f.push(("--lr", c.lr.to_string()));
        f.push(("--warmup-ratio", c.warmup_ratio.to_string()));
        f.push(("--beta1", c.adamw.beta1.to_string()));
        f.push(("--beta2", c.adamw.beta2.to_string()));
        f.push(("--weight-decay", c.adamw.weight_decay.to_string()));
        f.push(("--clip", c.clip_grad_norm.to_string()));
        f.push(("--max-len", c.max_len.to_string()));
        f.push(("--checkpoint-every", c.checkpoint_every.to_string()));
    };
    match role {
        Role::Warmup => {
            let w = &spec.warmup;
            f.push(("--model", path(&inputs.teacher)));
            f.push(("--data", path(&inputs.train)));
            prompt_flags(&mut f);
            sft(&mut f, crate::sft::SftConfig::warmup(w));
        }
        Role::ParamServer => {
            f.push(("--learners", rl.learners.to_string()));
            f.push(("--init", path(&inputs.rl_init)));
            f.push(("--checkpoint-every", rl.checkpoint_interval.to_string()));
            rl_optim(&mut f);
        }
        Role::Learner => {
            let r = &rl.reward;
            f.push(("--teacher", path(&inputs.rl_init)));
            f.push(("--student", path(&inputs.rl_student)));
            f.push(("--data", path(&inputs.train)));
            prompt_flags(&mut f);
            f.push(("--groups-per-step", rl.batch_size.to_string()));
            f.push(("--group-size", rl.group_size.to_string()));
            f.push(("--max-new-tokens", rl.max_new_tokens.to_string()));
            f.push(("--temperature", rl.temperature.to_string()));
            f.push(("--student-temperature", r.student_temperature.to_string()));
            f.push((
                "--solution-reductions",
                format!(
                    "mean:{},min:{}",
                    r.solution_mean_weight, r.solution_min_weight
                ),
            ));
            f.push((
                "--kl-reductions",
                format!("mean:{},max:{}", r.kl_mean_weight, r.kl_max_weight),
            ));
            f.push(("--format-penalty", r.format_penalty.to_string()));
            rl_optim(&mut f);
        }
        Role::Distill => {
            let d = &spec.distillation;
            let name = student.context(format!(
                "the distill role needs the student's name ({})",
                env::STUDENT
            ))?;
            let Some((_, model)) = inputs.students.iter().find(|(n, _)| n == name) else {
                let names: Vec<&str> = inputs.students.iter().map(|(n, _)| n.as_str()).collect();
                bail!("{}={name:?} is not a student of this run (spec.distillation.students: {names:?})", env::STUDENT);
            };
            f.push(("--student-model", path(model)));
            f.push(("--data", path(&inputs.train)));
            prompt_flags(&mut f);
            f.push((
                "--max-tokens-per-trace",
                d.trace_splitting.max_tokens_per_trace.to_string(),
            ));
            f.push(("--traces", d.trace_splitting.traces.to_string()));
            f.push(("--temperature", rl.temperature.to_string()));
            f.push(("--collect-batch-size", d.batch_size.to_string()));
            sft(&mut f, crate::sft::SftConfig::distillation(d));
        }
        Role::Eval => {}
    }
    Ok(f.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// The role a subcommand names.
pub fn role_of(subcommand: &str) -> Option<Role> {
    [
        Role::Warmup,
        Role::ParamServer,
        Role::Learner,
        Role::Distill,
        Role::Eval,
    ]
    .into_iter()
    .find(|r| r.subcommand() == subcommand)
}

/// Inserts `derived` flags after the subcommand (argv[1]) unless the command line already has
/// them (`--flag value` or `--flag=value`): the user's flags win.
pub fn merge_flags(argv: Vec<OsString>, derived: &[(String, String)]) -> Vec<OsString> {
    let given = |flag: &str| {
        argv.iter().skip(2).any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    let mut out: Vec<OsString> = argv.iter().take(2).cloned().collect();
    for (flag, value) in derived {
        if !given(flag) {
            out.push(flag.into());
            out.push(value.into());
        }
    }
    out.extend(argv.into_iter().skip(2));
    out
}

/// The command line a role runs with: its own, plus the run configuration's flags when
/// `RLT_CONFIG` names one. Other subcommands pass through untouched.
pub fn expand_argv(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(role) = argv.get(1).and_then(|s| s.to_str()).and_then(role_of) else {
        return Ok(argv);
    };
    let Some(config) = std::env::var_os(env::CONFIG) else {
        return Ok(argv);
    };
    if role == Role::Eval {
        return Ok(argv);
    }
    let config = PathBuf::from(config);
    let run = read_run(&config).map_err(bad_config)?;
    let workspace = std::env::var_os(env::WORKSPACE)
        .map(PathBuf::from)
        .with_context(|| format!("{} is set but {} is not", env::CONFIG, env::WORKSPACE))
        .map_err(bad_config)?;
    let inputs = Inputs::prepare(&run, &workspace)
        .with_context(|| format!("preparing the inputs of {}", config.display()))?;
    let student = std::env::var(env::STUDENT).ok();
    let flags = role_flags(role, &run, &inputs, student.as_deref()).map_err(bad_config)?;
    Ok(merge_flags(argv, &flags))
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

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn explicit_flags_win_over_the_run_configuration() {
        let derived = vec![
            ("--epochs".to_string(), "3".to_string()),
            ("--lr".to_string(), "0.001".to_string()),
            ("--data".to_string(), "/w/train.jsonl".to_string()),
        ];
        let argv = os(&["rlt-trainer", "warmup", "--epochs", "7", "--lr=0.5"]);
        let merged = merge_flags(argv, &derived);
        assert_eq!(
            merged,
            os(&[
                "rlt-trainer",
                "warmup",
                "--data",
                "/w/train.jsonl",
                "--epochs",
                "7",
                "--lr=0.5"
            ])
        );
    }

    #[test]
    fn other_subcommands_pass_through() {
        assert_eq!(role_of("distill"), Some(Role::Distill));
        assert_eq!(role_of("param-server"), Some(Role::ParamServer));
        assert_eq!(role_of("pipeline"), None);
        let argv = os(&["rlt-trainer", "pipeline", "x.yaml"]);
        assert_eq!(expand_argv(argv.clone()).unwrap(), argv);
    }

    fn inputs() -> Inputs {
        Inputs {
            teacher: "/w/t".into(),
            rl_init: "/w/t".into(),
            rl_student: "/w/s".into(),
            students: vec![("s".into(), "/w/s".into())],
            train: "/w/train.jsonl".into(),
            held_out: None,
            prompts: PromptStyle::Standard,
        }
    }

    fn flag<'a>(flags: &'a [(String, String)], name: &str) -> Option<&'a str> {
        flags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_specs_system_prompts_reach_every_role_that_writes_a_chat() {
        let yaml = "apiVersion: rlt.dev/v1alpha1\nkind: RltRun\nmetadata: {name: r}\nspec:\n  image: i\n  teacher: {path: t}\n  dataset: {path: d.jsonl}\n  rl: {student: {path: s}}\n  prompts: {teacher: 'Explain it.', student: 'Solve it.'}\n  distillation: {students: [{name: s, model: {path: s}}]}\n";
        let run = rlt_api::parse_yaml(yaml).unwrap();
        for role in [Role::Warmup, Role::Learner, Role::Distill] {
            let flags = role_flags(role, &run, &inputs(), Some("s")).unwrap();
            assert_eq!(
                flag(&flags, "--teacher-system"),
                Some("Explain it."),
                "{role:?}"
            );
            assert_eq!(
                flag(&flags, "--student-system"),
                Some("Solve it."),
                "{role:?}"
            );
        }
        // Unset, a real teacher gets the default wording, which lives in rlt_api.
        let plain = rlt_api::parse_yaml(&yaml.replace(
            "  prompts: {teacher: 'Explain it.', student: 'Solve it.'}\n",
            "",
        ))
        .unwrap();
        let flags = role_flags(Role::Learner, &plain, &inputs(), None).unwrap();
        let teacher = rlt_api::spec::defaults::teacher_system();
        assert_eq!(flag(&flags, "--teacher-system"), Some(teacher.as_str()));
    }

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
