//! What a fine-tune (warm-up, a student's distillation) needs per device, from the model's
//! shape and the stage's settings, as this trainer lays it out:
//!
//! - weights and their gradients in the training dtype, whole on every rank;
//! - f32 master weights (bf16 training only), AdamW's two f32 moments and the f32 gradient
//!   accumulator, each a 1/W share per rank ([`crate::data_parallel`]);
//! - activations of one micro-batch: every decoder layer's saved tensors, or with activation
//!   checkpointing only each layer's input plus one layer recomputed at a time, and the logits
//!   (over chunks of [`crate::model::LOGIT_CHUNK`] tokens when checkpointing);
//! - a fixed allowance for the CUDA context and the allocator's fragmentation.
//!
//! [`preflight`] runs at the start of the stage, before anything is loaded: a stage that
//! cannot fit stops with the spec fields to change. [`table`] is the README's table. The RL
//! stage has its own arithmetic: [`learner_estimate`] (three whole models, sampling and
//! backward passes over a few rows of a group) and [`server_bytes`] (one shard's state).
use crate::config::Qwen2Config;
use anyhow::{anyhow, Result};
use std::fmt::Write as _;

pub const GIB: f64 = (1u64 << 30) as f64;
/// What `nvidia-smi` reports for an 80 GB H100 (81559 MiB).
pub const H100_80GB: f64 = 81559.0 * (1u64 << 20) as f64;
/// CUDA context, cuBLAS workspaces, allocator fragmentation.
const OVERHEAD: f64 = 2.5 * GIB;

/// The dimensions that decide memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub params: f64,
    pub layers: f64,
    pub hidden: f64,
    pub intermediate: f64,
    /// Query heads x head dim, key/value heads x head dim.
    pub q_dim: f64,
    pub kv_dim: f64,
    pub vocab: f64,
}

impl Shape {
    pub fn of(c: &Qwen2Config) -> Shape {
        Shape {
            params: c.num_parameters() as f64,
            layers: c.num_hidden_layers as f64,
            hidden: c.hidden_size as f64,
            intermediate: c.intermediate_size as f64,
            q_dim: (c.num_attention_heads * c.head_dim()) as f64,
            kv_dim: (c.kv_heads() * c.head_dim()) as f64,
            vocab: c.vocab_size as f64,
        }
    }

    /// Elements one decoder layer keeps per token for its backward pass: norms' inputs and
    /// outputs, q/k/v before and after rotary, keys and values repeated for grouped-query
    /// attention, the attention output and its reshape, and the MLP's gate, up, SiLU and
    /// product. (Attention itself is the fused kernel: no sequence x sequence scores.)
    fn layer_elements_per_token(&self) -> f64 {
        5.0 * self.hidden + 6.0 * self.q_dim + 3.0 * self.kv_dim + 4.0 * self.intermediate
    }
}

/// The published Qwen2.5 shapes the README's table covers.
pub fn qwen2_shapes() -> Vec<(&'static str, Qwen2Config)> {
    let shape = |v: i64, h: i64, i: i64, l: i64, heads: i64, kv: i64, tied: bool| {
        serde_json::from_value::<Qwen2Config>(serde_json::json!({
            "vocab_size": v, "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": l, "num_attention_heads": heads,
            "num_key_value_heads": kv, "tie_word_embeddings": tied,
        }))
        .expect("a valid Qwen2 config")
    };
    vec![
        ("0.5B", shape(151_936, 896, 4864, 24, 14, 2, true)),
        ("1.5B", shape(151_936, 1536, 8960, 28, 12, 2, true)),
        ("7B", shape(152_064, 3584, 18_944, 28, 28, 4, false)),
        ("32B", shape(152_064, 5120, 27_648, 64, 40, 8, false)),
    ]
}

/// One of [`qwen2_shapes`] by name ("7B").
pub fn qwen2_shape(name: &str) -> Option<Qwen2Config> {
    qwen2_shapes()
        .into_iter()
        .find_map(|(n, c)| (n == name).then_some(c))
}

/// One fine-tune's settings, as far as memory goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Data-parallel ranks (pods x GPUs per pod).
    pub ranks: u32,
    /// Bytes per element of the training dtype (2 for bf16, 4 for f32).
    pub dtype_bytes: u32,
    pub max_length: u32,
    /// Sequences per micro-batch on one rank.
    pub micro_batch: u32,
    pub checkpointing: bool,
}

/// Bytes per rank, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub logits: f64,
}

