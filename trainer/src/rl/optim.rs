//! AdamW on plain tensors (PyTorch's `torch.optim.AdamW` update, decoupled weight decay), so a
//! parameter server can own, checkpoint and restore the optimizer state of its shard without
//! a `VarStore`, and a single-process run applies exactly the same arithmetic.
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The paper's RL phase: constant lr 1e-6; Adam's usual betas and eps; no weight decay
    /// (TRL's default, which the reference trainer inherits).
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One AdamW step on one tensor, in place. `step` is the 1-based count of updates including
/// this one (for bias correction).
pub fn adamw_step(
    param: &mut Tensor,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    step: u64,
    cfg: &AdamWConfig,
) {
    let _guard = tch::no_grad_guard();
    let t = step as i32;
    if cfg.weight_decay != 0.0 {
        let decayed = &*param * (1.0 - cfg.lr * cfg.weight_decay);
        param.copy_(&decayed);
    }
    let new_m = &*m * cfg.beta1 + grad * (1.0 - cfg.beta1);
    let new_v = &*v * cfg.beta2 + grad * grad * (1.0 - cfg.beta2);
    m.copy_(&new_m);
    v.copy_(&new_v);
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let bc2 = 1.0 - cfg.beta2.powi(t);
    let denom = (&new_v / bc2).sqrt() + cfg.eps;
    let update = (new_m / bc1) / denom * cfg.lr;
    let new_p = &*param - update;
    param.copy_(&new_p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, nn::OptimizerConfig, Device, Kind};

    /// Matches libtorch's own AdamW over several steps.
    #[test]
    fn matches_libtorch_adamw() {
        tch::manual_seed(1);
        let cfg = AdamWConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().randn("w", &[5], 0.0, 1.0);
        let mut mine = w.detach().copy();
        let mut m = Tensor::zeros_like(&mine);
        let mut v = Tensor::zeros_like(&mine);
        let mut opt = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.1,
            eps: 1e-8,
            amsgrad: false,
        }
        .build(&vs, 0.01)
        .unwrap();
        for step in 1..=5u64 {
            let target = Tensor::from_slice(&[1.0f32, -1.0, 2.0, 0.5, 0.0]);
            let loss = (&w - &target).pow_tensor_scalar(2).sum(Kind::Float) * (step as f64);
            opt.zero_grad();
            loss.backward();
            let g = w.grad().copy();
            opt.step();
            adamw_step(&mut mine, &g, &mut m, &mut v, step, &cfg);
            let diff = (&mine - &w.detach()).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "step {step}: {diff}");
        }
    }
}
