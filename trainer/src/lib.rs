//! The RLT trainer core: a tch (libtorch) Qwen2 model that loads and saves Hugging Face
//! checkpoints, a batched KV-cache sampler, the data formats, and the warm-up (SFT) stage.
//!
//! Stable public API (other roles build on it; changes stay additive):
//! - [`config::Qwen2Config`], [`config::TinySpec`]
//! - [`model::Qwen2`] (`forward(ids, mask, cache) -> logits`, `forward_hidden`, `lm_logits`), [`model::KvCache`]
//! - [`checkpoint::CausalLm`] (`random`, `tiny`, `load`, `save`), [`checkpoint::save_checkpoint`],
//!   [`checkpoint::load_checkpoint`], [`checkpoint::save_dir_atomically`], [`checkpoint::init_tiny`]
//! - [`tokenizer::Tokenizer`] (`tiny`, `from_dir`, `save`, `encode`, `decode`, `pad_id`, `eos_ids`)
//! - [`sampling::generate`] -> [`sampling::Generation`] (tokens, sampling log-probs, masks)
//! - [`logprobs`]: per-token log-probs of given targets, completion NLL
//! - [`device`]: `--device` / `--dtype` parsing
//! - [`rl`]: the RL stage (RLT reward, GRPO, parameter servers and learners)
//! - [`distill`]: the distillation stage; [`eval`]: benchmark accuracy
//! - [`runconfig`]: the run configuration (`RLT_CONFIG`) as each role's flags
//! - [`pipeline`]: every stage as local processes; [`bench_effect`]: what RL buys
//! - [`exit`]: exit codes and the termination message of a failed role
pub mod bench;
pub mod bench_collectives;
pub mod bench_effect;
pub mod bench_generation;
pub mod c10d;
pub mod checkpoint;
pub mod cli;
pub mod collective;
pub mod config;
pub mod data;
pub mod data_parallel;
pub mod device;
pub mod distill;
pub mod eval;
pub mod exit;
pub mod flops;
pub mod gpu_check;
pub mod logprobs;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod ranks;
pub mod rl;
pub mod runconfig;
pub mod sampling;
pub mod sft;
pub mod tokenizer;
