//! A learner: pulls the teacher's weights from the parameter servers, runs its slice of each
//! step's groups (sample, score with the frozen student, GRPO gradient), pushes the gradients
//! and waits for the next version. Learner 0 writes the final teacher checkpoint.
//!
//! [`LocalRun`] is the same computation in one process with one optimizer over all
//! parameters: the baseline the distributed run must reproduce, and a quick way to train.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::client::ShardClients;
use super::grpo::{ref_sync_due, GrpoConfig};
use super::rollout::{
    learner_slice, load_weights_into, run_group, zero_gradients, GradSum, GroupPrompt, PhaseTimes,
    RolloutConfig, SpecialIds, StepContribution,
};
use super::shard::{RlOptimizer, ShardState};
use super::wire::pb;
use crate::data::{Example, Prompts};
use crate::engine::sampling::SplitMix64;
use crate::model::checkpoint::{save_checkpoint, CausalLm};
use crate::model::tokenizer::Tokenizer;
use crate::train::optim::{clip_coefficient, squared_norm};

/// The three models a learner holds: the policy (trained), its GRPO reference, the frozen
/// student; and the shared tokenizer.
pub struct Models {
    pub teacher: CausalLm,
    pub reference: CausalLm,
    pub student: CausalLm,
    pub tokenizer: Tokenizer,
}

/// Which device holds which of a learner's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The policy: sampled from, trained (its gradient and f32 gradient sums live here too).
    pub policy: Device,
    /// The reference and the student, which only score (no graph).
    pub scorers: Device,
}

impl Placement {
    /// Everything on the learner's device, or, when the process sees a second GPU after it
    /// (a learner pod requesting two), the reference and the student on that one: at 7B the
    /// three models, the gradient and its f32 sums do not fit one 80 GB GPU.
    pub fn of(device: Device) -> Self {
        let scorers = match device {
            Device::Cuda(i) if (tch::Cuda::device_count().max(0) as usize) > i + 1 => {
                Device::Cuda(i + 1)
            }
            d => d,
        };
        Placement {
            policy: device,
            scorers,
        }
    }

    /// GPUs the models are spread over (1 or 2).
    pub fn devices(&self) -> u32 {
        if self.policy == self.scorers {
            1
        } else {
            2
        }
    }
}

impl From<Device> for Placement {
    /// Everything on one device.
    fn from(device: Device) -> Self {
        Placement {
            policy: device,
            scorers: device,
        }
    }
}

impl Models {
    /// Loads the teacher (twice: policy and reference) and the student. The RLT reward splices
    /// the teacher's token ids into the student's chat, so both must share one tokenizer.
    pub fn load(
        teacher_dir: &Path,
        student_dir: &Path,
        placement: impl Into<Placement>,
        kind: Kind,
    ) -> Result<Self> {
        let placement = placement.into();
        let tokenizer = Tokenizer::from_dir(teacher_dir)
            .with_context(|| format!("teacher tokenizer in {}", teacher_dir.display()))?;
        let student_tok = Tokenizer::from_dir(student_dir)
            .with_context(|| format!("student tokenizer in {}", student_dir.display()))?;
        if !tokenizer.same_vocab(&student_tok) {
            bail!(
                "the student's tokenizer ({}, {} tokens) differs from the teacher's ({}, {} tokens); the RLT reward \
                 scores the teacher's explanation tokens under the student, so both need the same tokenizer",
                student_dir.display(),
                student_tok.vocab_size(),
                teacher_dir.display(),
                tokenizer.vocab_size()
            );
        }
        let teacher = CausalLm::load(teacher_dir, placement.policy, kind)
            .with_context(|| format!("loading teacher {}", teacher_dir.display()))?;
        let reference = CausalLm::load(teacher_dir, placement.scorers, kind)?;
        let student = CausalLm::load(student_dir, placement.scorers, kind)
            .with_context(|| format!("loading student {}", student_dir.display()))?;
        tokenizer.check_fits(teacher.config.vocab_size)?;
        tokenizer.check_fits(student.config.vocab_size)?;
        Ok(Models {
            teacher,
            reference,
            student,
            tokenizer,
        })
    }

    pub fn special_ids(&self) -> Result<SpecialIds> {
        SpecialIds::of(&self.tokenizer)
    }

    /// The token pieces of one (question, solution).
    pub fn group_prompt(&self, prompts: &Prompts, e: &Example) -> Result<GroupPrompt> {
        GroupPrompt::new(&self.tokenizer, prompts, e)
    }

    /// Names and shapes of the teacher's parameters.
    pub fn param_shapes(&self) -> BTreeMap<String, Vec<i64>> {
        self.teacher
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect()
    }
}

