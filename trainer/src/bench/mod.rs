//! Measurements run by hand: the SFT step and sampling beside transformers, the ranks'
//! collectives, an RL group's generation, the effect of RLT's reward, and the GPU check.
pub mod collectives;
pub mod effect;
pub mod generation;
pub mod gpu_check;
pub mod versus_transformers;
