//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` (or shards
//! `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`), `tokenizer.json`.
//!
//! [`CausalLm`] is a model with its variables; [`save_dir_atomically`] writes any directory
//! under a temporary name, puts the `COMPLETE` marker in it and renames it into place, so a
//! reader never sees a half-written checkpoint (the contract of `rlt_api::layout`).
use crate::model::config::{Qwen2Config, TinySpec};
use crate::model::qwen2::Qwen2;
use crate::model::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, Context, Result};
use rlt_api::layout::COMPLETE_MARKER;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Shard size used when saving (transformers' default is 5 GB; smaller shards cost nothing).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 2 << 30;

/// A Qwen2 model and the variables that hold its weights.
pub struct CausalLm {
    pub config: Qwen2Config,
    pub vs: nn::VarStore,
    pub model: Qwen2,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("config", &self.config)
            .field("kind", &self.kind())
            .finish()
    }
}

impl CausalLm {
    /// A randomly initialised model; the same (config, seed) gives the same weights.
    pub fn random(config: &Qwen2Config, seed: u64, device: Device, kind: Kind) -> Result<Self> {
        config.validate()?;
        // libtorch's generator is process-global: hold it while seeding and drawing, so
        // concurrent creations (parallel tests, threads) cannot interleave their draws.
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let cpu = {
            let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(seed as i64);
            // Initialise on the CPU in f32 so the weights do not depend on the device or dtype.
            let cpu = nn::VarStore::new(Device::Cpu);
            let _ = Qwen2::new(&cpu.root(), config);
            cpu
        };
        let mut vs = nn::VarStore::new(device);
        let model = Qwen2::new(&vs.root(), config);
        vs.copy(&cpu)?;
        vs.set_kind(kind);
        Ok(CausalLm {
            config: config.clone(),
            vs,
            model,
        })
    }

    /// A tiny random model sized by `spec` over the given tokenizer's vocabulary.
    pub fn tiny(
        spec: &TinySpec,
        tokenizer: &Tokenizer,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let vocab = (tokenizer.vocab_size() as i64 + 7) / 8 * 8;
        Self::random(&Qwen2Config::tiny(spec, vocab), spec.seed, device, kind)
    }

    /// Loads `config.json` and the safetensors weights of a checkpoint directory, converting
    /// them to `kind`. Missing, unexpected or wrongly shaped tensors are errors naming them.
    /// The variables are created in `kind` on the device: created in f32 and converted, a 7B
    /// model would need 30 GB of the device before its 15 GB of bf16 weights.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = Qwen2Config::from_file(&dir.join(CONFIG_FILE))?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = Qwen2::new(&vs.root(), &config);
        load_weights(&vs, dir, config.tie_word_embeddings)?;
        Ok(CausalLm { config, vs, model })
    }

    /// Writes `config.json` and the weights (sharded above `max_shard_bytes`) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_sharded(dir, DEFAULT_MAX_SHARD_BYTES)
    }

    pub fn save_sharded(&self, dir: &Path, max_shard_bytes: usize) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut config = self.config.clone();
        let dtype = match self.kind() {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        config.extra.insert("torch_dtype".into(), dtype.into());
        config.extra.insert("dtype".into(), dtype.into());
        config.to_file(&dir.join(CONFIG_FILE))?;
        let named: BTreeMap<String, Tensor> = self.vs.variables().into_iter().collect();
        save_weights(dir, &named, max_shard_bytes)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.vs
            .variables()
            .values()
            .next()
            .map_or(Kind::Float, |t| t.kind())
    }

    pub fn num_parameters(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }
}

