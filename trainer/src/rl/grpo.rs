//! GRPO (Shao et al. 2024) as the RLT paper uses it: group-normalised advantages, the clipped
//! ratio objective on the generated tokens, a KL penalty (k3 estimator) towards a reference
//! model, and the reference's soft re-sync towards the policy (TRL's `ref_model_mixup_alpha`).
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct GrpoConfig {
    /// Ratio clip range: the ratio is clipped to [1 - eps, 1 + eps].
    pub clip_eps: f64,
    /// Weight of the KL penalty to the reference model (paper: 0.04).
    pub beta: f64,
    /// Reference re-sync: `ref <- alpha * policy + (1 - alpha) * ref` (paper: 0.9) ...
    pub ref_mix_alpha: f64,
    /// ... every this many optimizer steps (paper: 32); 0 disables it.
    pub ref_sync_every: u64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            clip_eps: 0.2,
            beta: 0.04,
            ref_mix_alpha: 0.9,
            ref_sync_every: 32,
        }
    }
}

/// Advantages normalised within each group of `group` consecutive rewards:
/// `(r - mean_group) / (std_group + 1e-4)` (unbiased std, as TRL). A group whose rewards are
/// all equal carries no signal and gets zero advantages.
pub fn group_advantages(rewards: &Tensor, group: i64) -> Tensor {
    let n = rewards.size()[0];
    assert!(
        group > 0 && n % group == 0,
        "{n} rewards do not split into groups of {group}"
    );
    let r = rewards.to_kind(Kind::Float).view([n / group, group]);
    let mean = r.mean_dim(1, true, Kind::Float);
    let std = if group > 1 {
        r.std_dim(1, true, true)
    } else {
        Tensor::zeros_like(&mean)
    };
    ((r - mean) / (std + 1e-4)).view([n])
}

/// Whether the reference model is re-synced after optimizer step `step` (1-based count of
/// applied updates).
pub fn ref_sync_due(step: u64, cfg: &GrpoConfig) -> bool {
    cfg.ref_sync_every > 0 && step > 0 && step.is_multiple_of(cfg.ref_sync_every)
}

/// The reference re-sync of one tensor, in place: `ref <- alpha * policy + (1 - alpha) * ref`.
pub fn ref_mix(reference: &mut Tensor, policy: &Tensor, alpha: f64) {
    let _guard = tch::no_grad_guard();
    let mixed = policy * alpha + &*reference * (1.0 - alpha);
    reference.copy_(&mixed);
}

/// The GRPO loss, one value per sequence, to be summed/averaged by the caller.
///
/// - `logp` `[B, T]`: the policy's per-token log-probs of the generated tokens (with grad);
/// - `old_logp`: the same under the policy that sampled them (detached; with one update per
///   batch, as here, it equals `logp.detach()` and the ratio is 1, but its gradient is not 0);
/// - `ref_logp`: the reference model's (detached);
/// - `mask`: which positions are generated tokens of the row;
/// - `advantages` `[B]`.
///
/// Per token: [`grpo_token_loss`], averaged over each row's tokens ([`token_weights`]).
pub fn grpo_sequence_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: &Tensor,
    mask: &Tensor,
    advantages: &Tensor,
    cfg: &GrpoConfig,
) -> Tensor {
    (grpo_token_loss(logp, old_logp, ref_logp, advantages, cfg) * token_weights(mask))
        .sum_dim_intlist(1, false, Kind::Float)
}

/// Per token `[B, T]`: `-(min(ratio * A, clip(ratio) * A) - beta * kl)`, with
/// `kl = exp(ref - logp) - (ref - logp) - 1` (k3, always >= 0), on every position (padding
/// included: [`token_weights`] masks it). Each token's term depends on that token alone, so
/// the loss can be taken over any slice of rows and positions and summed.
pub fn grpo_token_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: &Tensor,
    advantages: &Tensor,
    cfg: &GrpoConfig,
) -> Tensor {
    let adv = advantages.to_kind(Kind::Float).unsqueeze(1);
    let ratio = (logp - old_logp).exp();
    let clipped = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps);
    let objective = (&ratio * &adv).minimum(&(clipped * &adv));
    let d = ref_logp - logp;
    let kl = d.exp() - &d - 1.0;
    -(objective - kl * cfg.beta)
}

