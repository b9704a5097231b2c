//! The RLT trainer: every stage process of an RltRun (warm-up, RL's parameter servers and
//! learners, distillation), in layers whose imports only go down:
//!
//! - [`model`]: the Qwen2 decoder ([`model::qwen2::Qwen2`], its KV cache), its configuration
//!   and published shapes, checkpoints, the tokenizer, FLOP counts;
//! - [`engine`]: running a model without training it: log-probabilities, batched generation;
//! - [`data`]: the data formats (question/solution rows, traces, the synthetic task);
//! - [`train`]: AdamW and its sharding, the ranks' c10d group and data-parallel update, the
//!   SFT loop, the memory and disk preflight;
//! - [`stage`]: what every stage process shares (arguments, the run configuration) and the
//!   warm-up command;
//! - [`rl`] (the RLT reward, GRPO, parameter servers and learners), [`distill`], [`eval`]
//!   (benchmark accuracy), [`pipeline`] (every stage as local processes) and [`bench`]
//!   (measurements run by hand) on top.
//!
//! Beside them, used from any layer: [`exit`] (exit codes and the termination message),
//! [`device`] (`--device` / `--dtype`), [`metrics`] (Prometheus and `/status`).
pub mod bench;
pub mod data;
pub mod device;
pub mod distill;
pub mod engine;
pub mod eval;
pub mod exit;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod rl;
pub mod stage;
pub mod train;
