//! The stage contract: how a pod (or a local process of `rlt-trainer pipeline`) is told what
//! to do. Every pod runs `rlt-trainer <role> <args...>`; the args come from the run spec (see
//! the `args` builders added beside the spec), the per-pod facts come from these variables.
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

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
    /// Root of the shared workspace volume (the run's directory in it is the configuration's
    /// `spec.workspace.directory`).
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
    /// Ranks this process (pod) runs: one per GPU the pod requests, 1 without GPUs. A
    /// data-parallel stage has `RLT_REPLICAS` x this ranks; the rank of local rank `l` is
    /// `RLT_REPLICA_INDEX` x this + `l`.
    pub const RANKS_PER_POD: &str = "RLT_RANKS_PER_POD";
    /// torchrun's rendezvous, for the ranks of a data-parallel stage (warm-up, a student's
    /// distillation) with more than one: the host of rank 0 (pod 0's DNS name under the ranks'
    /// headless Service, loopback when every rank is in one pod), whose c10d TCPStore listens
    /// on `MASTER_PORT`.
    pub const MASTER_ADDR: &str = "MASTER_ADDR";
    pub const MASTER_PORT: &str = "MASTER_PORT";
    /// All ranks of the stage: `RLT_REPLICAS` x `RLT_RANKS_PER_POD`.
    pub const WORLD_SIZE: &str = "WORLD_SIZE";
    /// Ranks in this pod (`RLT_RANKS_PER_POD`, under torchrun's name).
    pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
    /// This process's rank, `RLT_REPLICA_INDEX` x `LOCAL_WORLD_SIZE` + `LOCAL_RANK`: set by the
    /// operator on a pod of one rank, by the trainer on each process of a pod of several.
    pub const RANK: &str = "RANK";
    pub const LOCAL_RANK: &str = "LOCAL_RANK";
    /// Address the trainer's listeners (gRPC, `/metrics`, `/status`) bind; default `0.0.0.0`.
    /// The operator does not set it; the e2e node agent sets it to the pod's IP, since the
    /// pods it plays share the host's network.
    pub const BIND_ADDRESS: &str = "RLT_BIND_ADDRESS";
}

/// A value of the stage environment: literal, or (in a pod) read from the pod's own metadata
/// through the downward API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Literal(String),
    PodField(&'static str),
}

/// An Indexed Job pod's completion index (learners, warm-up ranks, distillation).
pub const JOB_COMPLETION_INDEX_FIELD: &str =
    "metadata.annotations['batch.kubernetes.io/job-completion-index']";
/// A StatefulSet pod's ordinal (parameter servers).
pub const STATEFULSET_POD_INDEX_FIELD: &str = "metadata.labels['apps.kubernetes.io/pod-index']";

/// The stage contract's environment of one stage process, assembled in one place for the
/// operator's pod template and the local pipeline's processes, so both tell a role the same
/// things under the same names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageEnv {
    pub run_name: String,
    pub workspace: String,
    pub config: String,
    pub attempt: u32,
    pub replica_index: EnvValue,
    pub replicas: u32,
    /// The parameter server's gRPC port (unset: the role listens on none).
    pub rpc_port: Option<u16>,
    pub metrics_port: u16,
    /// What [`device_choice`] gives.
    pub device: &'static str,
    /// Where the trainer writes its final error (a pod's termination message).
    pub termination_log: Option<String>,
    /// The parameter servers' addresses (RL only).
    pub param_servers: Option<String>,
    /// The student of a distillation process.
    pub student: Option<String>,
    /// Ranks per pod (GPUs requested; 1 without).
    pub ranks_per_pod: u32,
    /// Where the data-parallel ranks meet, as (`MASTER_ADDR`, `MASTER_PORT`) (warm-up and
    /// distillation with more than one rank).
    pub rendezvous: Option<(String, u16)>,
}

