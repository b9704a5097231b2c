//! The Qwen2 decoder: token embedding, RMSNorm, rotary position embeddings, grouped-query
//! attention with q/k/v bias, SwiGLU MLP, tied or untied LM head.
//!
//! Variable names follow Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, ...), so a
//! `VarStore` built here loads and saves `*.safetensors` that transformers reads.
//!
//! Positions come from the attention mask (`cumsum(mask) - 1`), as transformers' `generate`
//! computes them: a left-padded row gets the same positions, hence the same logits, as the same
//! row without padding. That is what lets the RL and distillation code batch ragged sequences.
use crate::model::config::Qwen2Config;
use tch::{nn, nn::Module, Kind, Tensor};

/// Key/value cache for incremental decoding: per layer, keys and values in buffers
/// `[batch, kv_heads, capacity, head_dim]` (before the grouped heads are repeated) of which the
/// first `len` positions are filled. A decoded token is written in place; a buffer is only
/// reallocated (doubling, up to its limit) when a call outgrows it, so a cache made with the
/// whole generation's length ([`Qwen2::new_cache_for`]) never copies what it holds, and one
/// that starts smaller ([`Qwen2::new_growing_cache`]) holds what the tokens so far need.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions to allocate on the first write.
    reserve: i64,
    /// Positions a buffer grows to at most (when more are known never to come); 0 = no limit.
    limit: i64,
}

#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: i64,
}

impl LayerCache {
    /// Writes `k`, `v` (`[batch, kv_heads, t, head_dim]`) after the cached positions and
    /// returns views of everything cached so far; a full buffer doubles, to `limit` at most
    /// (0: none).
    fn append(&mut self, k: &Tensor, v: &Tensor, limit: i64) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let capacity = self.k.size()[2];
        if self.len + t > capacity {
            let doubled = match limit {
                0 => 2 * capacity,
                limit => (2 * capacity).min(limit),
            };
            let grown = doubled.max(self.len + t);
            let grow = |old: &Tensor| {
                let mut shape = old.size();
                shape[2] = grown;
                let new = Tensor::empty(shape.as_slice(), (old.kind(), old.device()));
                new.narrow(2, 0, self.len)
                    .copy_(&old.narrow(2, 0, self.len));
                new
            };
            self.k = grow(&self.k);
            self.v = grow(&self.v);
        }
        self.k.narrow(2, self.len, t).copy_(k);
        self.v.narrow(2, self.len, t).copy_(v);
        self.len += t;
        (self.k.narrow(2, 0, self.len), self.v.narrow(2, 0, self.len))
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }
    /// A cache whose buffers hold `positions` (prompt and new tokens) without reallocating.
    pub fn with_capacity(num_layers: usize, positions: i64) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            reserve: positions,
            limit: 0,
        }
    }
    /// Number of positions already cached.
    pub fn seq_len(&self) -> i64 {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }
    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> i64 {
        match self.layers.first() {
            Some(Some(l)) => l.k.size()[2],
            _ => self.reserve,
        }
    }
    /// Keeps only the given batch rows (e.g. after some sequences finished).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for l in self.layers.iter_mut().flatten() {
            l.k = l.k.index_select(0, rows);
            l.v = l.v.index_select(0, rows);
        }
    }
    /// Appends layer `i`'s new keys and values; returns all of that layer's cached ones.
    fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let (reserve, limit) = (self.reserve, self.limit);
        let layer = self.layers[i].get_or_insert_with(|| {
            let mut shape = k.size();
            shape[2] = reserve.max(shape[2]);
            LayerCache {
                k: Tensor::empty(shape.as_slice(), (k.kind(), k.device())),
                v: Tensor::empty(shape.as_slice(), (v.kind(), v.device())),
                len: 0,
            }
        });
        layer.append(&k, &v, limit)
    }
}

/// Positions per chunk of logits in [`Qwen2::backward_checkpointed`]: a 152k vocabulary
/// makes 1024 positions about 1.8 GB of logits, log-probabilities and their gradients in bf16.
pub const LOGIT_CHUNK: i64 = 1024;

/// Backpropagates `grad` (the gradient of the loss with respect to `out`) through the graph
/// of `out`, and returns the gradient reaching the leaf `input` (undefined if none does).
fn backward_into(out: &Tensor, grad: &Tensor, input: &Tensor) -> Tensor {
    if !grad.defined() {
        return Tensor::new();
    }
    // d/d(out) of sum(out * grad) is grad: the chain rule from here down.
    (out * grad.detach()).sum(Kind::Float).backward();
    input.grad()
}

