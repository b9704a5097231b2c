//! Batched generation with a KV cache: temperature, top-p, stop tokens, a new-token limit,
//! left padding, deterministic under a seed.
//!
//! Besides the tokens it returns what RL needs: the log-prob of every sampled token under
//! the distribution it was sampled from (`log_softmax(logits / temperature)`, before the
//! top-p cut, as vLLM/TRL report them) and the mask of real generated tokens.
use crate::engine::logprobs::token_logprobs;
use crate::model::qwen2::Qwen2;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose mass reaches `top_p`; 1 = off.
    pub top_p: f64,
    /// A row stops after emitting any of these (the stop token is kept, masked 1).
    pub stop_tokens: Vec<i64>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 128,
            temperature: 1.0,
            top_p: 1.0,
            stop_tokens: vec![],
            seed: 0,
        }
    }
}

/// The result of [`generate`]; all tensors on the model's device.
#[derive(Debug)]
pub struct Generation {
    /// `[batch, prompt_len]` prompts, left-padded with the pad id.
    pub prompt_ids: Tensor,
    /// `[batch, prompt_len]` 1 = prompt token, 0 = padding (i64).
    pub prompt_mask: Tensor,
    /// `[batch, new]` generated ids; the pad id after a row stopped.
    pub tokens: Tensor,
    /// `[batch, new]` f32 sampling-time log-probs of `tokens` (0 where `mask` is 0).
    pub logprobs: Tensor,
    /// `[batch, new]` 1 = generated token (the stop token included), 0 = after the stop (i64).
    pub mask: Tensor,
    /// Per row: true if it emitted a stop token, false if it hit `max_new_tokens`.
    pub stopped: Vec<bool>,
}

impl Generation {
    /// The generated ids of each row, up to and including its stop token.
    pub fn token_lists(&self) -> Vec<Vec<i64>> {
        let toks =
            Vec::<Vec<i64>>::try_from(self.tokens.to_device(Device::Cpu)).unwrap_or_default();
        let mask = Vec::<Vec<i64>>::try_from(self.mask.to_device(Device::Cpu)).unwrap_or_default();
        toks.into_iter()
            .zip(mask)
            .map(|(t, m)| {
                t.into_iter()
                    .zip(m)
                    .filter(|(_, m)| *m == 1)
                    .map(|(t, _)| t)
                    .collect()
            })
            .collect()
    }

    /// The generations of consecutive row ranges as one: prompts left-padded and new tokens
    /// right-padded to the longest.
    pub fn concat(parts: &[Generation], pad_id: i64) -> Generation {
        let p = parts
            .iter()
            .map(|g| g.prompt_ids.size()[1])
            .max()
            .unwrap_or(0);
        let n = parts.iter().map(|g| g.tokens.size()[1]).max().unwrap_or(0);
        // Widens `[rows, w]` to `[rows, width]` with `fill`, on the left or the right.
        let widen = |t: &Tensor, width: i64, fill: f64, left: bool| {
            let (rows, w) = t.size2().expect("[rows, len]");
            if w == width {
                return t.shallow_clone();
            }
            let extra = Tensor::full([rows, width - w], fill, (t.kind(), t.device()));
            Tensor::cat(&if left { [&extra, t] } else { [t, &extra] }, 1)
        };
        let cat = |f: &dyn Fn(&Generation) -> Tensor| {
            Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0)
        };
        let pad = pad_id as f64;
        Generation {
            prompt_ids: cat(&|g| widen(&g.prompt_ids, p, pad, true)),
            prompt_mask: cat(&|g| widen(&g.prompt_mask, p, 0.0, true)),
            tokens: cat(&|g| widen(&g.tokens, n, pad, false)),
            logprobs: cat(&|g| widen(&g.logprobs, n, 0.0, false)),
            mask: cat(&|g| widen(&g.mask, n, 0.0, false)),
            stopped: parts.iter().flat_map(|g| g.stopped.clone()).collect(),
        }
    }

    /// Prompt and generation side by side: (`[batch, prompt_len + new]` ids, mask).
    pub fn full_sequences(&self) -> (Tensor, Tensor) {
        (
            Tensor::cat(&[&self.prompt_ids, &self.tokens], 1),
            Tensor::cat(&[&self.prompt_mask, &self.mask], 1),
        )
    }
}