impl Estimate {
    pub fn total(&self) -> f64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.logits + OVERHEAD
    }
}

pub fn estimate(s: &Shape, p: &Plan) -> Estimate {
    let b = f64::from(p.dtype_bytes);
    let w = f64::from(p.ranks.max(1));
    let masters = if p.dtype_bytes < 4 { 4.0 } else { 0.0 };
    let tokens = f64::from(p.micro_batch.max(1)) * f64::from(p.max_length);
    Estimate {
        weights: b * s.params,
        gradients: b * s.params,
        // f32 masters, two moments and the accumulator, sharded.
        optimizer: (masters + 8.0 + 4.0) * s.params / w,
        activations: activations(s, tokens, b, p.checkpointing),
        logits: logits(s, tokens, b, p.checkpointing),
    }
}

/// What the backward pass over `tokens` tokens keeps of the decoder layers.
fn activations(s: &Shape, tokens: f64, b: f64, checkpointing: bool) -> f64 {
    let layer = s.layer_elements_per_token() * tokens * b;
    if checkpointing {
        // Each layer's input, then one layer's saved tensors and their gradients at a time.
        s.layers * s.hidden * tokens * b + 2.0 * layer
    } else {
        s.layers * layer
    }
}

/// Logits in the training dtype, their f32 log-softmax, and both gradients: of every token,
/// or of one chunk of [`crate::model::LOGIT_CHUNK`] tokens when checkpointing.
fn logits(s: &Shape, tokens: f64, b: f64, checkpointing: bool) -> f64 {
    let logit_tokens = if checkpointing {
        tokens.min(crate::model::LOGIT_CHUNK as f64)
    } else {
        tokens
    };
    logit_tokens * s.vocab * (2.0 * b + 8.0)
}

/// A stage about to start, for [`preflight`].
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// As users read it: "warm-up", "distillation of student s".
    pub what: String,
    /// The spec section: "warmup" or "distillation".
    pub section: &'static str,
    pub plan: Plan,
    pub ranks_per_pod: u32,
    /// Examples per rank per optimizer step.
    pub rows_per_rank: u32,
}

impl Stage {
    /// A fine-tune of `cfg` in `kind` on `world` ranks (`ranks_per_pod` per pod).
    pub fn sft(
        what: String,
        section: &'static str,
        cfg: &crate::sft::SftConfig,
        kind: tch::Kind,
        world: usize,
        ranks_per_pod: usize,
    ) -> Stage {
        let per_rank = cfg.batch_size.div_ceil(world.max(1));
        Stage {
            rows_per_rank: per_rank as u32,
            what,
            section,
            plan: Plan {
                ranks: world as u32,
                dtype_bytes: kind.elt_size_in_bytes() as u32,
                max_length: cfg.max_len as u32,
                micro_batch: per_rank.div_ceil(cfg.grad_accum.max(1)) as u32,
                checkpointing: cfg.activation_checkpointing,
            },
            ranks_per_pod: ranks_per_pod as u32,
        }
    }
}

/// Whether the stage fits in `available` bytes per rank; if not, the error says by how much
/// and which fields would make it fit (more ranks, a shorter maxLength, checkpointing).
pub fn preflight(shape: &Shape, stage: &Stage, available: f64) -> Result<Estimate, String> {
    let need = estimate(shape, &stage.plan);
    if need.total() <= available {
        return Ok(need);
    }
    let p = stage.plan;
    let sec = stage.section;
    let fits = |plan: Plan| estimate(shape, &plan).total() <= available;
    let mut fixes = Vec::new();
    if !p.checkpointing
        && fits(Plan {
            checkpointing: true,
            ..p
        })
    {
        fixes.push(format!("set {sec}.activationCheckpointing: true"));
    }
    let per_pod = stage.ranks_per_pod.max(1);
    if let Some(ranks) = (p.ranks + 1..=256 * per_pod).find(|&r| fits(Plan { ranks: r, ..p })) {
        fixes.push(format!(
            "raise {sec}.replicas to {} ({ranks} ranks{})",
            ranks.div_ceil(per_pod),
            if per_pod > 1 {
                format!(" at {per_pod} GPUs per pod")
            } else {
                String::new()
            }
        ));
    }
    if let Some(len) = (1..p.max_length / 1024)
        .rev()
        .map(|k| k * 1024)
        .find(|&l| fits(Plan { max_length: l, ..p }))
    {
        fixes.push(format!("lower {sec}.maxLength to {len}"));
    }
    let fixes = if fixes.is_empty() {
        "no setting of this stage makes it fit: use devices with more memory".to_string()
    } else {
        fixes.join(", or ")
    };
    Err(format!(
        "memory preflight: {} needs about {:.1} GiB per GPU ({:.1} GiB available) for a \
         {:.1}B-parameter model at {sec}.maxLength {} with {} rank{}{}: {}; {fixes}",
        stage.what,
        need.total() / GIB,
        available / GIB,
        shape.params / 1e9,
        p.max_length,
        p.ranks,
        if p.ranks == 1 { "" } else { "s" },
        if p.checkpointing {
            " and activation checkpointing"
        } else {
            ""
        },
        breakdown(&need),
    ))
}