impl StageEnv {
    /// The variables a role may or may not get: a process that does not get one must not
    /// inherit it from whoever started it.
    pub const PER_ROLE: [&'static str; 9] = [
        env::RPC_PORT,
        env::PARAM_SERVERS,
        env::STUDENT,
        env::MASTER_ADDR,
        env::MASTER_PORT,
        env::WORLD_SIZE,
        env::LOCAL_WORLD_SIZE,
        env::RANK,
        env::LOCAL_RANK,
    ];

    /// The variables in the contract's order; unset ones are left out.
    pub fn vars(&self) -> Vec<(&'static str, EnvValue)> {
        let lit = |v: String| EnvValue::Literal(v);
        let mut out = vec![
            (env::RUN_NAME, lit(self.run_name.clone())),
            (env::WORKSPACE, lit(self.workspace.clone())),
            (env::CONFIG, lit(self.config.clone())),
            (env::ATTEMPT, lit(self.attempt.to_string())),
            (env::REPLICA_INDEX, self.replica_index.clone()),
            (env::REPLICAS, lit(self.replicas.to_string())),
            (
                env::RANKS_PER_POD,
                lit(self.ranks_per_pod.max(1).to_string()),
            ),
        ];
        if let Some(port) = self.rpc_port {
            out.push((env::RPC_PORT, lit(port.to_string())));
        }
        out.push((env::METRICS_PORT, lit(self.metrics_port.to_string())));
        out.push((env::DEVICE, lit(self.device.into())));
        if let Some(path) = &self.termination_log {
            out.push((env::TERMINATION_LOG, lit(path.clone())));
        }
        if let Some(addrs) = &self.param_servers {
            out.push((env::PARAM_SERVERS, lit(addrs.clone())));
        }
        if let Some(s) = &self.student {
            out.push((env::STUDENT, lit(s.clone())));
        }
        if let Some((addr, port)) = &self.rendezvous {
            let per_pod = self.ranks_per_pod.max(1);
            out.push((env::MASTER_ADDR, lit(addr.clone())));
            out.push((env::MASTER_PORT, lit(port.to_string())));
            out.push((env::WORLD_SIZE, lit((self.replicas * per_pod).to_string())));
            out.push((env::LOCAL_WORLD_SIZE, lit(per_pod.to_string())));
            // A pod of several ranks is one process until it starts them (`RANK` each).
            if per_pod == 1 {
                out.push((env::RANK, self.replica_index.clone()));
                out.push((env::LOCAL_RANK, lit("0".into())));
            }
        }
        out
    }
}

/// `RLT_DEVICE` of a stage process: the spec's device; `auto` is `cuda` for a pod that
/// requests GPUs and `cpu` for one that does not, and stays `auto` (the trainer picks CUDA when
/// the machine has it) where nothing is requested (`gpu_requested: None`, a local process).
pub fn device_choice(device: crate::spec::Device, gpu_requested: Option<bool>) -> &'static str {
    use crate::spec::Device;
    match (device, gpu_requested) {
        (Device::Cpu, _) => "cpu",
        (Device::Cuda, _) => "cuda",
        (Device::Auto, Some(true)) => "cuda",
        (Device::Auto, Some(false)) => "cpu",
        (Device::Auto, None) => "auto",
    }
}

/// The Prometheus metrics a parameter server exports on the metrics port (each with a
/// `shard` label); the chart's dashboard and alerts name them, and a test checks they exist.
pub mod param_server_metrics {
    pub const STEP: &str = "rl_step";
    pub const GRAD_NORM: &str = "rl_grad_norm";
    pub const MEAN_REWARD: &str = "rl_mean_reward";
    pub const SOLUTION_TERM: &str = "rl_solution_term";
    pub const KL_TERM: &str = "rl_kl_term";
    pub const TOKENS_PER_SECOND: &str = "rl_tokens_per_second";
    pub const BYTES_RECEIVED: &str = "ps_bytes_received_total";
    pub const BYTES_SENT: &str = "ps_bytes_sent_total";
    pub const ALL: [&str; 8] = [
        STEP,
        GRAD_NORM,
        MEAN_REWARD,
        SOLUTION_TERM,
        KL_TERM,
        TOKENS_PER_SECOND,
        BYTES_RECEIVED,
        BYTES_SENT,
    ];
}

