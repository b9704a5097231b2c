//! What a fine-tune (warm-up, a student's distillation) needs per device, from the model's
//! shape and the stage's settings, as this trainer lays it out:
//!
//! - weights and their gradients in the training dtype, whole on every rank;
//! - f32 master weights (bf16 training only), AdamW's two f32 moments and the f32 gradient
//!   accumulator, each a 1/W share per rank ([`crate::train::data_parallel`]);
//! - activations of one micro-batch: every decoder layer's saved tensors, or with activation
//!   checkpointing only each layer's input plus one layer recomputed at a time, and the logits
//!   (over chunks of [`crate::model::qwen2::LOGIT_CHUNK`] tokens when checkpointing);
//! - a fixed allowance for the CUDA context and the allocator's fragmentation.
//!
//! [`preflight`] runs at the start of the stage, before anything is loaded: a stage that
//! cannot fit stops with the spec fields to change. [`table`] is the README's table. The RL
//! stage has its own arithmetic: [`learner_estimate`] (three whole models, sampling and
//! backward passes over a few rows of a group) and [`server_bytes`] (one shard's state).
use crate::model::config::{qwen2_shapes, Qwen2Config};
use anyhow::{anyhow, Result};
use std::fmt::Write as _;

pub const GIB: f64 = (1u64 << 30) as f64;
/// What `nvidia-smi` reports for an 80 GB H100 (81559 MiB).
pub const H100_80GB: f64 = 81559.0 * (1u64 << 20) as f64;
/// CUDA context, cuBLAS workspaces.
const OVERHEAD: f64 = 2.5 * GIB;
/// On top of everything counted: what the caching allocator loses to fragmentation with
/// expandable segments (the CUDA image turns them on), and shapes this arithmetic rounds.
pub const MARGIN: f64 = 0.05;

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

/// Bytes per device, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Estimate {
    pub weights: f64,
    pub gradients: f64,
    /// Optimizer state, f32 master weights and gradient sums.
    pub optimizer: f64,
    pub activations: f64,
    pub logits: f64,
    /// Tensors that live for one operation at a time: grouped-query attention's keys and
    /// values repeated to the query heads, explicit attention masks.
    pub transients: f64,
}

