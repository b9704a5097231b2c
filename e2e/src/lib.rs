//! End-to-end tests live in `tests/`; they talk to the cluster of the current kubeconfig and
//! are `#[ignore]`d, so `cargo test` never needs one. `e2e/kind.sh` creates a kind cluster,
//! installs the chart and runs them with `--ignored`.