/// The GPU resource a stage container requests.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Whether an extended resource is a GPU the trainer computes on: NVIDIA's whole GPUs, its
/// MIG slices under the device plugin's mixed strategy (`nvidia.com/mig-1g.10gb`, each one
/// device to the process), and AMD's (ROCm builds of libtorch drive them as `cuda`).
pub fn is_gpu_resource(name: &str) -> bool {
    name == GPU_RESOURCE || name.starts_with("nvidia.com/mig-") || name == "amd.com/gpu"
}

/// Whether a resource name is an extended resource (`vendor.example/thing`): not one of
/// Kubernetes' own (`cpu`, `memory`, `ephemeral-storage`, `hugepages-*`, `*kubernetes.io/*`).
pub fn is_extended_resource(name: &str) -> bool {
    name.contains('/') && !name.contains("kubernetes.io/")
}

/// GPUs a container asks for (every GPU resource of [`is_gpu_resource`], whole numbers: the
/// device plugins refuse fractions): the limits, else the requests.
pub fn gpus(resources: Option<&ResourceRequirements>) -> u32 {
    let count = |m: &Option<BTreeMap<String, Quantity>>| {
        let m = m.as_ref()?;
        let mut gpus = m
            .iter()
            .filter(|(name, _)| is_gpu_resource(name))
            .filter_map(|(_, q)| q.0.parse::<u32>().ok())
            .peekable();
        gpus.peek()?;
        Some(gpus.sum())
    };
    resources
        .and_then(|r| count(&r.limits).or_else(|| count(&r.requests)))
        .unwrap_or(0)
}

