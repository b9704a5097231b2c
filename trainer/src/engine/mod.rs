//! What runs a model without training it: token log-probabilities of sequences, and
//! batched generation with a KV cache (sampling, stop tokens, groups of one prompt).
pub mod logprobs;
pub mod sampling;
