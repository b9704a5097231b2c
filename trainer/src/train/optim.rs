//! The one AdamW of the trainer (decoupled weight decay, `torch.optim.AdamW`'s arithmetic),
//! with named recipes per stage ([`AdamWConfig::warmup`], [`AdamWConfig::rl`],
//! [`AdamWConfig::distillation`]), a linear warm-up + cosine learning-rate schedule, and
//! global-norm gradient clipping. Written over plain tensors (not tch's opaque optimizer) so
//! that its state can be checkpointed and resumed, and so that a parameter server can run it
//! on its shard of the variables with gradients that arrive over the wire
//! ([`AdamW::step_with`]). tch 0.26 exposes neither libtorch's fused nor its foreach AdamW
//! kernels; `rlt-trainer bench` times this update against libtorch's own C++ AdamW.
use crate::model::checkpoint::{read_safetensors, write_safetensors};
use anyhow::{anyhow, bail, Result};
use rlt_api::spec::{defaults, Optimizer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl From<&Optimizer> for AdamWConfig {
    fn from(o: &Optimizer) -> Self {
        AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: 1e-8,
            weight_decay: o.weight_decay,
        }
    }
}

/// The named recipes, each the spec's default for its stage.
impl AdamWConfig {
    /// Warm-up: betas (0.9, 0.95), weight decay 1e-4.
    pub fn warmup() -> Self {
        Self::from(&defaults::warmup_optimizer())
    }
    /// RL: betas (0.9, 0.999), no weight decay.
    pub fn rl() -> Self {
        Self::from(&defaults::rl_optimizer())
    }
    /// Distillation: betas (0.9, 0.999), no weight decay.
    pub fn distillation() -> Self {
        Self::from(&defaults::distillation_optimizer())
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self::warmup()
    }
}

struct Slot {
    name: String,
    param: Tensor,
    /// f32 copy of a reduced-precision parameter: updates of size lr * 1 would vanish in bf16.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters (e.g. `vs.variables()`, or a shard of them).
pub struct AdamW {
    pub config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// Parameters are ordered by name, so two processes agree on the layout.
    pub fn new(params: impl IntoIterator<Item = (String, Tensor)>, config: AdamWConfig) -> Self {
        let sorted: BTreeMap<String, Tensor> = params.into_iter().collect();
        let slots = sorted
            .into_iter()
            .map(|(name, param)| {
                let f32_param = param.detach().to_kind(Kind::Float);
                let master = (param.kind() != Kind::Float).then(|| f32_param.copy());
                Slot {
                    exp_avg: f32_param.zeros_like(),
                    exp_avg_sq: f32_param.zeros_like(),
                    name,
                    param,
                    master,
                }
            })
            .collect();
        AdamW {
            config,
            slots,
            step: 0,
        }
    }