impl Estimate {
    /// What is counted, the fixed overhead, and the [`MARGIN`] over both.
    pub fn total(&self) -> f64 {
        (self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.transients
            + OVERHEAD)
            * (1.0 + MARGIN)
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
        // Right-padded batches need no mask (the fused causal kernel).
        transients: 0.0,
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
/// or of one chunk of [`crate::model::qwen2::LOGIT_CHUNK`] tokens when checkpointing.
fn logits(s: &Shape, tokens: f64, b: f64, checkpointing: bool) -> f64 {
    let logit_tokens = if checkpointing {
        tokens.min(crate::model::qwen2::LOGIT_CHUNK as f64)
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
        cfg: &crate::train::sft::SftConfig,
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
        "weights {:.1}, gradients {:.1}, optimizer {:.1}, activations {:.1}, logits {:.1}, \
         transients {:.1} GiB, {:.0}% margin",
        e.weights / GIB,
        e.gradients / GIB,
        e.optimizer / GIB,
        e.activations / GIB,
        e.logits / GIB,
        e.transients / GIB,
        MARGIN * 100.0
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
    /// GPUs the learner's models are spread over: 1, or 2 (the reference and the student on
    /// the second: `rl::learner::Placement`).
    pub devices: u32,
}

impl LearnerPlan {
    /// The longest sequence a pass sees.
    pub fn sequence(&self) -> u32 {
        self.prompt + self.max_new_tokens
    }
}

/// The fuller of a learner's devices. The policy's device holds the teacher, its gradient and
/// (bf16) the gradient's f32 sums (`rl::rollout::GradSum`); per group it first
/// samples (a KV cache of `generation_batch` rows, and each decoding step repeats one layer's
/// cached keys and values to the query heads), then scores and backpropagates `micro_batch`
/// rows at a time over left-padded sequences with an explicit attention mask; sampling and the
/// backward pass never hold memory at once. With the whole group in one pass and no
/// checkpointing the graph is built while the student scores. The reference and the student
/// are on the policy's device too, or alone on a second GPU.
pub fn learner_estimate(teacher: &Shape, student: &Shape, p: &LearnerPlan) -> Estimate {
    let b = f64::from(p.dtype_bytes);
    let seq = f64::from(p.sequence());
    let gen_rows = f64::from(p.generation_batch.max(1));
    let rows = f64::from(p.micro_batch.max(1));
    let kv_cache = gen_rows * seq * teacher.layers * 2.0 * teacher.kv_dim * b;
    let gqa_copy = gen_rows * seq * 2.0 * teacher.q_dim * b;
    // [rows, 1, seq, seq] booleans, and the two it is made of.
    let mask = 3.0 * rows * seq * seq;
    let tokens = rows * seq;
    let backward = activations(teacher, tokens, b, p.checkpointing);
    // A pass without a graph holds about one layer's tensors at a time.
    let scoring = student
        .layer_elements_per_token()
        .max(teacher.layer_elements_per_token())
        * tokens
        * b;
    let whole_group = !p.checkpointing && p.micro_batch >= p.group_size;
    let split = p.devices > 1;
    let policy = Estimate {
        weights: if split {
            teacher.params * b
        } else {
            (2.0 * teacher.params + student.params) * b
        },
        gradients: teacher.params * b,
        optimizer: if p.dtype_bytes < 4 {
            4.0 * teacher.params
        } else {
            0.0
        },
        activations: if whole_group {
            kv_cache.max(backward + scoring)
        } else {
            kv_cache.max(backward).max(scoring)
        },
        logits: logits(teacher, tokens, b, p.checkpointing),
        transients: gqa_copy.max(mask),
    };
    if !split {
        return policy;
    }
    let scorers = Estimate {
        weights: (teacher.params + student.params) * b,
        activations: scoring,
        logits: logits(student, tokens, b, true),
        transients: mask,
        ..Estimate::default()
    };
    if scorers.total() > policy.total() {
        scorers
    } else {
        policy
    }
}

/// Distillation collection: the teacher samples `rows` explanations of up to `new_tokens`
/// after prompts of up to `prompt` tokens, without a graph: its weights, the KV cache, the
/// prefill's largest layer and last-position logits, one layer's keys and values repeated
/// to the query heads, and the prefill's attention mask over the left-padded prompts.
pub fn collection_estimate(
    teacher: &Shape,
    dtype_bytes: u32,
    rows: u32,
    prompt: u32,
    new_tokens: u32,
) -> Estimate {
    let b = f64::from(dtype_bytes);
    let (r, p) = (f64::from(rows.max(1)), f64::from(prompt));
    let seq = p + f64::from(new_tokens);
    Estimate {
        weights: teacher.params * b,
        activations: (r * seq * teacher.layers * 2.0 * teacher.kv_dim * b)
            + r * p * teacher.layer_elements_per_token() * b,
        logits: r * teacher.vocab * (b + 8.0),
        transients: (r * seq * 2.0 * teacher.q_dim * b).max(3.0 * r * p * p),
        ..Estimate::default()
    }
}

/// The most rows (up to `wanted`) a collection pass fits in `available`; `None` when not
/// even one does.
pub fn collection_rows(
    teacher: &Shape,
    dtype_bytes: u32,
    wanted: u32,
    prompt: u32,
    new_tokens: u32,
    available: f64,
) -> Option<u32> {
    (1..=wanted.max(1)).rev().find(|&r| {
        collection_estimate(teacher, dtype_bytes, r, prompt, new_tokens).total() <= available
    })
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
    if plan.devices < 2 && fits(LearnerPlan { devices: 2, ..one }) {
        fixes.push(
            "give each learner two GPUs (rl.learnerResources: nvidia.com/gpu: 2; the reference \
             and the student move to the second)"
                .to_string(),
        );
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
             student whole, on two GPUs at most ({:.1} GiB of weights and gradients on the \
             fuller one), so use GPUs with more memory",
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
/// moments, the GRPO reference (in the learners' dtype, `learner_bytes` per element), one
/// pending f32 gradient per learner and their average, and the encoded weights and reference
/// the learners' pulls share (in their dtype).
pub fn server_bytes(s: &Shape, servers: u32, learners: u32, learner_bytes: u32) -> f64 {
    let (l, b) = (f64::from(learners.max(1)), f64::from(learner_bytes));
    (4.0 + 8.0 + b + 4.0 * l + 4.0 + 2.0 * b) * s.params / f64::from(servers.max(1))
}

/// The RL part of the README's table: per model (teacher and student of the same shape), bf16
/// learners on an 80 GB GPU at the paper's group of 64 and `max_new_tokens`, prompts of
/// [`README_RL_PROMPT`] tokens, and the host memory of 4 parameter servers for 4 learners.
pub fn rl_table(max_new_tokens: &[u32]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| model | maxNewTokens | learner GiB on 1 GPU (checkpointing, 1 row per pass) | on 2 GPUs (fuller one) | rows per pass on 1 × 80 GB (backward / sampling) | on 2 × 80 GB | parameter server GiB (4 servers, 4 learners) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let gib = |bytes: f64| {
        format!(
            "{:.1}{}",
            bytes / GIB,
            if bytes <= H100_80GB { "" } else { " ✗" }
        )
    };
    for (name, config) in qwen2_shapes() {
        let shape = Shape::of(&config);
        for &n in max_new_tokens {
            let plan = |devices| LearnerPlan {
                dtype_bytes: 2,
                group_size: 64,
                prompt: README_RL_PROMPT,
                max_new_tokens: n,
                micro_batch: 1,
                generation_batch: 1,
                checkpointing: true,
                devices,
            };
            let one = |devices| learner_estimate(&shape, &shape, &plan(devices)).total();
            let passes = |devices| {
                let choose = LearnerPlan {
                    micro_batch: 0,
                    generation_batch: 0,
                    ..plan(devices)
                };
                learner_passes(&shape, &shape, &choose, H100_80GB)
                    .map_or("does not fit".to_string(), |p| {
                        format!("{} / {}", p.micro_batch, p.generation_batch)
                    })
            };
            let _ = writeln!(
                out,
                "| {name} | {n} | {} | {} | {} | {} | {:.1} |",
                gib(one(1)),
                gib(one(2)),
                passes(1),
                passes(2),
                server_bytes(&shape, 4, 4, 2) / GIB
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

/// What the preflight settles for a fine-tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Whether each rank keeps f32 sums of the whole model's gradients over an update's
    /// micro-batches ([`crate::train::sft::SftConfig::local_sums`]).
    pub local_sums: bool,
}

/// The preflight of a fine-tune of the model in `model_dir` (its `config.json` only): the
/// gradient accumulation to use (more micro-batches than `grad_accum` when a rank's whole
/// share of the batch would not fit at once) and whether the local f32 sums fit beside it,
/// or the error naming the fields to change. Unknown device memory is logged and let through
/// with `grad_accum` as it is and no local sums.
pub fn check_stage(
    model_dir: &std::path::Path,
    stage: &Stage,
    grad_accum: usize,
    device: tch::Device,
) -> Result<Fit> {
    let shape = shape_of(model_dir)?;
    let Some(available) = available(device, stage.ranks_per_pod) else {
        tracing::warn!(stage = %stage.what, "device memory unknown (set RLT_DEVICE_MEMORY_GIB); memory preflight skipped");
        return Ok(Fit {
            grad_accum,
            local_sums: false,
        });
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
    // Local sums only pay where there are peers to reduce with and micro-batches to sum.
    let with_sums = Estimate {
        optimizer: need.optimizer + 4.0 * shape.params,
        ..need
    };
    let local_sums = stage.plan.ranks > 1 && g > 1 && with_sums.total() <= available;
    tracing::info!(
        stage = %stage.what,
        need_gib = format!("{:.1}", need.total() / GIB),
        available_gib = format!("{:.1}", available / GIB),
        micro_batches = g,
        local_sums,
        "memory preflight: fits ({})",
        breakdown(&need)
    );
    Ok(Fit {
        grad_accum: g as usize,
        local_sums,
    })
}

pub fn shape_of(model_dir: &std::path::Path) -> Result<Shape> {
    let config = Qwen2Config::from_file(&model_dir.join(crate::model::checkpoint::CONFIG_FILE))?;
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

/// The preflight of a distillation collection with the teacher in `teacher_dir` (its
/// `config.json` only): the rows per generation pass (at most `wanted`) that fit the device,
/// or the error naming the fields to change. Unknown device memory is logged and `wanted`
/// kept.
pub fn check_collection(
    teacher_dir: &std::path::Path,
    dtype_bytes: u32,
    wanted: usize,
    prompt: u32,
    new_tokens: u32,
    device: tch::Device,
) -> Result<usize> {
    let teacher = shape_of(teacher_dir)?;
    let Some(available) = available(device, 1) else {
        tracing::warn!(
            "device memory unknown (set RLT_DEVICE_MEMORY_GIB); collection preflight skipped"
        );
        return Ok(wanted);
    };
    let fit = collection_rows(
        &teacher,
        dtype_bytes,
        wanted as u32,
        prompt,
        new_tokens,
        available,
    );
    let one = collection_estimate(&teacher, dtype_bytes, 1, prompt, new_tokens);
    let Some(rows) = fit else {
        return Err(anyhow!(
            "memory preflight: the teacher writing one explanation of up to {new_tokens} tokens \
             after a {prompt}-token prompt needs about {:.1} GiB ({:.1} GiB available) for a \
             {:.1}B-parameter teacher: {}; lower distillation.traceSplitting.maxTokensPerTrace, \
             or use GPUs with more memory",
            one.total() / GIB,
            available / GIB,
            teacher.params / 1e9,
            breakdown(&one),
        ));
    };
    let need = collection_estimate(&teacher, dtype_bytes, rows, prompt, new_tokens);
    tracing::info!(
        rows_per_pass = rows,
        need_gib = format!("{:.1}", need.total() / GIB),
        available_gib = format!("{:.1}", available / GIB),
        "collection memory preflight: fits ({})",
        breakdown(&need)
    );
    Ok(rows as usize)
}

/// Bytes a fine-tune of a model of `shape` writes into the workspace at its peak: the
/// checkpoints it keeps while training (`keep`, and one more being written before the oldest
/// goes), each the model in its dtype and the optimizer state (f32 moments, and f32 master
/// weights in bf16), then its final model.
pub fn sft_disk_bytes(shape: &Shape, dtype_bytes: u32, keep: u32) -> f64 {
    let b = f64::from(dtype_bytes);
    let masters = if dtype_bytes < 4 { 4.0 } else { 0.0 };
    let checkpoint = (b + masters + 8.0) * shape.params;
    f64::from(keep.max(1) + 1) * checkpoint + b * shape.params
}

/// Bytes the RL stage writes at its peak, over all parameter servers: the newest version
/// every shard holds, the one after it and the one being written (f32 weights and moments,
/// the reference in the learners' dtype), then the final teacher.
pub fn rl_disk_bytes(shape: &Shape, learner_bytes: u32) -> f64 {
    let b = f64::from(learner_bytes);
    3.0 * (4.0 + 8.0 + b) * shape.params + b * shape.params
}

/// Free bytes of the filesystem holding `dir` (or its nearest existing parent).
pub fn free_bytes(dir: &std::path::Path) -> Option<f64> {
    let mut at = dir;
    while !at.exists() {
        at = at.parent()?;
    }
    let path = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `path` is a valid C string, `stat` a plain struct statvfs fills in.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as f64 * stat.f_frsize as f64)
}

/// The disk preflight of a stage that will write about `need` bytes under `dir` (`what`, as
/// users read it): refused, naming the fields, when the workspace has less free space.
pub fn check_disk(dir: &std::path::Path, need: f64, what: &str) -> Result<()> {
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    if need <= free {
        tracing::info!(
            need_gib = format!("{:.1}", need / GIB),
            free_gib = format!("{:.1}", free / GIB),
            "disk preflight: fits"
        );
        return Ok(());
    }
    Err(anyhow!(
        "disk preflight: {what} writes about {:.1} GiB into the workspace at its peak, and \
         {:.1} GiB are free in {}; raise spec.workspace.size (or free space in the claim: \
         earlier runs' directories, checkpoints kept by spec.workspace.keepCheckpoints)",
        need / GIB,
        free / GIB,
        dir.display()
    ))
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
pub fn check_server(
    model_dir: &std::path::Path,
    servers: u32,
    learners: u32,
    learner_bytes: u32,
) -> Result<()> {
    let shape = shape_of(model_dir)?;
    let Some(available) = available(tch::Device::Cpu, 1) else {
        return Ok(());
    };
    let need = server_bytes(&shape, servers, learners, learner_bytes) + OVERHEAD;
    if need <= available {
        tracing::info!(
            need_gib = format!("{:.1}", need / GIB),
            available_gib = format!("{:.1}", available / GIB),
            "parameter server memory preflight: fits"
        );
        return Ok(());
    }
    let more = (servers + 1..=1024)
        .find(|&k| server_bytes(&shape, k, learners, learner_bytes) + OVERHEAD <= available);
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
    use crate::model::config::qwen2_shape;

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
            devices: 1,
        }
    }

    #[test]
    fn a_7b_learner_at_the_papers_length_needs_two_80gb_gpus_and_checkpointing() {
        let s = shape("7B");
        let gpu = 79.6 * GIB;
        // One GPU: the three bf16 models, the gradient and its f32 sums (76 GiB) leave no room.
        let err = learner_preflight(&s, &s, &paper_learner(true), gpu).unwrap_err();
        assert!(err.contains("nvidia.com/gpu: 2"), "{err}");
        let two = LearnerPlan {
            devices: 2,
            ..paper_learner(true)
        };
        let p = learner_preflight(&s, &s, &two, gpu).unwrap();
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
        let err = learner_preflight(
            &s,
            &s,
            &LearnerPlan {
                checkpointing: false,
                ..two
            },
            gpu,
        )
        .unwrap_err();
        assert!(
            err.contains("set rl.activationCheckpointing: true"),
            "{err}"
        );
        // A 32B student beside a 7B teacher: its weights alone leave no room.
        let err = learner_preflight(&s, &shape("32B"), &two, gpu).unwrap_err();
        assert!(err.contains("use GPUs with more memory"), "{err}");
        // Rows fixed by hand are kept, or refused when they do not fit.
        let by_hand = |micro_batch, generation_batch| LearnerPlan {
            micro_batch,
            generation_batch,
            ..two
        };
        let fixed = learner_preflight(&s, &s, &by_hand(1, 2), gpu).unwrap();
        assert_eq!((fixed.micro_batch, fixed.generation_batch), (1, 2));
        let err = learner_preflight(&s, &s, &by_hand(64, 64), gpu).unwrap_err();
        assert!(err.contains("--micro-batch"), "{err}");
    }

    #[test]
    fn the_learners_transients_and_gradient_sums_are_counted() {
        let s = shape("7B");
        let p = LearnerPlan {
            micro_batch: 1,
            generation_batch: 20,
            devices: 2,
            ..paper_learner(true)
        };
        let e = learner_estimate(&s, &s, &p);
        // bf16: the gradient's f32 sums, 4 bytes per parameter.
        assert!((e.optimizer - 4.0 * s.params).abs() < 1.0, "{e:?}");
        // 20 rows decoding at 17k tokens repeat one layer's cached K/V to the 28 query heads:
        // 20 x 17408 x 2 x 3584 x 2 bytes, ~4.6 GiB.
        assert!(
            (e.transients / GIB - 4.65).abs() < 0.1,
            "{}",
            e.transients / GIB
        );
        let f32 = learner_estimate(
            &s,
            &s,
            &LearnerPlan {
                dtype_bytes: 4,
                ..p
            },
        );
        assert_eq!(f32.optimizer, 0.0, "an f32 .grad sums in f32 already");
    }

    #[test]
    fn collection_passes_shrink_to_fit_the_device() {
        let s = shape("7B");
        let gpu = 79.6 * GIB;
        // 96 rows of 16k new tokens: ~93 GiB of K/V alone.
        let all = collection_estimate(&s, 2, 96, 1024, 16384);
        assert!(all.total() > gpu, "{}", all.total() / GIB);
        let rows = collection_rows(&s, 2, 96, 1024, 16384, gpu).unwrap();
        assert!(rows > 1 && rows < 96, "{rows}");
        assert!(collection_estimate(&s, 2, rows, 1024, 16384).total() <= gpu);
        assert!(collection_estimate(&s, 2, rows + 1, 1024, 16384).total() > gpu);
        assert_eq!(collection_rows(&s, 2, 96, 1024, 16384, 10.0 * GIB), None);
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