/// `mask` `[B, T]` over each row's number of tokens: the weights that turn per-token losses
/// into per-row means.
pub fn token_weights(mask: &Tensor) -> Tensor {
    let mask = mask.to_kind(Kind::Float);
    let tokens = mask.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0);
    mask / tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    #[test]
    fn advantages_are_normalised_per_group() {
        let r = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 10.0, 10.0, 10.0]);
        let a = v(&group_advantages(&r, 3));
        // Group 1: mean 2, unbiased std 1.
        for (x, y) in a[..3].iter().zip([-1.0, 0.0, 1.0]) {
            assert!((x - y).abs() < 1e-3, "{a:?}");
        }
        assert_eq!(&a[3..], &[0.0, 0.0, 0.0], "equal rewards carry no signal");
    }

    #[test]
    fn loss_gradient_is_advantage_weighted_log_prob_gradient_at_ratio_one() {
        // With old = logp.detach(), ref = logp and beta irrelevant, d loss / d logp[b, t] =
        // -A_b / n_b on masked tokens and 0 on padding.
        let logp = Tensor::from_slice(&[-1.0f32, -2.0, -0.5, -0.3, -0.2, -9.0])
            .view([2, 3])
            .set_requires_grad(true);
        let mask = Tensor::from_slice(&[true, true, true, true, true, false]).view([2, 3]);
        let adv = Tensor::from_slice(&[2.0f32, -1.0]);
        let loss = grpo_sequence_loss(
            &logp,
            &logp.detach(),
            &logp.detach(),
            &mask,
            &adv,
            &GrpoConfig::default(),
        );
        // Value: -A (ratio 1, no KL to a reference equal to the policy).
        close(&v(&loss), &[-2.0, 1.0]);
        loss.sum(Kind::Float).backward();
        let g = v(&logp.grad());
        close(&g, &[-2.0 / 3.0, -2.0 / 3.0, -2.0 / 3.0, 0.5, 0.5, 0.0]);
    }

    #[test]
    fn ratio_is_clipped_and_kl_penalty_matches_k3() {
        let cfg = GrpoConfig {
            clip_eps: 0.2,
            beta: 0.5,
            ..GrpoConfig::default()
        };
        let logp = Tensor::from_slice(&[0.0f32]).view([1, 1]);
        let old = Tensor::from_slice(&[-1.0f32]).view([1, 1]); // ratio e > 1.2
        let reference = Tensor::from_slice(&[-0.5f32]).view([1, 1]);
        let mask = Tensor::from_slice(&[true]).view([1, 1]);
        let loss = grpo_sequence_loss(
            &logp,
            &old,
            &reference,
            &mask,
            &Tensor::from_slice(&[1.0f32]),
            &cfg,
        );
        let k3 = (-0.5f64).exp() - (-0.5) - 1.0;
        let expected = -(1.2 - 0.5 * k3);
        close(&v(&loss), &[expected as f32]);
        // Negative advantage: min picks the unclipped (more pessimistic) e * A.
        let loss = grpo_sequence_loss(
            &logp,
            &old,
            &reference,
            &mask,
            &Tensor::from_slice(&[-1.0f32]),
            &cfg,
        );
        close(&v(&loss), &[(-(-(1f64.exp()) - 0.5 * k3)) as f32]);
    }

    #[test]
    fn reference_resync_schedule_and_mix() {
        let cfg = GrpoConfig::default();
        let due: Vec<u64> = (0..=100).filter(|&s| ref_sync_due(s, &cfg)).collect();
        assert_eq!(due, vec![32, 64, 96]);
        let mut r = Tensor::from_slice(&[1.0f32, 0.0]);
        ref_mix(&mut r, &Tensor::from_slice(&[0.0f32, 10.0]), 0.9);
        close(&v(&r), &[0.1, 9.0]);
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
}
