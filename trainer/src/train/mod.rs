//! Training a model on one or many ranks: AdamW and its sharding, the ranks' c10d group and
//! data-parallel update, the SFT loop every fine-tune runs (warm-up, distillation), and the
//! memory and disk preflight that sizes a stage before it loads anything.
pub mod c10d;
pub mod collective;
pub mod data_parallel;
pub mod memory;
pub mod optim;
pub mod ranks;
pub mod sft;