/// Left-pads token lists into (`[batch, max_len]` ids, mask) on `device`.
pub fn left_pad(rows: &[Vec<i64>], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend(std::iter::repeat_n(pad_id, len - r.len()).chain(r.iter().copied()));
        mask.extend(
            std::iter::repeat_n(0i64, len - r.len()).chain(std::iter::repeat_n(1, r.len())),
        );
    }
    let shape = [rows.len() as i64, len as i64];
    (
        Tensor::from_slice(&ids).view(shape).to(device),
        Tensor::from_slice(&mask).view(shape).to(device),
    )
}

/// Right-pads token lists into (`[batch, max_len]` ids, mask) on `device` (for training).
pub fn right_pad(rows: &[Vec<i64>], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend(
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, len - r.len())),
        );
        mask.extend(
            std::iter::repeat_n(1i64, r.len()).chain(std::iter::repeat_n(0, len - r.len())),
        );
    }
    let shape = [rows.len() as i64, len as i64];
    (
        Tensor::from_slice(&ids).view(shape).to(device),
        Tensor::from_slice(&mask).view(shape).to(device),
    )
}

/// SplitMix64: the sampler's own uniform source, so a seed fixes the output independently of
/// libtorch's global generator and of the device.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        Self::mix(self.0)
    }
    /// SplitMix64's output function: a bijective scramble of all 64 bits.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One token per row of `logits` `[batch, vocab]`, drawn with the row's uniform `u[i]` (none
/// for greedy): (ids `[batch]`, log-probs `[batch]`).
fn sample_with(logits: &Tensor, cfg: &SamplingConfig, u: &[f32]) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    let v = logits.size()[1];
    let ids = if cfg.temperature <= 0.0 {
        logits.argmax(-1, false)
    } else {
        let probs = (&logits / cfg.temperature).softmax(-1, Kind::Float);
        let (sorted, order) = if cfg.top_p < 1.0 {
            let (sorted, order) = probs.sort(-1, true);
            // Keep a token while the mass before it is below top_p (the first always stays).
            let before = sorted.cumsum(-1, Kind::Float) - &sorted;
            (sorted.masked_fill(&before.ge(cfg.top_p), 0.0), Some(order))
        } else {
            (probs, None)
        };
        let cdf = sorted.cumsum(-1, Kind::Float);
        let u = Tensor::from_slice(u).to(logits.device()).unsqueeze(1) * cdf.narrow(1, v - 1, 1);
        let pos = cdf
            .lt_tensor(&u)
            .sum_dim_intlist(-1, true, Kind::Int64)
            .clamp_max(v - 1);
        match order {
            Some(order) => order.gather(-1, &pos, false).squeeze_dim(-1),
            None => pos.squeeze_dim(-1),
        }
    };
    let lp = token_logprobs(&logits, &ids, cfg.temperature);
    (ids, lp)
}

/// Generates continuations of `prompts` (token lists, left-padded into one batch).
///
/// The KV cache is allocated once for the prompt and every new token. A row that emits a stop
/// token leaves the batch (its cache rows are dropped), so the remaining rows decode at the
/// cost of their own number. Each row draws its uniforms from its own stream (of the seed and
/// the row's index), so a row's samples depend neither on when the others finished nor on
/// which rows share its batch ([`generate_in_batches`]).
pub fn generate(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    pad_id: i64,
    cfg: &SamplingConfig,
) -> Result<Generation> {
    generate_rows(model, prompts, pad_id, cfg, 0)
}

