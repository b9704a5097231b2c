//! Tokenizers: any Hugging Face `tokenizer.json` (read with the `tokenizers` crate), and the
//! tiny byte-level tokenizer used by tiny random models, built in code so that a tiny teacher
//! and a tiny student created separately share exactly one vocabulary.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The special tokens the chat and RLT formats use. The tiny tokenizer has each as one token;
/// real Qwen2 tokenizers have the ChatML ones and spell the RLT tags as ordinary text.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const BEGIN_OF_THOUGHT: &str = "<|begin_of_thought|>";
pub const END_OF_THOUGHT: &str = "<|end_of_thought|>";
pub const BEGIN_OF_SOLUTION: &str = "<|begin_of_solution|>";
pub const END_OF_SOLUTION: &str = "<|end_of_solution|>";
pub const BEGIN_OF_EXPLANATION: &str = "<|begin_of_explanation|>";
pub const END_OF_EXPLANATION: &str = "<|end_of_explanation|>";

const CONTROL_TOKENS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];
const TAG_TOKENS: [&str; 6] = [
    BEGIN_OF_THOUGHT,
    END_OF_THOUGHT,
    BEGIN_OF_SOLUTION,
    END_OF_SOLUTION,
    BEGIN_OF_EXPLANATION,
    END_OF_EXPLANATION,
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: i64,
    eos_ids: Vec<i64>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

/// GPT-2's byte -> printable character table, the alphabet of byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut out = vec!['\0'; 256];
    for &b in &printable {
        out[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            out[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
        }
    }
    printable.clear();
    out
}

/// A token's byte range `(start, end)` in the text it was encoded from.
pub type Offsets = (usize, usize);

impl Tokenizer {
    /// The tiny tokenizer: 256 byte tokens (ids 0-255, byte-level BPE without merges, so any
    /// text encodes), then `<|endoftext|>` (256, padding), `<|im_start|>`, `<|im_end|>`, and
    /// the six thought/solution/explanation tags (259-264). Deterministic: the same file every time.
    pub fn tiny() -> Self {
        let vocab: serde_json::Map<String, Value> = byte_chars()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), json!(i)))
            .collect();
        let added: Vec<Value> = CONTROL_TOKENS
            .iter()
            .map(|t| (t, true))
            .chain(TAG_TOKENS.iter().map(|t| (t, false)))
            .enumerate()
            .map(|(i, (t, special))| {
                json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": special})
            })
            .collect();
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .expect("the tiny tokenizer spec is valid");
        Self::with_defaults(inner, None).expect("the tiny tokenizer has its special tokens")
    }

    /// Reads `tokenizer.json` from a checkpoint directory, and the pad token from
    /// `tokenizer_config.json` when present (else `<|endoftext|>`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("reading tokenizer {}: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let pad = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", cfg_path.display()))?;
            match &v["pad_token"] {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            }
        } else {
            None
        };
        Self::with_defaults(inner, pad.as_deref())
            .with_context(|| format!("tokenizer in {}", dir.display()))
    }

    fn with_defaults(inner: tokenizers::Tokenizer, pad: Option<&str>) -> Result<Self> {
        let pad_tok = pad.unwrap_or(ENDOFTEXT);
        let pad_id = inner
            .token_to_id(pad_tok)
            .ok_or_else(|| anyhow!("pad token {pad_tok:?} is not in the vocabulary"))?
            as i64;
        let eos_ids = [IM_END, ENDOFTEXT]
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .map(|i| i as i64)
            .collect();
        Ok(Tokenizer {
            inner,
            pad_id,
            eos_ids,
        })
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` that transformers' AutoTokenizer reads.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        let pad = self
            .inner
            .id_to_token(self.pad_id as u32)
            .unwrap_or_default();
        let cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": pad,
            "eos_token": if self.inner.token_to_id(IM_END).is_some() { IM_END } else { ENDOFTEXT },
            "model_max_length": 131072,
            "clean_up_tokenization_spaces": false,
        });
        let cfg_path = dir.join("tokenizer_config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)
            .with_context(|| format!("writing {}", cfg_path.display()))
    }

    /// Token ids of `text`; special-token strings in the text become their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// [`Tokenizer::encode`], and each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<i64>, Vec<Offsets>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let ids = enc.get_ids().iter().map(|&i| i as i64).collect();
        Ok((ids, enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens included (the RLT tags must survive decoding).
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, false)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Tokens that end a chat turn or a document (`<|im_end|>`, `<|endoftext|>`), when present.
    pub fn eos_ids(&self) -> &[i64] {
        &self.eos_ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// True when both map every token string to the same id (the RLT reward needs the teacher
    /// and the student to share one tokenizer).
    pub fn same_vocab(&self, other: &Tokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Checks the model's embedding table covers every token id.
    pub fn check_fits(&self, model_vocab: i64) -> Result<()> {
        if self.vocab_size() as i64 > model_vocab {
            bail!(
                "tokenizer has {} tokens but the model's vocab_size is {model_vocab}",
                self.vocab_size()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_tokenizer_round_trips_text_and_tags() {
        let tok = Tokenizer::tiny();
        let text = "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|begin_of_solution|>19 é<|end_of_solution|>";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(ids[0], tok.token_id(IM_START).unwrap());
        assert!(ids.contains(&tok.token_id(BEGIN_OF_SOLUTION).unwrap()));
        assert_eq!(tok.vocab_size(), 265);
        assert_eq!(tok.pad_id(), 256);
    }

    #[test]
    fn tiny_tokenizer_saves_and_reloads_identically() {
        let dir = std::env::temp_dir().join(format!("rlt-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = Tokenizer::tiny();
        tok.save(&dir).unwrap();
        let back = Tokenizer::from_dir(&dir).unwrap();
        assert!(back.same_vocab(&tok));
        assert_eq!(
            back.encode("a <|im_end|> b").unwrap(),
            tok.encode("a <|im_end|> b").unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
