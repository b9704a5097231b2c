//! Which processes a stage runs and when it is done: pure decisions from the spec and the
//! workspace's COMPLETE markers, mirroring what the operator reconciles (one Job per stage;
//! parameter servers + learners for RL; one Job per student). The stages themselves and the
//! words of their progress are `rlt_api::stage`'s, shared with the operator.
use rlt_api::contract::Role;
use rlt_api::layout::{is_complete, RunDir};
use rlt_api::stage::Stage;
use rlt_api::RltRun;

/// The students of the distillation stage still to run.
pub fn pending_students(run: &RltRun, run_dir: &RunDir) -> Vec<String> {
    Stage::Distillation
        .outputs(&run.spec, run_dir)
        .into_iter()
        .filter(|(_, dir)| !is_complete(dir))
        .filter_map(|(name, _)| name)
        .collect()
}

/// One process of a stage: `rlt-trainer <role>` with this replica index among `replicas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub role: Role,
    pub index: u32,
    pub replicas: u32,
    pub student: Option<String>,
}

impl Proc {
    /// A short tag for log lines, like the pod's role and index.
    pub fn tag(&self) -> String {
        match &self.student {
            Some(s) if self.replicas > 1 => format!("distill-{s}-{}", self.index),
            Some(s) => format!("distill-{s}"),
            None if self.replicas > 1 => format!("{}-{}", self.role.subcommand(), self.index),
            None => self.role.subcommand().to_string(),
        }
    }
}

/// The processes a stage runs now (distillation: only the students not yet done).
pub fn processes(stage: Stage, run: &RltRun, pending: &[String]) -> Vec<Proc> {
    let spec = &run.spec;
    let replicas = |role, n: u32| {
        (0..n).map(move |index| Proc {
            role,
            index,
            replicas: n,
            student: None,
        })
    };
    match stage {
        Stage::Warmup => replicas(Role::Warmup, spec.warmup.replicas).collect(),
        Stage::Rl => replicas(Role::ParamServer, spec.rl.param_servers)
            .chain(replicas(Role::Learner, spec.rl.learners))
            .collect(),
        Stage::Distillation => pending
            .iter()
            .flat_map(|s| {
                let n = spec.distillation.replicas;
                (0..n).map(move |index| Proc {
                    role: Role::Distill,
                    index,
                    replicas: n,
                    student: Some(s.clone()),
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlt_api::layout::COMPLETE_MARKER;

    fn run(yaml: &str) -> RltRun {
        rlt_api::parse_yaml(yaml).unwrap_or_else(|e| panic!("{}", rlt_api::validate::render(&e)))
    }

    const BASE: &str = "apiVersion: rlt.dev/v1alpha1\nkind: RltRun\nmetadata: {name: t}\nspec:\n  image: x\n  teacher: {tiny: {}}\n  dataset: {synthetic: {rows: 8}}\n";

    #[test]
    fn rl_runs_every_server_and_learner_and_distillation_only_pending_students() {
        let r = run(&format!(
            "{BASE}  rl: {{paramServers: 2, learners: 3}}\n  distillation: {{students: [{{name: a, model: {{tiny: {{}}}}}}, {{name: b, model: {{tiny: {{}}}}}}]}}\n"
        ));
        let procs = processes(Stage::Rl, &r, &[]);
        let tags: Vec<String> = procs.iter().map(Proc::tag).collect();
        assert_eq!(
            tags,
            [
                "param-server-0",
                "param-server-1",
                "learner-0",
                "learner-1",
                "learner-2"
            ]
        );
        let procs = processes(Stage::Distillation, &r, &["b".to_string()]);
        assert_eq!(procs.len(), 1);
        assert_eq!(procs[0].student.as_deref(), Some("b"));

        let tmp = std::env::temp_dir().join(format!("rlt-plan-{}", std::process::id()));
        let run_dir = RunDir::new(&tmp, "t");
        std::fs::create_dir_all(run_dir.distill("a").final_dir()).unwrap();
        std::fs::write(run_dir.distill("a").final_dir().join(COMPLETE_MARKER), "").unwrap();
        // b has a final directory but no marker: not done.
        std::fs::create_dir_all(run_dir.distill("b").final_dir()).unwrap();
        assert_eq!(pending_students(&r, &run_dir), vec!["b".to_string()]);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
