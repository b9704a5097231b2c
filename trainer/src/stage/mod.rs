//! What every stage process shares: its command-line arguments and their stage-contract
//! fallbacks, the warm-up and generate commands, and the run configuration it reads.
pub mod cli;
pub mod runconfig;
