//! `config.json` of a Qwen2 checkpoint, read and written in Hugging Face's field names so that
//! a directory we save opens in transformers and theirs opens here. Fields we do not use are
//! kept in `extra` and written back unchanged.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Grouped-query attention: heads share key/value heads. Defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    /// Qwen2 derives it as hidden_size / heads; some configs state it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers 5 moved this into `rope_parameters.rope_theta`; [`Qwen2Config::rope_theta`]
    /// reads either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_max_positions() -> i64 {
    32768
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// The size of a tiny random model: what a "tiny" model reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TinySpec {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub intermediate_size: i64,
    pub seed: u64,
}

impl From<&rlt_api::spec::TinyModel> for TinySpec {
    fn from(t: &rlt_api::spec::TinyModel) -> Self {
        TinySpec {
            hidden_size: t.hidden_size.into(),
            num_hidden_layers: t.layers.into(),
            num_attention_heads: t.heads.into(),
            num_key_value_heads: t.kv_heads.into(),
            intermediate_size: t.intermediate_size.into(),
            seed: t.seed,
        }
    }
}

impl TinySpec {
    /// The model shapes the benchmarks (`bench`, `rl-bench`) run, by name, with the vocabulary
    /// of the shape when it is not the tiny tokenizer's: `tiny` (~0.1M parameters), `small`
    /// (22.7M), `medium` (24M: `small` with 4 KV heads), `0.5b` (Qwen2.5-0.5B's decoder; its
    /// 151,936-token vocabulary makes the real 494M parameters).
    pub fn bench_shape(name: &str) -> Result<(TinySpec, Option<i64>)> {
        let spec = |hidden_size,
                    num_hidden_layers,
                    num_attention_heads,
                    num_key_value_heads,
                    intermediate_size| TinySpec {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            intermediate_size,
            seed: 1,
        };
        Ok(match name {
            "tiny" => (spec(64, 2, 4, 2, 176), None),
            "small" => (spec(512, 8, 8, 2, 1408), None),
            "medium" => (spec(512, 8, 8, 4, 1408), None),
            "0.5b" => {
                let c = qwen2_shape("0.5B").expect("a published shape");
                let s = spec(
                    c.hidden_size,
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.kv_heads(),
                    c.intermediate_size,
                );
                (s, Some(c.vocab_size))
            }
            other => bail!("unknown model size {other:?} (tiny, small, medium, 0.5b)"),
        })
    }
}

impl Default for TinySpec {
    /// The spec's `tiny: {}`.
    fn default() -> Self {
        TinySpec::from(&rlt_api::spec::TinyModel::default())
    }
}

impl Qwen2Config {
    /// A config for a tiny random model over a tokenizer of `vocab_size` tokens.
    pub fn tiny(spec: &TinySpec, vocab_size: i64) -> Self {
        let mut extra = Map::new();
        extra.insert(
            "architectures".into(),
            serde_json::json!(["Qwen2ForCausalLM"]),
        );
        extra.insert("model_type".into(), "qwen2".into());
        extra.insert("hidden_act".into(), "silu".into());
        extra.insert("attention_dropout".into(), 0.0.into());
        extra.insert("initializer_range".into(), 0.02.into());
        extra.insert("use_sliding_window".into(), false.into());
        extra.insert("use_cache".into(), true.into());
        Qwen2Config {
            vocab_size,
            hidden_size: spec.hidden_size,
            intermediate_size: spec.intermediate_size,
            num_hidden_layers: spec.num_hidden_layers,
            num_attention_heads: spec.num_attention_heads,
            num_key_value_heads: Some(spec.num_key_value_heads),
            head_dim: None,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10000.0),
            tie_word_embeddings: true,
            extra,
        }
    }

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.extra
                    .get("rope_parameters")?
                    .get("rope_theta")?
                    .as_f64()
            })
            .unwrap_or(10000.0)
    }

    /// Checks the shape facts the model relies on, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ];
        for (name, v) in positive {
            if v <= 0 {
                bail!("config field `{name}` must be positive, got {v}");
            }
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "config field `hidden_size` ({}) must be divisible by `num_attention_heads` ({})",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            bail!(
                "config field `num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads,
                self.kv_heads()
            );
        }
        if self.head_dim() % 2 != 0 {
            bail!(
                "head dimension {} must be even for rotary embeddings",
                self.head_dim()
            );
        }
        if let Some(Value::String(t)) = self.extra.get("model_type") {
            if t != "qwen2" {
                bail!("config field `model_type` is {t:?}; this trainer implements \"qwen2\"");
            }
        }
        if let Some(Value::String(a)) = self.extra.get("hidden_act") {
            if a != "silu" {
                bail!("config field `hidden_act` is {a:?}; only \"silu\" is supported");
            }
        }
        Ok(())
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Qwen2Config =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    pub fn to_file(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Number of parameters of the model this config describes.
    pub fn num_parameters(&self) -> i64 {
        let (h, i, v, d) = (
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.head_dim(),
        );
        let (q, kv) = (self.num_attention_heads * d, self.kv_heads() * d);
        let attn = h * q + q + 2 * (h * kv + kv) + q * h;
        let layer = attn + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

/// The published Qwen2.5 shapes the README's table covers.
pub fn qwen2_shapes() -> Vec<(&'static str, Qwen2Config)> {
    let shape = |v: i64, h: i64, i: i64, l: i64, heads: i64, kv: i64, tied: bool| {
        serde_json::from_value::<Qwen2Config>(serde_json::json!({
            "vocab_size": v, "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": l, "num_attention_heads": heads,
            "num_key_value_heads": kv, "tie_word_embeddings": tied,
        }))
        .expect("a valid Qwen2 config")
    };
    vec![
        ("0.5B", shape(151_936, 896, 4864, 24, 14, 2, true)),
        ("1.5B", shape(151_936, 1536, 8960, 28, 12, 2, true)),
        ("7B", shape(152_064, 3584, 18_944, 28, 28, 4, false)),
        ("32B", shape(152_064, 5120, 27_648, 64, 40, 8, false)),
    ]
}

/// One of [`qwen2_shapes`] by name ("7B").
pub fn qwen2_shape(name: &str) -> Option<Qwen2Config> {
    qwen2_shapes()
        .into_iter()
        .find_map(|(n, c)| (n == name).then_some(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_config_with_rope_parameters_and_keeps_unknown_fields() {
        let text = r#"{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "model_type": "qwen2", "bos_token_id": 1}"#;
        let cfg: Qwen2Config = serde_json::from_str(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.rope_theta(), 1e6);
        assert_eq!(cfg.head_dim(), 8);
        let back: Value = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["bos_token_id"], 1);
    }

    #[test]
    fn invalid_shapes_name_the_field() {
        let mut cfg = Qwen2Config::tiny(&TinySpec::default(), 100);
        cfg.num_key_value_heads = Some(3);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        cfg.num_key_value_heads = Some(2);
        cfg.extra.insert("model_type".into(), "llama".into());
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model_type"));
    }
}