/// The groups of one step: `groups_per_step` example indices, drawn without replacement from a
/// per-epoch shuffle of the dataset (seeded), so every learner computes the same list.
pub fn step_examples(
    n_examples: usize,
    step: u64,
    groups_per_step: usize,
    seed: u64,
) -> Vec<usize> {
    assert!(n_examples > 0);
    let mut out = Vec::with_capacity(groups_per_step);
    let start = step as usize * groups_per_step;
    let mut cached: Option<(usize, Vec<usize>)> = None;
    for k in start..start + groups_per_step {
        let (epoch, pos) = (k / n_examples, k % n_examples);
        if cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut perm: Vec<usize> = (0..n_examples).collect();
            let mut rng =
                SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.below(i as u64 + 1) as usize);
            }
            cached = Some((epoch, perm));
        }
        out.push(cached.as_ref().unwrap().1[pos]);
    }
    out
}

/// Runs `learner`'s slice of a step and returns the gradient sums and statistics.
pub fn compute_step(
    models: &Models,
    prompts: &[GroupPrompt],
    ids: &SpecialIds,
    cfg: &RolloutConfig,
    step: u64,
    groups_per_step: usize,
    (learner, learners): (usize, usize),
) -> Result<(BTreeMap<String, Tensor>, StepContribution)> {
    let examples = step_examples(prompts.len(), step, groups_per_step, cfg.seed);
    let mut contrib = StepContribution::default();
    zero_gradients(&models.teacher);
    let sums = GradSum::new(&models.teacher);
    for j in learner_slice(groups_per_step, learner, learners) {
        run_group(
            &models.teacher,
            &models.reference,
            &models.student,
            &models.tokenizer,
            &prompts[examples[j]],
            ids,
            cfg,
            step,
            j,
            &sums,
            &mut contrib,
        )?;
    }
    let grads = sums.take(&models.teacher);
    zero_gradients(&models.teacher);
    Ok((grads, contrib))
}

/// Per-step figures a learner logs and the benchmark prints.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub step: u64,
    pub mean_reward: f64,
    pub times: PhaseTimes,
    pub communication: f64,
    pub bytes_pushed: u64,
    pub bytes_pulled: u64,
    pub total: f64,
}

/// Everything a learner process needs.
pub struct LearnerConfig {
    pub param_servers: Vec<String>,
    pub learner: usize,
    pub learners: usize,
    pub groups_per_step: usize,
    pub rollout: RolloutConfig,
    pub retry_for: Duration,
    /// Where learner 0 writes the final teacher (HF checkpoint); None = don't.
    pub final_dir: Option<PathBuf>,
    /// Once the final teacher is written: the RL stage's directory and the shard checkpoints
    /// each server keeps (`spec.workspace.keepCheckpoints`); the rest are deleted.
    pub prune_after_final: Option<(rlt_api::layout::StageDir, usize)>,
}

