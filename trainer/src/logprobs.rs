//! Per-token log-probabilities of given target tokens: what the SFT loss, the RLT reward and
//! GRPO all score. Computed in f32 whatever the model's dtype.
use crate::model::Qwen2;
use tch::{Kind, Tensor};

/// `log softmax(logits / temperature)` at `targets`: logits `[.., vocab]`, targets `[..]` (i64)
/// -> `[..]` f32. `temperature <= 0` means 1 (greedy decoding scores the plain distribution).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    let logits = if temperature > 0.0 && temperature != 1.0 {
        logits / temperature
    } else {
        logits
    };
    logits
        .log_softmax(-1, Kind::Float)
        .gather(-1, &targets.unsqueeze(-1), false)
        .squeeze_dim(-1)
}

/// Log-prob of each token of `input_ids` `[batch, seq]` given the tokens before it, under
/// `model`: `[batch, seq - 1]`, entry t scoring token t + 1. Padding (mask 0) gives finite
/// values that callers mask out; left padding does not change the other values.
pub fn sequence_logprobs(
    model: &Qwen2,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    temperature: f64,
) -> Tensor {
    let t = input_ids.size()[1];
    let hidden = model.forward_hidden(input_ids, attention_mask, None);
    let logits = model.lm_logits(&hidden.narrow(1, 0, t - 1));
    token_logprobs(&logits, &input_ids.narrow(1, 1, t - 1), temperature)
}

/// Mean negative log-likelihood over the positions where `loss_mask` is 1, for next-token
/// prediction: `loss_mask` `[batch, seq]` marks the tokens to predict (e.g. completion tokens);
/// position 0 is never predicted. Returns (loss, number of scored tokens).
pub fn completion_nll(
    model: &Qwen2,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    loss_mask: &Tensor,
) -> (Tensor, i64) {
    let t = input_ids.size()[1];
    let lp = sequence_logprobs(model, input_ids, attention_mask, 1.0);
    let m = loss_mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
    let n = m.sum(Kind::Float).double_value(&[]) as i64;
    let loss = -(lp * &m).sum(Kind::Float) / (n.max(1) as f64);
    (loss, n)
}