/// Whether the processes of a role with `resources` compute in bf16: `spec.precision`, where
/// `auto` is bf16 exactly on CUDA (what [`device_choice`] gives a pod with those resources).
pub fn computes_in_bf16(
    spec: &crate::spec::RltRunSpec,
    resources: Option<&ResourceRequirements>,
) -> bool {
    use crate::spec::Precision;
    match spec.precision {
        Precision::Bf16 => true,
        Precision::Fp32 => false,
        Precision::Auto => device_choice(spec.device, Some(gpus(resources) > 0)) == "cuda",
    }
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
/// The trainer's exit code when a peer it trains with went away (a rank of its data-parallel
/// group, a parameter server): the attempt failed because another pod was lost, not by a
/// fault of its own. With a disrupted pod in the same attempt (evicted, preempted, its node
/// lost), the operator retries it without counting a failure.
pub const EXIT_PEER_LOST: i32 = 3;

pub const DEFAULT_RPC_PORT: u16 = 50051;
pub const DEFAULT_METRICS_PORT: u16 = 9090;
/// `MASTER_PORT` of the data-parallel ranks: rank 0's c10d TCPStore (torchrun's default).
pub const DEFAULT_COLLECTIVE_PORT: u16 = 29500;
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

/// A learner's termination message when it succeeds: the stage's final [`TrainingFigures`]
/// as one line of JSON. The operator records them in status when the stage completes, since a
/// short stage can end between two polls of [`STATUS_PATH`].
pub fn final_figures_message(figures: &TrainingFigures) -> String {
    serde_json::to_string(figures).expect("figures serialize")
}

/// The figures in a succeeded learner's termination message ([`final_figures_message`]).
pub fn parse_final_figures(message: &str) -> Option<TrainingFigures> {
    serde_json::from_str(message.trim()).ok()
}

/// The rendered run configuration mounted at `RLT_CONFIG`: the run as the user would write it
/// (name, namespace, the spec with every default filled in), parsed back by the trainer with
/// [`crate::parse_yaml`]. `suspend` is left out (always false): it is the operator's business,
/// not the trainer's, and suspending must not rewrite the config. `workspace.directory` is
/// filled in ([`crate::layout::run_directory`]: keyed by the UID of a run the API server holds).
pub fn render_config(run: &crate::RltRun) -> String {
    let mut spec = run.spec.clone();
    spec.suspend = false;
    spec.workspace.directory = crate::layout::run_directory(run);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Device;

    fn stage_env() -> StageEnv {
        StageEnv {
            run_name: "r".into(),
            workspace: "/w".into(),
            config: "/etc/rlt/run.yaml".into(),
            attempt: 2,
            replica_index: EnvValue::PodField(JOB_COMPLETION_INDEX_FIELD),
            replicas: 3,
            rpc_port: None,
            metrics_port: 9090,
            device: device_choice(Device::Auto, Some(true)),
            termination_log: None,
            param_servers: None,
            student: Some("s".into()),
            ranks_per_pod: 1,
            rendezvous: None,
        }
    }

    #[test]
    fn mig_slices_and_amd_gpus_count_as_gpus() {
        let res = |limits: &[(&str, &str)]| ResourceRequirements {
            limits: Some(
                limits
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect(),
            ),
            ..Default::default()
        };
        assert_eq!(gpus(Some(&res(&[("nvidia.com/gpu", "8")]))), 8);
        assert_eq!(gpus(Some(&res(&[("nvidia.com/mig-1g.10gb", "1")]))), 1);
        assert_eq!(gpus(Some(&res(&[("amd.com/gpu", "2"), ("cpu", "4")]))), 2);
        assert_eq!(gpus(Some(&res(&[("example.com/fpga", "1")]))), 0);
        assert_eq!(gpus(None), 0);
        assert!(is_extended_resource("example.com/fpga"));
        assert!(!is_extended_resource("cpu"));
        assert!(!is_extended_resource("hugepages-2Mi"));
        assert!(!is_extended_resource("requests.kubernetes.io/x"));
    }

    #[test]
    fn final_figures_travel_in_one_line_and_an_error_message_is_not_read_as_figures() {
        let f = TrainingFigures {
            step: 8,
            total_steps: 8,
            mean_reward: Some(-1.25),
            solution_term: Some(-1.0),
            kl_term: Some(0.25),
            tokens_per_second: None,
        };
        let message = final_figures_message(&f);
        assert!(!message.contains('\n'), "{message}");
        assert_eq!(parse_final_figures(&message), Some(f));
        assert_eq!(parse_final_figures("error: connection reset"), None);
        assert_eq!(parse_final_figures(""), None);
    }

    #[test]
    fn a_stage_process_gets_the_contract_in_order_and_only_its_roles_variables() {
        let names: Vec<&str> = stage_env().vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                env::RUN_NAME,
                env::WORKSPACE,
                env::CONFIG,
                env::ATTEMPT,
                env::REPLICA_INDEX,
                env::REPLICAS,
                env::RANKS_PER_POD,
                env::METRICS_PORT,
                env::DEVICE,
                env::STUDENT
            ]
        );
        let vars = stage_env().vars();
        assert!(vars.contains(&(env::DEVICE, EnvValue::Literal("cuda".into()))));
        assert!(vars.contains(&(env::ATTEMPT, EnvValue::Literal("2".into()))));
        // Every per-role variable is one a process may lack (and must not inherit).
        let all = StageEnv {
            rpc_port: Some(1),
            param_servers: Some("a:1".into()),
            rendezvous: Some(("a".into(), 29500)),
            termination_log: Some("/dev/termination-log".into()),
            ..stage_env()
        }
        .vars();
        for name in StageEnv::PER_ROLE {
            assert!(all.iter().any(|(n, _)| *n == name), "{name}");
        }
    }

    #[test]
    fn auto_means_cuda_only_for_pods_that_request_gpus_and_is_left_to_the_trainer_locally() {
        assert_eq!(device_choice(Device::Auto, Some(true)), "cuda");
        assert_eq!(device_choice(Device::Auto, Some(false)), "cpu");
        assert_eq!(device_choice(Device::Auto, None), "auto");
        assert_eq!(device_choice(Device::Cpu, Some(true)), "cpu");
        assert_eq!(device_choice(Device::Cuda, None), "cuda");
    }
}