/// Reads every `*.safetensors` file of a checkpoint (those the index names, or all of them)
/// into the variables of `vs`.
pub fn load_weights(vs: &nn::VarStore, dir: &Path, tied: bool) -> Result<()> {
    let files = weight_files(dir)?;
    let mut vars = vs.variables();
    let mut seen = HashMap::new();
    for file in &files {
        let tensors = Tensor::read_safetensors(file)
            .map_err(|e| anyhow!("reading {}: {e}", file.display()))?;
        for (name, t) in tensors {
            // Old checkpoints carry rotary tables; tied checkpoints may still carry the head.
            if name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight") {
                continue;
            }
            let var = vars.get_mut(&name).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{name}` is not a parameter of this Qwen2 model",
                    file.display()
                )
            })?;
            if var.size() != t.size() {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, the config implies {:?}",
                    file.display(),
                    t.size(),
                    var.size()
                );
            }
            tch::no_grad(|| var.copy_(&t.to_kind(var.kind())));
            seen.insert(name, ());
        }
    }
    let mut missing: Vec<_> = vars
        .keys()
        .filter(|k| !seen.contains_key(*k))
        .cloned()
        .collect();
    if !missing.is_empty() {
        missing.sort();
        bail!("{}: checkpoint lacks tensors {missing:?}", dir.display());
    }
    Ok(())
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .map(|f| {
                f.as_str()
                    .map(|f| dir.join(f))
                    .ok_or_else(|| anyhow!("{}: non-string file name", index.display()))
            })
            .collect::<Result<_>>()?;
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join(SINGLE_WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading checkpoint directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.is_empty() {
        bail!(
            "{}: no {SINGLE_WEIGHTS_FILE}, {WEIGHTS_INDEX_FILE} or *.safetensors",
            dir.display()
        );
    }
    files.sort();
    Ok(files)
}

/// Writes named tensors as one `model.safetensors`, or as shards plus the index when they
/// exceed `max_shard_bytes`.
pub fn save_weights(
    dir: &Path,
    named: &BTreeMap<String, Tensor>,
    max_shard_bytes: usize,
) -> Result<()> {
    let mut shards: Vec<Vec<(&String, &Tensor)>> = vec![vec![]];
    let mut size = 0usize;
    for (name, t) in named {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().push((name, t));
    }
    if shards.len() == 1 {
        return write_safetensors(&dir.join(SINGLE_WEIGHTS_FILE), &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write_safetensors(&dir.join(&file), shard)?;
        for (name, t) in shard {
            total += t.numel() * t.kind().elt_size_in_bytes();
            weight_map.insert((*name).clone(), file.clone().into());
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join(WEIGHTS_INDEX_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&index)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        k => bail!("cannot store {k:?} in safetensors"),
    })
}

/// The safetensors format (8-byte header length, JSON header, raw little-endian data), with
/// the `{"format": "pt"}` metadata transformers checks for.
pub fn write_safetensors(path: &Path, tensors: &[(&String, &Tensor)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        header.insert(
            (*name).clone(),
            json!({"dtype": dtype_name(t.kind())?, "shape": t.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
        cpu.push(t);
    }
    let mut head = serde_json::to_vec(&Value::Object(header))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for t in &cpu {
        let start = out.len();
        let n = t.numel() * t.kind().elt_size_in_bytes();
        out.resize(start + n, 0);
        t.copy_data_u8(&mut out[start..], t.numel());
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Reads named tensors from one safetensors file (e.g. optimizer state).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let v =
        Tensor::read_safetensors(path).map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
    Ok(v.into_iter().collect())
}

/// Writes a directory atomically: `fill` writes into a temporary sibling, the `COMPLETE`
/// marker goes in last, then the directory is renamed to `dir` (replacing an older one).
pub fn save_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", dir.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    fill(&tmp)?;
    std::fs::write(tmp.join(COMPLETE_MARKER), "")
        .with_context(|| format!("writing marker in {}", tmp.display()))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))
}

/// Saves a complete HF checkpoint (model + tokenizer) atomically with its `COMPLETE` marker.
pub fn save_checkpoint(dir: &Path, lm: &CausalLm, tokenizer: &Tokenizer) -> Result<()> {
    save_dir_atomically(dir, |tmp| {
        lm.save(tmp)?;
        tokenizer.save(tmp)
    })
}

/// Loads model and tokenizer from a checkpoint directory, checking they fit each other.
pub fn load_checkpoint(dir: &Path, device: Device, kind: Kind) -> Result<(CausalLm, Tokenizer)> {
    if !dir.is_dir() {
        bail!(
            "model checkpoint directory {} does not exist",
            dir.display()
        );
    }
    let lm = CausalLm::load(dir, device, kind)?;
    let tok = Tokenizer::from_dir(dir)?;
    tok.check_fits(lm.config.vocab_size)
        .with_context(|| format!("checkpoint {}", dir.display()))?;
    Ok((lm, tok))
}

/// Materialises a tiny random model + the tiny tokenizer as a checkpoint directory.
pub fn init_tiny(dir: &Path, spec: &TinySpec, kind: Kind) -> Result<()> {
    init_tiny_sharded(dir, spec, kind, DEFAULT_MAX_SHARD_BYTES)
}

/// [`init_tiny`], the weights in shards of at most `max_shard_bytes`.
pub fn init_tiny_sharded(
    dir: &Path,
    spec: &TinySpec,
    kind: Kind,
    max_shard_bytes: usize,
) -> Result<()> {
    let tok = Tokenizer::tiny();
    let lm = CausalLm::tiny(spec, &tok, Device::Cpu, kind)?;
    save_dir_atomically(dir, |tmp| {
        lm.save_sharded(tmp, max_shard_bytes)?;
        tok.save(tmp)
    })
}