fn breakdown(e: &Estimate) -> String {
    format!(
        "weights {:.1}, gradients {:.1}, optimizer {:.1}, activations {:.1}, logits {:.1} GiB",
        e.weights / GIB,
        e.gradients / GIB,
        e.optimizer / GIB,
        e.activations / GIB,
        e.logits / GIB
    )
}

/// An RL learner's settings, as far as memory goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnerPlan {
    /// Bytes per element of the models' dtype.
    pub dtype_bytes: u32,
    pub group_size: u32,
    /// The longest teacher prompt or student chat around the explanation, in tokens.
    pub prompt: u32,
    pub max_new_tokens: u32,
    /// Rows per forward/backward pass over a group's sequences (0: as many as fit, for
    /// [`learner_passes`]; an estimate counts 0 as 1).
    pub micro_batch: u32,
    /// Rows per sampling pass (the KV cache holds these; 0 as `micro_batch`).
    pub generation_batch: u32,
    pub checkpointing: bool,
}

impl LearnerPlan {
    /// The longest sequence a pass sees.
    pub fn sequence(&self) -> u32 {
        self.prompt + self.max_new_tokens
    }
}

/// A learner holds the policy, its GRPO reference and the student whole, and the policy's
/// gradient (the optimizer state lives on the parameter servers). Per group it first samples
/// (a KV cache of `generation_batch` rows), then scores and backpropagates `micro_batch` rows
/// at a time; sampling and the backward pass never hold memory at once. With the whole group
/// in one pass and no checkpointing the graph is built while the student scores.
pub fn learner_estimate(teacher: &Shape, student: &Shape, p: &LearnerPlan) -> Estimate {
    let b = f64::from(p.dtype_bytes);
    let seq = f64::from(p.sequence());
    let kv_cache =
        f64::from(p.generation_batch.max(1)) * seq * teacher.layers * 2.0 * teacher.kv_dim * b;
    let tokens = f64::from(p.micro_batch.max(1)) * seq;
    let backward = activations(teacher, tokens, b, p.checkpointing);
    // A pass without a graph holds about one layer's tensors at a time.
    let scoring = student
        .layer_elements_per_token()
        .max(teacher.layer_elements_per_token())
        * tokens
        * b;
    let whole_group = !p.checkpointing && p.micro_batch >= p.group_size;
    Estimate {
        weights: (2.0 * teacher.params + student.params) * b,
        gradients: teacher.params * b,
        optimizer: 0.0,
        activations: if whole_group {
            kv_cache.max(backward + scoring)
        } else {
            kv_cache.max(backward).max(scoring)
        },
        logits: logits(teacher, tokens, b, p.checkpointing),
    }
}

/// The passes a learner splits a group into: the fewest (largest `micro_batch`, then largest
/// `generation_batch`) that fit in `available`, keeping those the plan fixes (non-zero);
/// `None` when not even one row at a time fits.
pub fn learner_passes(
    teacher: &Shape,
    student: &Shape,
    plan: &LearnerPlan,
    available: f64,
) -> Option<LearnerPlan> {
    let g = plan.group_size.max(1);
    let fits = |p: &LearnerPlan| learner_estimate(teacher, student, p).total() <= available;
    let choices = |fixed: u32| if fixed > 0 { fixed..=fixed } else { 1..=g };
    let micro_batch = choices(plan.micro_batch).rev().find(|&m| {
        fits(&LearnerPlan {
            micro_batch: m,
            generation_batch: plan.generation_batch.max(1),
            ..*plan
        })
    })?;
    let generation_batch = choices(plan.generation_batch).rev().find(|&n| {
        fits(&LearnerPlan {
            micro_batch,
            generation_batch: n,
            ..*plan
        })
    })?;
    Some(LearnerPlan {
        micro_batch,
        generation_batch,
        ..*plan
    })
}

