//! The `RltRun` API (group `rlt.dev`, version `v1alpha1`) and the stage contract shared by the
//! operator (which builds pods from it) and the trainer (whose `pipeline` command runs the same
//! stages as local processes). Neither side redefines anything that lives here.
//!
//! - [`spec`]: the custom resource (`RltRun`, `RltRunSpec`) with its defaults and CEL rules;
//! - [`edits`]: which spec edits a run accepts once it exists (the CRD's transition rules);
//! - [`status`]: its status (conditions, phase, per-stage attempts and artifacts);
//! - [`validate`]: client-side validation with the CRD's own schema and CEL rules
//!   ([`validate::parse_yaml`] for a user's file, [`validate::validate`] for a typed run);
//! - [`stage`]: the stages in order and the words of their progress;
//! - [`contract`]: roles, env vars, ports, mounts; [`layout`]: the workspace layout;
//! - [`quantity`]: resource quantities compared as the API server compares them;
//! - [`pod_template`]: what a platform team adds to a role's pods.

pub mod contract;
pub mod edits;
pub mod layout;
pub mod pod_template;
pub mod quantity;
pub mod spec;
pub mod stage;
pub mod status;
pub mod validate;

pub use spec::{RltRun, RltRunSpec};
pub use status::RltRunStatus;
pub use validate::{parse_yaml, validate, FieldError};