/// Rotary positions `[batch, seq]` and the attention mask of `seq` new tokens after `past`
/// cached ones. `attention_mask` (`[batch, past + seq]`, 1 = token, 0 = padding) makes
/// positions count tokens only, so left padding does not shift them (as transformers).
fn positions_and_mask(
    b: i64,
    t: i64,
    past: i64,
    attention_mask: Option<&Tensor>,
    device: tch::Device,
) -> (Tensor, AttnMask) {
    let s = past + t;
    match attention_mask {
        Some(m) => {
            assert_eq!(
                m.size(),
                [b, s],
                "attention_mask must be [batch, past + seq]"
            );
            let m = m.to_kind(Kind::Int64);
            let pos = (m.cumsum(-1, Kind::Int64) - 1)
                .clamp_min(0)
                .narrow(1, past, t);
            // Key j is visible to query i (absolute past + i) if j <= past + i and j is a
            // token. A query always sees itself, so padding rows stay finite (their outputs
            // are never used).
            let q_abs = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
            let k_abs = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
            let causal = k_abs.le_tensor(&q_abs).view([1, 1, t, s]);
            let keys = m.gt(0).view([b, 1, 1, s]);
            let diag = k_abs.eq_tensor(&q_abs).view([1, 1, t, s]);
            (
                pos,
                AttnMask::Explicit(causal.logical_and(&keys).logical_or(&diag)),
            )
        }
        None => {
            let pos = Tensor::arange_start(past, s, (Kind::Int64, device))
                .view([1, t])
                .expand([b, t], false);
            let mask = if past == 0 && t > 1 {
                AttnMask::Causal
            } else if t == 1 {
                AttnMask::None
            } else {
                let q_abs = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
                let k_abs = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
                AttnMask::Explicit(k_abs.le_tensor(&q_abs).view([1, 1, t, s]))
            };
            (pos, mask)
        }
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, size: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.var("weight", &[size], nn::Init::Const(1.0)),
            eps,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        // As transformers does: normalise in f32, cast back, then scale.
        let kind = xs.kind();
        let x = xs.to_kind(Kind::Float);
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let x = (x * (var + self.eps).rsqrt()).to_kind(kind);
        &self.weight * x
    }
}

