//! End-to-end tests live in `tests/`; they talk to the cluster of the current kubeconfig and
//! are `#[ignore]`d, so `cargo test` never needs one. `scripts/dev e2e` runs them against a
//! local cluster of upstream components (e2e/local.sh), `e2e/kind.sh` against kind.
//!
//! [`volumes`] is the local cluster's default StorageClass and its hostPath provisioner
//! (`rlt-e2e-volumes`).
pub mod volumes;
