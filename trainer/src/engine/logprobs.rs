//! Per-token log-probabilities of given target tokens: what the SFT loss, the RLT reward and
//! GRPO all score. Computed in f32 whatever the model's dtype.
use crate::model::qwen2::{Qwen2, LOGIT_CHUNK};
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
///
/// The vocabulary projection runs over about [`LOGIT_CHUNK`] tokens at a time: under
/// `no_grad` (scoring, the reward) only that much of the `[.., vocab]` logits ever exists,
/// where a whole group would not fit (8 x 16k tokens x 152k f32 log-probs are 80 GB).
pub fn sequence_logprobs(
    model: &Qwen2,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    temperature: f64,
) -> Tensor {
    let (b, t) = input_ids.size2().expect("input_ids must be [batch, seq]");
    let hidden = model.forward_hidden(input_ids, attention_mask, None);
    let step = (LOGIT_CHUNK / b.max(1)).max(1);
    let parts: Vec<Tensor> = (0..t - 1)
        .step_by(step as usize)
        .map(|start| {
            let len = step.min(t - 1 - start);
            let logits = model.lm_logits(&hidden.narrow(1, start, len));
            token_logprobs(&logits, &input_ids.narrow(1, start + 1, len), temperature)
        })
        .collect();
    if parts.is_empty() {
        return Tensor::zeros([b, 0], (Kind::Float, input_ids.device()));
    }
    Tensor::cat(&parts, 1)
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

/// [`sequence_logprobs`] without a graph, `rows` rows at a time (all at once when 0): what a
/// pass holds is the activations of `rows` sequences, whatever the batch.
pub fn sequence_logprobs_in_batches(
    model: &Qwen2,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    temperature: f64,
    rows: usize,
) -> Tensor {
    let n = input_ids.size()[0];
    let per = if rows == 0 { n } else { (rows as i64).min(n) };
    tch::no_grad(|| {
        let parts: Vec<Tensor> = (0..n)
            .step_by(per.max(1) as usize)
            .map(|first| {
                let len = per.min(n - first);
                let mask = attention_mask.map(|m| m.narrow(0, first, len));
                sequence_logprobs(
                    model,
                    &input_ids.narrow(0, first, len),
                    mask.as_ref(),
                    temperature,
                )
            })
            .collect();
        Tensor::cat(&parts, 0)
    })
}