/// [`generate`] over `rows_per_pass` prompts at a time (all at once when 0), with the same
/// samples: the KV cache then holds `rows_per_pass` rows, not all of them (64 rows of 16k
/// tokens of a 7B model are 60 GB of keys and values).
pub fn generate_in_batches(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    pad_id: i64,
    cfg: &SamplingConfig,
    rows_per_pass: usize,
) -> Result<Generation> {
    if rows_per_pass == 0 || rows_per_pass >= prompts.len() {
        return generate(model, prompts, pad_id, cfg);
    }
    let parts = prompts
        .chunks(rows_per_pass)
        .enumerate()
        .map(|(i, chunk)| generate_rows(model, chunk, pad_id, cfg, (i * rows_per_pass) as u64))
        .collect::<Result<Vec<_>>>()?;
    Ok(Generation::concat(&parts, pad_id))
}

/// The seed of row `row`'s uniform stream.
fn row_seed(seed: u64, row: u64) -> u64 {
    SplitMix64::mix(seed ^ (row + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Decoding steps between two looks at which rows emitted a stop token: a look copies to the
/// host, which waits for the device; a row that stopped in between decodes a few more tokens,
/// written as padding.
const STOP_CHECK_EVERY: i64 = 8;

/// New positions the KV cache holds before it first grows (it doubles when full): most
/// explanations end well before their budget, and 64 rows of a 16k budget reserved up front
/// would hold tens of GB for tokens never generated.
const KV_FIRST_NEW_TOKENS: i64 = 256;

/// [`generate`] of prompts that are rows `first_row..` of a larger batch.
///
/// A group's samples of one prompt (every prompt the same) prefill it once and start from
/// copies of its keys and values; prompts of one length need no attention mask, so attention
/// takes SDPA's fused causal path. Stop tokens are tracked on the device and looked at every
/// [`STOP_CHECK_EVERY`] steps, when the rows that stopped leave the batch.
fn generate_rows(
    model: &Qwen2,
    prompts: &[Vec<i64>],
    pad_id: i64,
    cfg: &SamplingConfig,
    first_row: u64,
) -> Result<Generation> {
    if prompts.is_empty() {
        bail!("generate: no prompts");
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("generate: prompt {i} is empty");
    }
    let device = model.device();
    let (prompt_ids, prompt_mask) = left_pad(prompts, pad_id, device);
    let b = prompts.len() as i64;
    let p = prompt_ids.size()[1];
    let max_new = cfg.max_new_tokens as i64;
    let shared = prompts.iter().all(|q| q == &prompts[0]);
    let padded = prompts.iter().any(|q| q.len() != prompts[0].len());
    let mut rngs: Vec<SplitMix64> = (0..b as u64)
        .map(|r| SplitMix64::new(row_seed(cfg.seed, first_row + r)))
        .collect();
    let stop = Tensor::from_slice(&cfg.stop_tokens).to(device);
    let pad = Tensor::from(pad_id).to(device);
    tch::no_grad(|| {
        let mut cache = model.new_growing_cache(p + KV_FIRST_NEW_TOKENS, p + max_new);
        let mut logits = if shared {
            let h = model.forward_hidden(&prompt_ids.narrow(0, 0, 1), None, Some(&mut cache));
            cache.select_rows(&Tensor::zeros([b], (Kind::Int64, device)));
            let last = model.lm_logits(&h.narrow(1, p - 1, 1)).squeeze_dim(1);
            last.expand([b, -1], false)
        } else {
            let mask = padded.then_some(&prompt_mask);
            let h = model.forward_hidden(&prompt_ids, mask, Some(&mut cache));
            model.lm_logits(&h.narrow(1, p - 1, 1)).squeeze_dim(1)
        };
        // Outputs of all rows, filled column by column at the rows still decoding.
        let tokens = Tensor::full([b, max_new], pad_id, (Kind::Int64, device));
        let logprobs = Tensor::zeros([b, max_new], (Kind::Float, device));
        let mask = Tensor::zeros([b, max_new], (Kind::Int64, device));
        // With left padding: the attention mask of the rows in the batch, for every position
        // they will reach.
        let mut attention = padded.then(|| {
            Tensor::cat(
                &[
                    &prompt_mask,
                    &Tensor::ones([b, max_new], (Kind::Int64, device)),
                ],
                1,
            )
        });
        // The rows in the batch, and which of them have not emitted a stop token yet.
        let mut live: Vec<i64> = (0..b).collect();
        let mut live_t = Tensor::arange(b, (Kind::Int64, device));
        let mut running = Tensor::ones([b], (Kind::Bool, device));
        let mut steps = 0;
        for step in 0..max_new {
            steps = step + 1;
            let u: Vec<f32> = if cfg.temperature <= 0.0 {
                vec![]
            } else {
                live.iter()
                    .map(|&r| rngs[r as usize].next_f64() as f32)
                    .collect()
            };
            let (tok, lp) = sample_with(&logits, cfg, &u);
            let mut tok = tok.where_self(&running, &pad);
            // In place into the outputs' column `step` (the returned handles are not needed).
            let _ = tokens.select(1, step).index_copy_(0, &live_t, &tok);
            let _ = logprobs.select(1, step).index_copy_(
                0,
                &live_t,
                &(lp * running.to_kind(Kind::Float)),
            );
            let _ = mask
                .select(1, step)
                .index_copy_(0, &live_t, &running.to_kind(Kind::Int64));
            if !cfg.stop_tokens.is_empty() {
                running =
                    running.logical_and(&Tensor::isin(&tok, &stop, false, false).logical_not());
            }
            if steps == max_new {
                break;
            }
            if !cfg.stop_tokens.is_empty() && steps % STOP_CHECK_EVERY == 0 {
                let still = Vec::<bool>::try_from(running.to_device(Device::Cpu))?;
                if still.iter().all(|&r| !r) {
                    break;
                }
                if still.iter().any(|&r| !r) {
                    let keep: Vec<i64> = (0..live.len() as i64)
                        .filter(|&i| still[i as usize])
                        .collect();
                    let keep_t = Tensor::from_slice(&keep).to(device);
                    live = keep.iter().map(|&i| live[i as usize]).collect();
                    live_t = Tensor::from_slice(&live).to(device);
                    cache.select_rows(&keep_t);
                    attention = attention.map(|a| a.index_select(0, &keep_t));
                    tok = tok.index_select(0, &keep_t);
                    running = running.index_select(0, &keep_t);
                }
            }
            logits = model
                .forward(
                    &tok.unsqueeze(1),
                    attention
                        .as_ref()
                        .map(|a| a.narrow(1, 0, p + steps))
                        .as_ref(),
                    Some(&mut cache),
                )
                .squeeze_dim(1);
        }
        // How far the longest row went (rows that stopped between two looks left padding
        // columns behind), and which rows ended on a stop token.
        let lengths = mask.sum_dim_intlist(1, false, Kind::Int64);
        let lengths = Vec::<i64>::try_from(lengths.to_device(Device::Cpu))?;
        let width = lengths.iter().copied().max().unwrap_or(0).clamp(1, steps);
        let rows = Vec::<Vec<i64>>::try_from(tokens.narrow(1, 0, width).to_device(Device::Cpu))?;
        let stopped = lengths
            .iter()
            .zip(&rows)
            .map(|(&n, row)| n > 0 && cfg.stop_tokens.contains(&row[n as usize - 1]))
            .collect();
        Ok(Generation {
            tokens: tokens.narrow(1, 0, width),
            logprobs: logprobs.narrow(1, 0, width),
            mask: mask.narrow(1, 0, width),
            prompt_ids: prompt_ids.shallow_clone(),
            prompt_mask: prompt_mask.shallow_clone(),
            stopped,
        })
    })
}