/// The learner's passes ([`learner_passes`]), or the error naming the `rl` fields that would
/// make it fit.
pub fn learner_preflight(
    teacher: &Shape,
    student: &Shape,
    plan: &LearnerPlan,
    available: f64,
) -> Result<LearnerPlan, String> {
    let one = LearnerPlan {
        micro_batch: 1,
        generation_batch: 1,
        ..*plan
    };
    if let Some(p) = learner_passes(teacher, student, plan, available) {
        return Ok(p);
    }
    let fits = |p: LearnerPlan| learner_estimate(teacher, student, &p).total() <= available;
    let mut fixes = Vec::new();
    if fits(one) {
        fixes.push("pass fewer rows at a time (--micro-batch, --generation-batch)".to_string());
    }
    if !plan.checkpointing
        && fits(LearnerPlan {
            checkpointing: true,
            ..one
        })
    {
        fixes.push("set rl.activationCheckpointing: true".to_string());
    }
    if let Some(n) = (1..plan.max_new_tokens / 1024)
        .rev()
        .map(|k| k * 1024)
        .find(|&n| {
            fits(LearnerPlan {
                max_new_tokens: n,
                ..one
            })
        })
    {
        fixes.push(format!("lower rl.maxNewTokens to {n}"));
    }
    let need = learner_estimate(teacher, student, &one);
    let fixes = if fixes.is_empty() {
        format!(
            "no rl setting makes it fit: a learner holds the teacher, its reference and the \
             student whole ({:.1} GiB of weights and gradients), so use GPUs with more memory",
            (need.weights + need.gradients) / GIB
        )
    } else {
        fixes.join(", or ")
    };
    Err(format!(
        "memory preflight: an RL learner needs about {:.1} GiB per GPU ({:.1} GiB available) \
         for a {:.1}B-parameter teacher and a {:.1}B-parameter student with sequences up to \
         {} tokens, one at a time{}: {}; {fixes}",
        need.total() / GIB,
        available / GIB,
        teacher.params / 1e9,
        student.params / 1e9,
        plan.sequence(),
        if plan.checkpointing {
            " with activation checkpointing"
        } else {
            ""
        },
        breakdown(&need),
    ))
}

/// A parameter server's host memory for its 1/`servers` share: f32 weights, AdamW's two
/// moments and the GRPO reference (f32), one pending f32 gradient per learner and their
/// average, and the encoded weights and reference the learners' pulls share.
pub fn server_bytes(s: &Shape, servers: u32, learners: u32) -> f64 {
    let l = f64::from(learners.max(1));
    (4.0 + 8.0 + 4.0 + 4.0 * l + 4.0 + 8.0) * s.params / f64::from(servers.max(1))
}

/// The RL part of the README's table: per model (teacher and student of the same shape), bf16
/// learners on an 80 GB GPU at the paper's group of 64 and `max_new_tokens`, prompts of
/// [`README_RL_PROMPT`] tokens, and the host memory of 4 parameter servers for 4 learners.
pub fn rl_table(max_new_tokens: &[u32]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| model | maxNewTokens | learner GiB, checkpointing, 1 row per pass | rows per pass on 80 GB (backward / sampling) | parameter server GiB (4 servers, 4 learners) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for (name, config) in qwen2_shapes() {
        let shape = Shape::of(&config);
        for &n in max_new_tokens {
            let plan = LearnerPlan {
                dtype_bytes: 2,
                group_size: 64,
                prompt: README_RL_PROMPT,
                max_new_tokens: n,
                micro_batch: 1,
                generation_batch: 1,
                checkpointing: true,
            };
            let one = learner_estimate(&shape, &shape, &plan).total();
            let choose = LearnerPlan {
                micro_batch: 0,
                generation_batch: 0,
                ..plan
            };
            let passes = learner_passes(&shape, &shape, &choose, H100_80GB)
                .map_or("does not fit".to_string(), |p| {
                    format!("{} / {}", p.micro_batch, p.generation_batch)
                });
            let _ = writeln!(
                out,
                "| {name} | {n} | {:.1}{} | {passes} | {:.1} |",
                one / GIB,
                if one <= H100_80GB { "" } else { " ✗" },
                server_bytes(&shape, 4, 4) / GIB
            );
        }
    }
    out
}

/// Prompt tokens the README's RL table assumes (a question and its solution).
pub const README_RL_PROMPT: u32 = 1024;

