//! The RL stage: the RLT reward, GRPO, and the parameter servers + learners that run it.
pub mod client;
pub mod grpo;
pub mod optim;
pub mod param_server;
pub mod reward;
pub mod shard;
pub mod wire;
