//! Evaluation: benchmark files, answer extraction, answer equivalence and the JSON report.
//! Everything but [`run`] is model-free; [`run`] (`rlt-trainer eval`) feeds it completions
//! from a checkpoint.

pub mod bench;
pub mod extract;
pub mod normalize;
pub mod report;
pub mod run;

pub use bench::{load, Benchmark, Gold, Problem};
pub use report::{score, summarize, Report, Sampling};