/// The sequence lengths and rank counts of the README's table.
pub const README_LENGTHS: [u32; 2] = [4096, 16384];
pub const README_RANKS: [u32; 5] = [1, 2, 4, 8, 16];

/// The README's table: GiB per GPU of a bf16 fine-tune with activation checkpointing, one
/// sequence per micro-batch, by model and ranks (✗: more than an 80 GB H100 holds), and the
/// fewest such GPUs that fit.
pub fn table(max_lengths: &[u32], ranks: &[u32]) -> String {
    let gpu = H100_80GB;
    let mut out = String::new();
    let _ = write!(out, "| model | maxLength |");
    for r in ranks {
        let _ = write!(out, " {r} GPU{} |", if *r == 1 { "" } else { "s" });
    }
    let _ = writeln!(out, " fewest 80 GB GPUs |");
    let _ = writeln!(out, "|---|---:|{}---:|", "---:|".repeat(ranks.len()));
    for (name, config) in qwen2_shapes() {
        let shape = Shape::of(&config);
        for &max_length in max_lengths {
            let plan = |ranks| Plan {
                ranks,
                dtype_bytes: 2,
                max_length,
                micro_batch: 1,
                checkpointing: true,
            };
            let _ = write!(
                out,
                "| {name} ({:.2}B) | {max_length} |",
                shape.params / 1e9
            );
            for &r in ranks {
                let gib = estimate(&shape, &plan(r)).total() / GIB;
                let mark = if gib * GIB <= gpu { "" } else { " ✗" };
                let _ = write!(out, " {gib:.1}{mark} |");
            }
            let fewest = (1..=1024).find(|&r| estimate(&shape, &plan(r)).total() <= gpu);
            let _ = writeln!(
                out,
                " {} |",
                fewest.map_or("more than 1024".to_string(), |r| r.to_string())
            );
        }
    }
    out
}

/// Memory one device offers a rank: `RLT_DEVICE_MEMORY_GIB` when set; for CUDA the GPU's
/// total memory (`nvidia-smi`), for the CPU the container's memory limit (cgroup) or the
/// machine's memory, shared by the pod's `ranks_per_pod` ranks. `None` when unknown.
pub fn available(device: tch::Device, ranks_per_pod: u32) -> Option<f64> {
    if let Some(gib) = std::env::var("RLT_DEVICE_MEMORY_GIB")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        return Some(gib * GIB);
    }
    match device {
        tch::Device::Cuda(i) => {
            let mib: f64 = crate::device::nvidia_smi(i, "memory.total")?.parse().ok()?;
            Some(mib * (1u64 << 20) as f64)
        }
        _ => host_memory().map(|b| b / f64::from(ranks_per_pod.max(1))),
    }
}

/// This process's peak resident memory (`VmHWM`) in MiB, where the system tells it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn host_memory() -> Option<f64> {
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<f64>().ok())
    // cgroup v1 reports "no limit" as a huge number.
    .filter(|&b| b < 1e18);
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb * 1024.0)
    });
    match (limit, total) {
        (Some(l), Some(t)) => Some(l.min(t)),
        (l, t) => l.or(t),
    }
}

/// The micro-batches a rank splits its examples into: the fewest (from the stage's own
/// `grad_accum`) whose activations fit, `None` when not even one sequence at a time does.
pub fn micro_batches(shape: &Shape, stage: &Stage, grad_accum: u32, available: f64) -> Option<u32> {
    let rows = stage.rows_per_rank.max(1);
    (grad_accum.max(1)..=rows.max(grad_accum)).find(|&g| {
        let plan = Plan {
            micro_batch: rows.div_ceil(g),
            ..stage.plan
        };
        estimate(shape, &plan).total() <= available
    })
}

/// The preflight of a fine-tune of the model in `model_dir` (its `config.json` only): the
/// gradient accumulation to use (more micro-batches than `grad_accum` when a rank's whole
/// share of the batch would not fit at once), or the error naming the fields to change.
/// Unknown device memory is logged and let through with `grad_accum` as it is.
pub fn check_stage(
    model_dir: &std::path::Path,
    stage: &Stage,
    grad_accum: usize,
    device: tch::Device,
) -> Result<usize> {
    let shape = shape_of(model_dir)?;
    let Some(available) = available(device, stage.ranks_per_pod) else {
        tracing::warn!(stage = %stage.what, "device memory unknown (set RLT_DEVICE_MEMORY_GIB); memory preflight skipped");
        return Ok(grad_accum);
    };
    let g = micro_batches(&shape, stage, grad_accum as u32, available);
    // Refused at one sequence per micro-batch: the fixes are judged at the trainer's best.
    let micro_batch = g.map_or(1, |g| stage.rows_per_rank.max(1).div_ceil(g));
    let stage = Stage {
        plan: Plan {
            micro_batch,
            ..stage.plan
        },
        ..stage.clone()
    };
    let need = preflight(&shape, &stage, available).map_err(|m| anyhow!(m))?;
    let g = g.unwrap_or(grad_accum as u32);
    tracing::info!(
        stage = %stage.what,
        need_gib = format!("{:.1}", need.total() / GIB),
        available_gib = format!("{:.1}", available / GIB),
        micro_batches = g,
        "memory preflight: fits ({})",
        breakdown(&need)
    );
    Ok(g as usize)
}