    pub fn for_var_store(vs: &tch::nn::VarStore, config: AdamWConfig) -> Self {
        Self::new(vs.variables(), config)
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> Vec<&Tensor> {
        self.slots.iter().map(|s| &s.param).collect()
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One AdamW update with learning rate `lr` from the parameters' `.grad()`; parameters
    /// without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        let grads: Vec<Option<Tensor>> = self
            .slots
            .iter()
            .map(|s| Some(s.param.grad()).filter(Tensor::defined))
            .collect();
        self.update(lr, grads);
    }

    /// One AdamW update from explicit gradients, one per parameter in name order (a parameter
    /// server's averaged gradients for its shard), each multiplied by `scale` first (the
    /// clipping coefficient of the whole step's gradient).
    pub fn step_with(&mut self, lr: f64, grads: &[Tensor], scale: f64) {
        assert_eq!(grads.len(), self.slots.len(), "one gradient per parameter");
        let grads = grads
            .iter()
            .map(|g| {
                Some(if scale == 1.0 {
                    g.shallow_clone()
                } else {
                    g * scale
                })
            })
            .collect();
        self.update(lr, grads);
    }

    fn update(&mut self, lr: f64, grads: Vec<Option<Tensor>>) {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        tch::no_grad(|| {
            for (s, g) in self.slots.iter_mut().zip(grads) {
                let Some(g) = g else { continue };
                let g = g.to_kind(Kind::Float);
                // torch.optim.AdamW's arithmetic, in place where it can be (two temporaries).
                let _ = s.exp_avg.lerp_(&g, 1.0 - c.beta1);
                let _ = s.exp_avg_sq.lerp_(&(&g * &g), 1.0 - c.beta2);
                let step_size = lr / bc1;
                if step_size == 0.0 {
                    continue;
                }
                let mut denom = s.exp_avg_sq.sqrt();
                let _ = denom
                    .g_div_scalar_(bc2.sqrt())
                    .g_add_scalar_(c.eps)
                    .g_div_scalar_(-step_size);
                let target = s.master.as_mut().unwrap_or(&mut s.param);
                if c.weight_decay != 0.0 {
                    let _ = target.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = target.addcdiv_(&s.exp_avg, &denom);
                if let Some(m) = &s.master {
                    s.param.copy_(m);
                }
            }
        });
    }

    /// Optimizer state as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`, `master.<param>`).
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("exp_avg.{}", s.name), s.exp_avg.shallow_clone());
            out.insert(
                format!("exp_avg_sq.{}", s.name),
                s.exp_avg_sq.shallow_clone(),
            );
            if let Some(m) = &s.master {
                out.insert(format!("master.{}", s.name), m.shallow_clone());
            }
        }
        out.insert("step".into(), Tensor::from_slice(&[self.step as i64]));
        out
    }

    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .ok_or_else(|| anyhow!("optimizer state lacks `{k}`"))
        };
        self.step = get("step")?.int64_value(&[0]) as u64;
        tch::no_grad(|| -> Result<()> {
            for s in &mut self.slots {
                for (key, dst) in [
                    ("exp_avg", &mut s.exp_avg),
                    ("exp_avg_sq", &mut s.exp_avg_sq),
                ] {
                    let src = get(&format!("{key}.{}", s.name))?;
                    if src.size() != dst.size() {
                        bail!(
                            "optimizer state `{key}.{}` has shape {:?}, expected {:?}",
                            s.name,
                            src.size(),
                            dst.size()
                        );
                    }
                    dst.copy_(src);
                }
                if let (Some(m), Some(src)) =
                    (s.master.as_mut(), state.get(&format!("master.{}", s.name)))
                {
                    m.copy_(src);
                }
            }
            Ok(())
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let state = self.state();
        let named: Vec<(&String, &Tensor)> = state.iter().collect();
        write_safetensors(path, &named)
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.load_state(&read_safetensors(path)?)
    }
}

