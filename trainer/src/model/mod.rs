//! The model and what makes one: the Qwen2 decoder, its configuration and published shapes,
//! checkpoints (safetensors + config.json), the tokenizer, and FLOP counts of a shape.
pub mod checkpoint;
pub mod config;
pub mod flops;
pub mod qwen2;
pub mod tokenizer;
