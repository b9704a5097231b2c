//! Model FLOPs of a training step and of a generation, and the bf16 peak of known GPUs: what
//! `rlt-trainer bench` divides to report model FLOP utilisation (MFU).
//!
//! Counted as in the PaLM paper's appendix B: 2 FLOPs per multiply-accumulate of every weight
//! matrix a token passes through (the LM head included, the embedding lookup not), plus the
//! attention scores and their weighted sum over the positions a query sees; a backward pass
//! costs twice its forward. Recomputation (activation checkpointing) is not counted: MFU, not
//! hardware utilisation.
use crate::model::config::Qwen2Config;

/// Multiply-accumulates per token of the weight matrices: the decoder layers and the LM head.
fn matmul_params(c: &Qwen2Config) -> f64 {
    let h = c.hidden_size as f64;
    let q = (c.num_attention_heads * c.head_dim()) as f64;
    let kv = (c.kv_heads() * c.head_dim()) as f64;
    let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * c.intermediate_size as f64;
    c.num_hidden_layers as f64 * per_layer + h * c.vocab_size as f64
}

/// Forward FLOPs of attention (scores and weighted sum) for one query that sees `keys` positions.
fn attention(c: &Qwen2Config, keys: f64) -> f64 {
    let q = (c.num_attention_heads * c.head_dim()) as f64;
    4.0 * c.num_hidden_layers as f64 * q * keys
}

/// One SFT step (forward and backward) over `rows` causal sequences of `len` tokens.
pub fn train_step(c: &Qwen2Config, rows: usize, len: usize) -> f64 {
    let (rows, len) = (rows as f64, len as f64);
    // Query i sees i + 1 keys: len (len + 1) / 2 in all per row.
    let forward = rows * (2.0 * matmul_params(c) * len + attention(c, len * (len + 1.0) / 2.0));
    3.0 * forward
}

/// One batched generation: a prefill of `rows` prompts left-padded to `prompt` tokens (the LM
/// head on the last position only), then `new - 1` single-token steps (the first new token
/// comes from the prefill).
pub fn generation(c: &Qwen2Config, rows: usize, prompt: usize, new: usize) -> f64 {
    let (rows, p) = (rows as f64, prompt as f64);
    let head = c.hidden_size as f64 * c.vocab_size as f64;
    let body = matmul_params(c) - head;
    let prefill = 2.0 * body * p + 2.0 * head + attention(c, p * (p + 1.0) / 2.0);
    let decode: f64 = (1..new.max(1))
        .map(|j| 2.0 * matmul_params(c) + attention(c, p + j as f64))
        .sum();
    rows * (prefill + decode)
}

/// Dense bf16 tensor-core peak in TFLOP/s of a GPU from its name (as `nvidia-smi` prints it),
/// from NVIDIA's data sheets; `None` when not known (pass `--peak-tflops`).
pub fn bf16_peak_tflops(gpu: &str) -> Option<f64> {
    let g = gpu.to_ascii_uppercase();
    // Most specific first: "L40S" contains "L40" and "L4", "H100 PCIE" contains "H100".
    const PEAKS: [(&str, f64); 11] = [
        ("GB200", 2500.0),
        ("B200", 2250.0),
        ("H200", 989.4),
        ("H100 PCIE", 756.5),
        ("H100 NVL", 835.5),
        ("H100", 989.4),
        ("H800", 989.4),
        ("A100", 312.0),
        ("L40S", 362.05),
        ("L40", 181.05),
        ("L4", 121.0),
    ];
    PEAKS
        .iter()
        .find(|(name, _)| g.contains(name))
        .map(|&(_, tflops)| tflops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::TinySpec;

    #[test]
    fn counts_match_a_hand_count() {
        // 1 layer, hidden 4, 2 heads of 2, 1 KV head, intermediate 8, vocab 10.
        let spec = TinySpec {
            hidden_size: 4,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            intermediate_size: 8,
            seed: 1,
        };
        let c = Qwen2Config::tiny(&spec, 10);
        // q 16 + k 8 + v 8 + o 16 + mlp 96 + head 40 = 184 multiply-accumulates per token.
        assert_eq!(matmul_params(&c), 184.0);
        // Two rows of 3 tokens: 2 x (2 x 184 x 3 + 4 x 4 x 6) x 3 (forward + backward).
        assert_eq!(train_step(&c, 2, 3), 2.0 * (1104.0 + 96.0) * 3.0);
        // One prompt of 2, 3 new: prefill (2 x 144 x 2 + 2 x 40 + 4 x 4 x 3), then two
        // steps seeing 3 and 4 keys.
        let prefill = 576.0 + 80.0 + 48.0;
        let decode = (368.0 + 48.0) + (368.0 + 64.0);
        assert_eq!(generation(&c, 1, 2, 3), prefill + decode);
    }

    #[test]
    fn peaks_by_name_most_specific_first() {
        assert_eq!(bf16_peak_tflops("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(bf16_peak_tflops("NVIDIA H100 PCIe"), Some(756.5));
        assert_eq!(bf16_peak_tflops("NVIDIA H200"), Some(989.4));
        assert_eq!(bf16_peak_tflops("NVIDIA L40S"), Some(362.05));
        assert_eq!(bf16_peak_tflops("NVIDIA L4"), Some(121.0));
        assert_eq!(bf16_peak_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(bf16_peak_tflops("Tesla T4"), None);
    }
}
