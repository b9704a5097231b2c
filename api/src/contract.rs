//! The stage contract: how a pod (or a local process of `rlt-trainer pipeline`) is told what
//! to do. Every pod runs `rlt-trainer <role> <args...>`; the args come from the run spec (see
//! the `args` builders added beside the spec), the per-pod facts come from these variables.

/// The trainer binary's name inside the image (on PATH).
pub const TRAINER_BIN: &str = "rlt-trainer";

/// The roles, one subcommand each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Warmup,
    ParamServer,
    Learner,
    Distill,
    Eval,
}

impl Role {
    pub fn subcommand(self) -> &'static str {
        match self {
            Role::Warmup => "warmup",
            Role::ParamServer => "param-server",
            Role::Learner => "learner",
            Role::Distill => "distill",
            Role::Eval => "eval",
        }
    }
}

/// Environment variables set on every stage pod. The trainer reads them as clap `env`
/// fallbacks for the matching flags, so a local run can pass flags instead.
pub mod env {
    /// Name of the RltRun.
    pub const RUN_NAME: &str = "RLT_RUN_NAME";
    /// Root of the shared workspace volume (the run's directory is `<workspace>/<run>`).
    pub const WORKSPACE: &str = "RLT_WORKSPACE";
    /// Path of the rendered run configuration (the RltRun spec as YAML), mounted read-only.
    pub const CONFIG: &str = "RLT_CONFIG";
    /// The stage attempt (0-based); fences checkpoint writes (see `layout`).
    pub const ATTEMPT: &str = "RLT_ATTEMPT";
    /// This pod's index within its role (parameter-server shard / learner rank).
    /// Learner pods of an Indexed Job get it from `JOB_COMPLETION_INDEX` via the operator.
    pub const REPLICA_INDEX: &str = "RLT_REPLICA_INDEX";
    /// Number of replicas in this role (parameter servers / learners).
    pub const REPLICAS: &str = "RLT_REPLICAS";
    /// Comma-separated `host:port` of every parameter server, in shard order.
    pub const PARAM_SERVERS: &str = "RLT_PARAM_SERVERS";
    /// Port the parameter server listens on for gRPC.
    pub const RPC_PORT: &str = "RLT_RPC_PORT";
    /// Port for `/metrics` (Prometheus) and `/status` (training figures as JSON).
    pub const METRICS_PORT: &str = "RLT_METRICS_PORT";
    /// `cpu` or `cuda`.
    pub const DEVICE: &str = "RLT_DEVICE";
    /// The student a distillation pod works for (one Job per student).
    pub const STUDENT: &str = "RLT_STUDENT";
    /// File the trainer writes its final error to before it exits non-zero; the operator
    /// points it at the container's `terminationMessagePath`
    /// ([`TERMINATION_LOG_PATH`](super::TERMINATION_LOG_PATH)), so the reason shows in the pod
    /// status and in the run's condition.
    pub const TERMINATION_LOG: &str = "RLT_TERMINATION_LOG";
    /// Address the trainer's listeners (gRPC, `/metrics`, `/status`) bind; default `0.0.0.0`.
    /// The operator does not set it; the e2e node agent sets it to the pod's IP, since the
    /// pods it plays share the host's network.
    pub const BIND_ADDRESS: &str = "RLT_BIND_ADDRESS";
}

/// The container's `terminationMessagePath`, where the trainer writes its final error
/// (told by [`env::TERMINATION_LOG`]).
pub const TERMINATION_LOG_PATH: &str = "/dev/termination-log";

/// HTTP path on parameter server 0's metrics port that serves the latest
/// [`TrainingFigures`] as JSON; the operator polls it while RL runs.
pub const STATUS_PATH: &str = "/status";

/// The trainer's exit code for a configuration it cannot run (a missing dataset or model, an
/// invalid run): the operator does not retry it. Any other non-zero code is a crash (retried).
pub const EXIT_BAD_CONFIG: i32 = 2;

pub const DEFAULT_RPC_PORT: u16 = 50051;
pub const DEFAULT_METRICS_PORT: u16 = 9090;
/// Where the operator mounts the ConfigMap with the rendered run configuration.
pub const CONFIG_MOUNT_DIR: &str = "/etc/rlt";
pub const CONFIG_FILE: &str = "run.yaml";
/// Where the operator mounts the shared workspace volume.
pub const WORKSPACE_MOUNT_DIR: &str = "/workspace";

/// Training figures the trainer publishes (learner 0's `/status`, and `rl/metrics.json`)
/// and the operator copies into the run's status.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainingFigures {
    pub step: u64,
    pub total_steps: u64,
    pub mean_reward: Option<f64>,
    pub solution_term: Option<f64>,
    pub kl_term: Option<f64>,
    pub tokens_per_second: Option<f64>,
}

/// The rendered run configuration mounted at `RLT_CONFIG`: the run as the user would write it
/// (name, namespace, the spec with every default filled in), parsed back by the trainer with
/// [`crate::parse_yaml`]. `suspend` is left out (always false): it is the operator's business,
/// not the trainer's, and suspending must not rewrite the config.
pub fn render_config(run: &crate::RltRun) -> String {
    let mut spec = run.spec.clone();
    spec.suspend = false;
    let doc = crate::RltRun {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: run.metadata.name.clone(),
            namespace: run.metadata.namespace.clone(),
            ..Default::default()
        },
        spec,
        status: None,
    };
    serde_yaml::to_string(&doc).expect("an RltRun serializes")
}