/// Runs a learner until the servers' last step, then tells them it is done.
/// `on_step` sees each finished step (for logs and the benchmark).
pub async fn run_learner(
    models: &Models,
    examples: &[Example],
    prompts_cfg: &Prompts,
    cfg: &LearnerConfig,
    mut on_step: impl FnMut(&StepReport),
) -> Result<()> {
    if examples.is_empty() {
        bail!("the RL dataset has no examples");
    }
    if cfg.groups_per_step < cfg.learners {
        bail!(
            "{} groups per step cannot be split over {} learners",
            cfg.groups_per_step,
            cfg.learners
        );
    }
    let ids = models.special_ids()?;
    let prompts: Vec<GroupPrompt> = examples
        .iter()
        .map(|e| models.group_prompt(prompts_cfg, e))
        .collect::<Result<_>>()?;
    let mut clients = ShardClients::new(
        &cfg.param_servers,
        cfg.learner as u32,
        cfg.learners as u32,
        cfg.retry_for,
    )?;
    clients.weights_kind = models.teacher.kind();
    let topo = clients.hello().await?;
    let mine = models.param_shapes();
    for (name, shape) in &mine {
        match topo.params.get(name) {
            None => bail!("the parameter servers hold no parameter {name:?} of the teacher model"),
            Some(s) if s != shape => bail!(
                "parameter {name:?} has shape {s:?} on the parameter servers but {shape:?} in the teacher model \
                 (servers started from a checkpoint of another shape?)"
            ),
            _ => {}
        }
    }
    if let Some(extra) = topo.params.keys().find(|n| !mine.contains_key(*n)) {
        bail!("the parameter servers hold {extra:?}, which the teacher model does not have");
    }
    // Join at the servers' current version (a restarted learner rejoins mid-run).
    let mut step = topo.version;
    let t = Instant::now();
    let pulled = clients.pull(step, true).await?;
    load_weights_into(&models.teacher, &pulled.policy)?;
    load_weights_into(&models.reference, pulled.reference.as_ref().unwrap())?;
    let mut ref_version = pulled.reference_version;
    tracing::info!(
        learner = cfg.learner,
        step,
        secs = t.elapsed().as_secs_f64(),
        "joined at the servers' version"
    );
    // Keep enough pushed gradients to replay a server back from its last checkpoint.
    let keep = topo.checkpoint_every + 1;
    while step < topo.total_steps {
        let started = Instant::now();
        let (grads, c) = compute_step(
            models,
            &prompts,
            &ids,
            &cfg.rollout,
            step,
            cfg.groups_per_step,
            (cfg.learner, cfg.learners),
        )?;
        let stats = pb::StepStats {
            reward_sum: c.reward_sum,
            solution_sum: c.solution_sum,
            kl_sum: c.kl_sum,
            samples: c.samples as u64,
            generated_tokens: c.generated_tokens as u64,
            loss_sum: c.loss_sum,
        };
        let comm = Instant::now();
        let need_ref = ref_sync_due(step + 1, &cfg.rollout.grpo);
        let (pushed, pulled) = clients
            .push_and_pull(
                step,
                &topo.owner,
                grads,
                c.groups as f64,
                stats,
                keep,
                need_ref,
            )
            .await?;
        let communication = comm.elapsed().as_secs_f64();
        load_weights_into(&models.teacher, &pulled.policy)?;
        if let Some(r) = &pulled.reference {
            load_weights_into(&models.reference, r)?;
        } else if pulled.reference_version != ref_version {
            // The servers re-synced the reference on a schedule this learner did not expect.
            let again = clients.pull(pulled.version, true).await?;
            load_weights_into(&models.reference, again.reference.as_ref().unwrap())?;
        }
        ref_version = pulled.reference_version;
        step = pulled.version;
        let report = StepReport {
            step,
            mean_reward: c.reward_sum / c.samples.max(1) as f64,
            times: c.times,
            communication,
            bytes_pushed: pushed,
            bytes_pulled: pulled.bytes,
            total: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            learner = cfg.learner,
            step,
            mean_reward = report.mean_reward,
            generation_s = c.times.generation,
            scoring_s = c.times.scoring,
            backward_s = c.times.backward,
            communication_s = communication,
            "step done"
        );
        on_step(&report);
    }
    if cfg.learner == 0 {
        if let Some(dir) = &cfg.final_dir {
            save_checkpoint(dir, &models.teacher, &models.tokenizer)
                .with_context(|| format!("writing the final teacher to {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "wrote the final teacher");
            if let Some((stage, keep)) = &cfg.prune_after_final {
                for shard in 0..cfg.param_servers.len() {
                    crate::train::sft::prune_checkpoints(&stage.shard(shard), *keep);
                }
            }
        }
    }
    clients.done().await
}

/// The whole RL run in one process: one learner over all groups, one AdamW over all
/// parameters (the same [`ShardState`] update the servers apply per shard, clipped by the
/// same norm of the whole gradient).
pub struct LocalRun {
    pub state: ShardState,
    pub optimizer: RlOptimizer,
    pub grpo: GrpoConfig,
}

impl LocalRun {
    pub fn new(models: &Models, optimizer: RlOptimizer, grpo: GrpoConfig) -> Result<Self> {
        let weights: BTreeMap<String, Tensor> = models
            .teacher
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(Kind::Float).to_device(Device::Cpu)))
            .collect();
        let names = weights.keys().cloned().collect();
        Ok(LocalRun {
            state: ShardState::fresh(names, &weights, optimizer.adamw, models.teacher.kind())?,
            optimizer,
            grpo,
        })
    }

    /// One step: gradients of all groups, averaged per group, applied; the models updated.
    pub fn step(
        &mut self,
        models: &Models,
        prompts: &[GroupPrompt],
        ids: &SpecialIds,
        cfg: &RolloutConfig,
        groups_per_step: usize,
    ) -> Result<StepContribution> {
        let step = self.state.version;
        let (grads, c) = compute_step(models, prompts, ids, cfg, step, groups_per_step, (0, 1))?;
        let scale = 1.0 / c.groups.max(1) as f64;
        let grads: Vec<Tensor> = self.state.names.iter().map(|n| &grads[n] * scale).collect();
        let ref_before = self.state.reference_version;
        let o = &self.optimizer;
        let clip = clip_coefficient(squared_norm(&grads).sqrt(), o.max_grad_norm);
        self.state.apply(&grads, o.lr, clip, &self.grpo);
        load_weights_into(&models.teacher, &self.weights())?;
        if self.state.reference_version != ref_before {
            let reference = self
                .state
                .names
                .iter()
                .cloned()
                .zip(self.state.reference.iter().map(Tensor::shallow_clone))
                .collect();
            load_weights_into(&models.reference, &reference)?;
        }
        Ok(c)
    }

    pub fn weights(&self) -> BTreeMap<String, Tensor> {
        self.state
            .names
            .iter()
            .cloned()
            .zip(self.state.params.iter().map(Tensor::shallow_clone))
            .collect()
    }
}
