//! End-to-end tests live in `tests/`; they talk to the cluster of the current kubeconfig and
//! are `#[ignore]`d, so `cargo test` never needs one. `e2e/kind.sh` creates a kind cluster,
//! installs the chart and runs them with `--ignored`.
//!
//! [`node`] is the e2e node agent (`rlt-e2e-node`), which plays the pods of a local control
//! plane that has no kubelet.
pub mod node;
pub mod volumes;