fn shape_of(model_dir: &std::path::Path) -> Result<Shape> {
    let config = Qwen2Config::from_file(&model_dir.join(crate::checkpoint::CONFIG_FILE))?;
    Ok(Shape::of(&config))
}

/// The preflight of an RL learner (the teacher's and the student's `config.json` only): the
/// rows per backward pass and per sampling pass to use (those the plan gives when non-zero),
/// or the error naming the fields to change. Unknown device memory is logged and let through
/// with the plan's rows as they are (0: whole groups).
pub fn check_learner(
    teacher_dir: &std::path::Path,
    student_dir: &std::path::Path,
    plan: &LearnerPlan,
    checkpoint_interval: u32,
    device: tch::Device,
) -> Result<(usize, usize)> {
    let (teacher, student) = (shape_of(teacher_dir)?, shape_of(student_dir)?);
    // The replay buffer is host memory, checked after the device (on a CPU learner the two
    // share one memory, which this does not add up).
    let replay = || match host_memory() {
        Some(host) => replay_preflight(&teacher, checkpoint_interval, host).map_err(|m| anyhow!(m)),
        None => Ok(()),
    };
    let Some(available) = available(device, 1) else {
        tracing::warn!(
            "device memory unknown (set RLT_DEVICE_MEMORY_GIB); learner memory preflight skipped"
        );
        replay()?;
        return Ok((plan.micro_batch as usize, plan.generation_batch as usize));
    };
    let p = learner_preflight(&teacher, &student, plan, available).map_err(|m| anyhow!(m))?;
    replay()?;
    let need = learner_estimate(&teacher, &student, &p);
    tracing::info!(
        need_gib = format!("{:.1}", need.total() / GIB),
        available_gib = format!("{:.1}", available / GIB),
        rows_per_backward = p.micro_batch,
        rows_per_sampling = p.generation_batch,
        "learner memory preflight: fits ({})",
        breakdown(&need)
    );
    Ok((p.micro_batch as usize, p.generation_batch as usize))
}

/// A learner's f32 gradients of the steps since the parameter servers' last checkpoint (and
/// the step being pushed), kept to replay to a server that restarts from it.
pub fn replay_bytes(teacher: &Shape, checkpoint_interval: u32) -> f64 {
    4.0 * teacher.params * f64::from(checkpoint_interval + 1)
}

/// Whether a learner's replay buffer fits its host memory; if not, the interval that would.
pub fn replay_preflight(
    teacher: &Shape,
    checkpoint_interval: u32,
    host: f64,
) -> Result<(), String> {
    let fits = |k| replay_bytes(teacher, k) + OVERHEAD <= host;
    if fits(checkpoint_interval) {
        return Ok(());
    }
    let fix = (1..checkpoint_interval)
        .rev()
        .find(|&k| fits(k))
        .map_or(String::new(), |k| {
            format!("lower rl.checkpointInterval to {k}, or ")
        });
    Err(format!(
        "memory preflight: an RL learner keeps its f32 gradients of the last {} steps to replay \
         to a restarted parameter server, about {:.1} GiB of host memory for a \
         {:.1}B-parameter teacher ({:.1} GiB available); {fix}raise rl.learnerResources' \
         memory",
        checkpoint_interval + 1,
        (replay_bytes(teacher, checkpoint_interval) + OVERHEAD) / GIB,
        teacher.params / 1e9,
        host / GIB,
    ))
}