/// The factor that brings a gradient of global L2 norm `norm` within `max_norm` (1 when it is
/// already, or when `max_norm` is 0: no clipping), as torch's `clip_grad_norm_` computes it.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Sum of squares of `tensors` (a shard's part of a global norm).
pub fn squared_norm(tensors: &[Tensor]) -> f64 {
    tch::no_grad(|| {
        tensors
            .iter()
            .map(|t| {
                t.to_kind(Kind::Double)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum()
    })
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping (as torch's `clip_grad_norm_`).
pub fn clip_grad_norm(params: &[&Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        let coef = clip_coefficient(total, max_norm);
        if coef < 1.0 {
            for mut g in grads {
                let _ = g.g_mul_scalar_(coef);
            }
        }
        total
    })
}

/// Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine decay to
/// `min_lr_ratio * peak_lr` at `total_steps` (transformers' `cosine` schedule with a floor).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// Warm-up as a fraction of the total steps (the RLT recipe uses 5%).
    pub fn with_warmup_ratio(peak_lr: f64, total_steps: u64, warmup_ratio: f64) -> Self {
        LrSchedule {
            peak_lr,
            warmup_steps: (total_steps as f64 * warmup_ratio).ceil() as u64,
            total_steps,
            min_lr_ratio: 0.0,
        }
    }

    /// A constant rate (e.g. the RL stage's 1e-6).
    pub fn constant(lr: f64) -> Self {
        LrSchedule {
            peak_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 1.0,
        }
    }

    /// Learning rate for the update with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.total_steps <= self.warmup_steps {
            return self.peak_lr;
        }
        let progress = ((step - self.warmup_steps) as f64
            / (self.total_steps - self.warmup_steps) as f64)
            .min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

/// Deterministic shard of every parameter, balanced by size: largest first (ties by name),
/// each to the currently lightest shard (ties to the lowest index). Every parameter server, learner and
/// data-parallel rank computes the same map from the same (name, numel) list, so nothing needs to agree at run
/// time beyond the parameter list itself.
pub fn assign_shards(params: &[(String, i64)], num_shards: usize) -> BTreeMap<String, usize> {
    assert!(num_shards > 0);
    let mut order: Vec<&(String, i64)> = params.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut load = vec![0i64; num_shards];
    let mut out = BTreeMap::new();
    for (name, numel) in order {
        let shard = (0..num_shards).min_by_key(|&i| (load[i], i)).unwrap();
        load[shard] += numel;
        out.insert(name.clone(), shard);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_by_cosine() {
        let s = LrSchedule::with_warmup_ratio(1e-5, 100, 0.05);
        assert_eq!(s.warmup_steps, 5);
        assert!((s.lr(0) - 2e-6).abs() < 1e-12);
        assert!((s.lr(4) - 1e-5).abs() < 1e-12);
        assert!((s.lr(5) - 1e-5).abs() < 1e-12);
        assert!((s.lr(52) - 5e-6).abs() < 1e-7, "{}", s.lr(52));
        assert!(s.lr(99) < 1e-8);
        assert_eq!(LrSchedule::constant(1e-6).lr(1000), 1e-6);
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step_and_round_trips_state() {
        // After one step from zero moments, AdamW moves each weight by lr * sign(g) (plus decay).
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[0.5f32, -1.0, 2.0])).sum(Kind::Float);
        loss.backward();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new([("w".to_string(), p.shallow_clone())], cfg);
        opt.step(0.01);
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        let want = [
            1.0 * (1.0 - 0.001) - 0.01,
            -2.0 * (1.0 - 0.001) + 0.01,
            3.0 * (1.0 - 0.001) - 0.01,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let state = opt.state();
        let mut other = AdamW::new([("w".to_string(), p.detach().copy())], cfg);
        other.load_state(&state).unwrap();
        assert_eq!(other.steps(), 1);
        let err = AdamW::new([("v".to_string(), p.detach().copy())], cfg)
            .load_state(&state)
            .unwrap_err();
        assert!(err.to_string().contains("exp_avg.v"));
    }

    #[test]
    fn bf16_parameters_accumulate_small_updates_in_an_f32_master_copy() {
        // 1 - 1e-3 rounds back to 1.0 in bf16: without the master copy the weight never moves.
        let p = Tensor::from_slice(&[1.0f32])
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true);
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new([("w".to_string(), p.shallow_clone())], cfg);
        for _ in 0..10 {
            opt.zero_grad();
            p.sum(Kind::Float).backward();
            opt.step(1e-3);
        }
        let master = opt.state()["master.w"].double_value(&[0]);
        assert!((master - 0.99).abs() < 1e-4, "{master}");
        assert!(p.double_value(&[0]) < 1.0);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let a = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[4.0f32]).set_requires_grad(true);
        (&a * &a / 2.0 + &b * &b / 2.0).sum(Kind::Float).backward();
        let n = clip_grad_norm(&[&a, &b], 1.0);
        assert!((n - 5.0).abs() < 1e-5);
        let ga = a.grad().double_value(&[0]);
        assert!((ga - 0.6).abs() < 1e-4, "{ga}");
    }

    /// The same arithmetic as libtorch's own AdamW over several steps, from explicit
    /// gradients (as a parameter server applies them) and from `.grad()` alike.
    #[test]
    fn matches_libtorch_adamw_from_explicit_and_accumulated_gradients() {
        use tch::nn::{self, OptimizerConfig};
        tch::manual_seed(1);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().randn("w", &[5], 0.0, 1.0);
        let explicit = w.detach().copy();
        let accumulated = w.detach().copy().set_requires_grad(true);
        let mut by_grads = AdamW::new([("w".to_string(), explicit.shallow_clone())], cfg);
        let mut by_backward = AdamW::new([("w".to_string(), accumulated.shallow_clone())], cfg);
        let mut theirs = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.1,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&vs, 0.01)
        .unwrap();
        let target = Tensor::from_slice(&[1.0f32, -1.0, 2.0, 0.5, 0.0]);
        for step in 1..=5 {
            let loss =
                |p: &Tensor| (p - &target).pow_tensor_scalar(2).sum(Kind::Float) * step as f64;
            theirs.zero_grad();
            loss(&w).backward();
            let g = w.grad().copy();
            theirs.step();
            by_grads.step_with(0.01, &[g], 1.0);
            by_backward.zero_grad();
            loss(&accumulated).backward();
            by_backward.step(0.01);
            for mine in [&explicit, &accumulated] {
                let diff = (mine.detach() - w.detach()).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "step {step}: {diff}");
            }
        }
    }
}
