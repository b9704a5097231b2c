//! The RL stage: the RLT reward, GRPO, and the parameter servers + learners that run it.
//!
//! - [`reward`]: the RLT reward as pure functions on per-token log-probs and masks
//! - [`completion`]: where a teacher's explanation ends (its closing tag, found in the text)
//! - [`grpo`]: group advantages, the clipped GRPO loss, the reference model's re-sync
//! - [`rollout`]: one group of one step (sample, build student chats, score, backward)
//! - [`shard`]: which server owns what, a shard's state (the trainer's one AdamW), checkpoints
//! - [`wire`], [`param_server`], [`client`]: the gRPC parameter servers and the learner's side
//! - [`learner`]: the learner loop and the single-process equivalent ([`learner::LocalRun`])
//! - [`score`]: `rlt-trainer score`, the reward of given or sampled explanations, term by term
//! - [`cli`], [`bench`]: `rlt-trainer param-server | learner | rl-bench`
pub mod bench;
pub mod cli;
pub mod client;
pub mod completion;
pub mod grpo;
pub mod learner;
pub mod param_server;
pub mod reward;
pub mod rollout;
pub mod score;
pub mod shard;
pub mod wire;