/// The preflight of a parameter server (host memory): its share of the model's state, or
/// the error naming the fields to change.
pub fn check_server(model_dir: &std::path::Path, servers: u32, learners: u32) -> Result<()> {
    let shape = shape_of(model_dir)?;
    let Some(available) = available(tch::Device::Cpu, 1) else {
        return Ok(());
    };
    let need = server_bytes(&shape, servers, learners) + OVERHEAD;
    if need <= available {
        tracing::info!(
            need_gib = format!("{:.1}", need / GIB),
            available_gib = format!("{:.1}", available / GIB),
            "parameter server memory preflight: fits"
        );
        return Ok(());
    }
    let more =
        (servers + 1..=1024).find(|&k| server_bytes(&shape, k, learners) + OVERHEAD <= available);
    Err(anyhow!(
        "memory preflight: a parameter server needs about {:.1} GiB ({:.1} GiB available) for \
         its 1/{servers} of a {:.1}B-parameter model with {learners} learners (f32 weights, \
         AdamW moments, the reference, pending gradients, pull buffers); {}raise \
         rl.paramServerResources' memory",
        need / GIB,
        available / GIB,
        shape.params / 1e9,
        more.map_or(String::new(), |k| format!(
            "raise rl.paramServers to {k}, or "
        )),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(name: &str) -> Shape {
        Shape::of(&qwen2_shape(name).unwrap())
    }

    #[test]
    fn parameter_counts_are_the_published_models() {
        // Qwen2.5-0.5B: 0.49B, 1.5B: 1.54B, 7B: 7.62B, 32B: 32.76B.
        for (name, want) in [
            ("0.5B", 0.494),
            ("1.5B", 1.544),
            ("7B", 7.616),
            ("32B", 32.764),
        ] {
            let got = shape(name).params / 1e9;
            assert!((got - want).abs() < 0.01, "{name}: {got}");
        }
    }

    #[test]
    fn a_full_fp32_fine_tune_of_7b_needs_what_the_issue_says_before_activations() {
        // "a full fine-tune of 7B parameters with AdamW in fp32 needs about 112 GB before
        // activations": weights, gradients and two moments, 16 bytes per parameter (plus our
        // f32 accumulator).
        let e = estimate(
            &shape("7B"),
            &Plan {
                ranks: 1,
                dtype_bytes: 4,
                max_length: 16,
                micro_batch: 1,
                checkpointing: true,
            },
        );
        let states = e.weights + e.gradients + e.optimizer;
        assert!(
            (states / 1e9 - 7.616 * 20.0).abs() < 1.0,
            "{}",
            states / 1e9
        );
    }

    #[test]
    fn sharding_and_checkpointing_shrink_what_they_should() {
        let s = shape("7B");
        let base = Plan {
            ranks: 1,
            dtype_bytes: 2,
            max_length: 16384,
            micro_batch: 1,
            checkpointing: false,
        };
        let (one, eight) = (
            estimate(&s, &base),
            estimate(&s, &Plan { ranks: 8, ..base }),
        );
        assert_eq!(
            one.weights, eight.weights,
            "weights are whole on every rank"
        );
        assert!((one.optimizer / eight.optimizer - 8.0).abs() < 1e-9);
        let ckpt = estimate(
            &s,
            &Plan {
                checkpointing: true,
                ..base
            },
        );
        assert!(ckpt.activations < one.activations / 5.0);
        assert!(ckpt.logits < one.logits / 10.0);
        assert_eq!(ckpt.optimizer, one.optimizer);
    }

    #[test]
    fn the_preflight_refuses_the_impossible_naming_the_fields_that_would_fix_it() {
        let stage = Stage {
            what: "warm-up".into(),
            section: "warmup",
            plan: Plan {
                ranks: 1,
                dtype_bytes: 2,
                max_length: 16384,
                micro_batch: 1,
                checkpointing: true,
            },
            ranks_per_pod: 1,
            rows_per_rank: 1,
        };
        let err = preflight(&shape("7B"), &stage, 80e9).unwrap_err();
        assert!(
            err.starts_with("memory preflight: warm-up needs about"),
            "{err}"
        );
        assert!(err.contains("raise warmup.replicas to"), "{err}");
        assert!(
            err.contains("with 1 rank and activation checkpointing"),
            "{err}"
        );
        // The suggested replicas do fit.
        let r: u32 = err
            .split("raise warmup.replicas to ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let fixed = Stage {
            plan: Plan {
                ranks: r,
                ..stage.plan
            },
            ..stage.clone()
        };
        assert!(preflight(&shape("7B"), &fixed, 80e9).is_ok());
        assert!(preflight(
            &shape("7B"),
            &Stage {
                plan: Plan {
                    ranks: r - 1,
                    ..stage.plan
                },
                ..stage.clone()
            },
            80e9
        )
        .is_err());
        // Without checkpointing, turning it on is the first thing said.
        let off = Stage {
            plan: Plan {
                ranks: 8,
                checkpointing: false,
                ..stage.plan
            },
            ..stage
        };
        let err = preflight(&shape("7B"), &off, 80e9).unwrap_err();
        assert!(
            err.contains("set warmup.activationCheckpointing: true"),
            "{err}"
        );
        // Small models fit one GPU.
        let small = Stage {
            plan: Plan {
                ranks: 1,
                ..off.plan
            },
            ..off
        };
        assert!(preflight(
            &shape("0.5B"),
            &Stage {
                plan: Plan {
                    max_length: 4096,
                    checkpointing: true,
                    ..small.plan
                },
                ..small
            },
            80e9
        )
        .is_ok());
    }

    fn paper_learner(checkpointing: bool) -> LearnerPlan {
        LearnerPlan {
            dtype_bytes: 2,
            group_size: 64,
            prompt: 1024,
            max_new_tokens: 16384,
            micro_batch: 0,
            generation_batch: 0,
            checkpointing,
        }
    }

    #[test]
    fn a_7b_learner_at_the_papers_length_fits_80gb_only_with_checkpointing() {
        let s = shape("7B");
        let gpu = 79.6 * GIB;
        let p = learner_preflight(&s, &s, &paper_learner(true), gpu).unwrap();
        // Not the whole group of 64 at once: its KV cache alone would be ~63 GiB.
        assert!(p.micro_batch >= 1 && p.micro_batch < 64, "{p:?}");
        assert!(p.generation_batch >= 1 && p.generation_batch < 64, "{p:?}");
        assert!(learner_estimate(&s, &s, &p).total() <= gpu);
        let more = LearnerPlan {
            micro_batch: p.micro_batch + 1,
            ..p
        };
        assert!(
            learner_estimate(&s, &s, &more).total() > gpu || p.micro_batch == 64,
            "the preflight takes the most rows that fit"
        );
        let err = learner_preflight(&s, &s, &paper_learner(false), gpu).unwrap_err();
        assert!(
            err.contains("set rl.activationCheckpointing: true"),
            "{err}"
        );
        // A 32B student beside a 7B teacher: its weights alone leave no room.
        let err = learner_preflight(&s, &shape("32B"), &paper_learner(true), gpu).unwrap_err();
        assert!(err.contains("use GPUs with more memory"), "{err}");
        // Rows fixed by hand are kept, or refused when they do not fit.
        let by_hand = |micro_batch, generation_batch| LearnerPlan {
            micro_batch,
            generation_batch,
            ..paper_learner(true)
        };
        let fixed = learner_preflight(&s, &s, &by_hand(1, 2), gpu).unwrap();
        assert_eq!((fixed.micro_batch, fixed.generation_batch), (1, 2));
        let err = learner_preflight(&s, &s, &by_hand(64, 64), gpu).unwrap_err();
        assert!(err.contains("--micro-batch"), "{err}");
    }

    #[test]
    fn a_learners_replay_buffer_is_checked_against_its_host_memory() {
        let s = shape("7B");
        // 11 steps of 7B f32 gradients (interval 10) are ~312 GiB; 200 GiB holds 6.
        let err = replay_preflight(&s, 10, 200.0 * GIB).unwrap_err();
        assert!(err.contains("lower rl.checkpointInterval to 5"), "{err}");
        assert!(replay_preflight(&s, 2, 200.0 * GIB).is_ok());
    }

    #[test]
    fn a_shorter_explanation_is_the_fix_when_checkpointing_is_not_enough() {
        let s = shape("1.5B");
        let plan = LearnerPlan {
            dtype_bytes: 4,
            ..paper_learner(true)
        };
        let need = learner_estimate(&s, &s, &plan).total();
        let err = learner_preflight(&s, &s, &plan, need - GIB).unwrap_err();
        assert!(err.contains("lower rl.maxNewTokens to"), "{err}");
    }

    #[test]
    fn the_readme_table_is_this_code_s() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table = table(&README_LENGTHS, &README_RANKS);
        assert!(
            readme.contains(&table),
            "README.md's memory table is stale; `rlt-trainer memory` prints it:\n{table}"
        );
        let rl = rl_table(&README_LENGTHS);
        assert!(
            readme.contains(&rl),
            "README.md's RL memory table is stale; `rlt-trainer memory` prints it:\n{rl}"
        );
    }
}
