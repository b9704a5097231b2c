//! The `RltRun` API (group `rlt.dev`, version `v1alpha1`) and the stage contract shared by the
//! operator (which builds pods from it) and the trainer (whose `pipeline` command runs the same
//! stages as local processes). Neither side redefines anything that lives here.

pub mod contract;
pub mod layout;