fn linear(p: nn::Path, inp: i64, out: i64, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(p, inp, out, cfg)
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap() / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

impl Attention {
    fn new(p: nn::Path, cfg: &Qwen2Config) -> Self {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        Attention {
            q_proj: linear(&p / "q_proj", h, heads * d, true),
            k_proj: linear(&p / "k_proj", h, kv_heads * d, true),
            v_proj: linear(&p / "v_proj", h, kv_heads * d, true),
            o_proj: linear(&p / "o_proj", heads * d, h, false),
            heads,
            kv_heads,
            head_dim: d,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let d = self.head_dim;
        let q = self
            .q_proj
            .forward(x)
            .view([b, t, self.heads, d])
            .transpose(1, 2);
        let k = self
            .k_proj
            .forward(x)
            .view([b, t, self.kv_heads, d])
            .transpose(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .view([b, t, self.kv_heads, d])
            .transpose(1, 2);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        // Grouped-query attention inside SDPA (each K/V head serves heads / kv_heads query
        // heads) rather than K/V copied per query head on every layer and step.
        let gqa = self.heads != self.kv_heads;
        let sdpa = |mask: Option<&Tensor>, causal: bool| {
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, gqa)
        };
        let y = match mask {
            AttnMask::Causal => sdpa(None, true),
            AttnMask::None => sdpa(None, false),
            AttnMask::Explicit(m) => sdpa(Some(m), false),
        };
        self.o_proj
            .forward(&y.transpose(1, 2).reshape([b, t, self.heads * d]))
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &Qwen2Config) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Mlp {
            gate_proj: linear(&p / "gate_proj", h, i, false),
            up_proj: linear(&p / "up_proj", h, i, false),
            down_proj: linear(&p / "down_proj", i, h, false),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

/// How attention is masked for one forward call.
enum AttnMask {
    /// No padding, no cache: plain causal (lets torch pick its fused kernels).
    Causal,
    /// One new token per row attending to everything before it.
    None,
    /// `[b, 1, t, s]` boolean, true = may attend.
    Explicit(Tensor),
}

/// The Qwen2 causal language model.
#[derive(Debug)]
pub struct Qwen2 {
    embed_tokens: nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    lm_head: Option<nn::Linear>,
    inv_freq: Tensor,
    config: Qwen2Config,
}

impl Qwen2 {
    /// Creates the variables under `root` (pass `vs.root()`), randomly initialised as
    /// transformers does (normal(0, 0.02) weights, zero biases, unit norms).
    pub fn new(root: &nn::Path, config: &Qwen2Config) -> Self {
        let p = root / "model";
        let embed_cfg = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        };
        let embed_tokens = nn::embedding(
            &p / "embed_tokens",
            config.vocab_size,
            config.hidden_size,
            embed_cfg,
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let lp = &p / "layers" / i;
                DecoderLayer {
                    self_attn: Attention::new(&lp / "self_attn", config),
                    mlp: Mlp::new(&lp / "mlp", config),
                    input_layernorm: RmsNorm::new(
                        &lp / "input_layernorm",
                        config.hidden_size,
                        config.rms_norm_eps,
                    ),
                    post_attention_layernorm: RmsNorm::new(
                        &lp / "post_attention_layernorm",
                        config.hidden_size,
                        config.rms_norm_eps,
                    ),
                }
            })
            .collect();
        let norm = RmsNorm::new(&p / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            linear(
                root / "lm_head",
                config.hidden_size,
                config.vocab_size,
                false,
            )
        });
        let d = config.head_dim();
        // 1 / theta^(2i/d), computed as transformers does (f32 pow of the scalar base).
        let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Int64, root.device()))
            .to_kind(Kind::Float)
            / d as f64;
        let inv_freq = Tensor::pow_scalar(config.rope_theta(), &exponents).reciprocal();
        Qwen2 {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    pub fn device(&self) -> tch::Device {
        self.inv_freq.device()
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// A cache preallocated for `positions` tokens (prompt plus everything to be generated).
    pub fn new_cache_for(&self, positions: i64) -> KvCache {
        KvCache::with_capacity(self.layers.len(), positions)
    }

    /// A cache for `first` positions that grows as tokens arrive, to `limit` at most.
    pub fn new_growing_cache(&self, first: i64, limit: i64) -> KvCache {
        KvCache {
            limit,
            ..KvCache::with_capacity(self.layers.len(), first.min(limit))
        }
    }

    /// Logits `[batch, seq, vocab]` (in the model's dtype) for `input_ids` `[batch, seq]`.
    ///
    /// `attention_mask` (`[batch, past + seq]`, 1 = token, 0 = padding; any integer or bool
    /// kind) covers the cached positions and the new ones, as in transformers. `None` means no
    /// padding. With a `cache`, the new keys/values are appended to it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let h = self.forward_hidden(input_ids, attention_mask, cache);
        self.lm_logits(&h)
    }

    /// The final hidden states `[batch, seq, hidden]` (after the last norm); apply
    /// [`Qwen2::lm_logits`] to the positions you need to save computing the full vocabulary.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids must be [batch, seq]");
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let (positions, mask) = positions_and_mask(b, t, past, attention_mask, input_ids.device());
        let mut x = self.embed_tokens.forward(input_ids);
        let (cos, sin) = self.rotary(&positions, x.kind());
        for i in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| (c, i));
            x = self.layer(i, &x, &cos, &sin, &mask, slot);
        }
        self.norm.forward(&x)
    }

    /// Rotary tables for `positions` `[batch, seq]`: in f32, cast to `kind`, as transformers.
    fn rotary(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// Decoder layer `i` on hidden states `x`.
    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        slot: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let layer = &self.layers[i];
        let a = layer
            .self_attn
            .forward(&layer.input_layernorm.forward(x), cos, sin, mask, slot);
        let x = x + a;
        &x + layer
            .mlp
            .forward(&layer.post_attention_layernorm.forward(&x))
    }

    /// Forward and backward of a training loss with activation checkpointing: the forward
    /// pass keeps only each decoder layer's input, the backward pass recomputes one layer at a
    /// time from it (what `torch.utils.checkpoint` does per layer), and the logits exist one
    /// chunk of `chunk` positions at a time. `loss_of(hidden, start)` is the loss of the final
    /// hidden states of positions `start..start + hidden.size()[1]` (`[batch, len, hidden]`),
    /// and the whole loss is their sum. Gradients land in the variables as `loss.backward()`
    /// would put them; returns the loss. `attention_mask` as in [`Qwen2::forward`] (`None`:
    /// no padding, or right padding the loss masks out).
    pub fn backward_checkpointed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        chunk: i64,
        loss_of: impl Fn(&Tensor, i64) -> Tensor,
    ) -> f64 {
        let (b, t) = input_ids.size2().expect("input_ids must be [batch, seq]");
        let (positions, mask) = positions_and_mask(b, t, 0, attention_mask, input_ids.device());
        let (inputs, last, cos, sin) = tch::no_grad(|| {
            let mut x = self.embed_tokens.forward(input_ids);
            let (cos, sin) = self.rotary(&positions, x.kind());
            let mut inputs = Vec::with_capacity(self.layers.len());
            for i in 0..self.layers.len() {
                let next = self.layer(i, &x, &cos, &sin, &mask, None);
                inputs.push(x);
                x = next;
            }
            (inputs, x, cos, sin)
        });
        // The final norm, then the head chunk by chunk on a detached copy of its output.
        let x_last = last.set_requires_grad(true);
        let hidden = self.norm.forward(&x_last);
        let h = hidden.detach().set_requires_grad(true);
        let mut total = 0.0;
        let mut start = 0;
        while start < t {
            let len = chunk.max(1).min(t - start);
            let loss = loss_of(&h.narrow(1, start, len), start);
            if loss.requires_grad() {
                loss.backward();
            }
            total += loss.double_value(&[]);
            start += len;
        }
        let mut g = backward_into(&hidden, &h.grad(), &x_last);
        for i in (0..self.layers.len()).rev() {
            let x = inputs[i].detach().set_requires_grad(true);
            let y = self.layer(i, &x, &cos, &sin, &mask, None);
            g = backward_into(&y, &g, &x);
        }
        if g.defined() {
            let e = self.embed_tokens.forward(input_ids);
            (e * g).sum(Kind::Float).backward();
        }
        total
    }

    /// Projects hidden states onto the vocabulary (tied: the embedding matrix).
    pub fn lm_logits(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(&self.embed_tokens.ws.tr()),
        }
    }
}
