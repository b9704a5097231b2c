//! The rlt-operator: reconciles `RltRun`s into the stage graph.
//!
//! - [`reconcile`]: the pure decision logic, (run, observed children) -> (children to apply
//!   and delete, new status, events); no I/O, unit-tested per phase transition;
//! - [`children`]: the child objects of a run (ConfigMap, PVC, Jobs, StatefulSet, Service),
//!   built from the spec and the stage contract; [`observe`]: what the reconciler reads back;
//!   [`activity`]: which Job pods are alive, bad-configuration exits, `FailedCreate` Events;
//!   [`gpu_hours`]: what a stage attempt's pods held; [`kueue`]: admission of whole stages by
//!   Kueue;
//! - [`controller`]: the thin layer doing the API calls (server-side apply) around it;
//!   [`cache`]: the stores its watches fill, which a reconcile reads instead of LISTing;
//! - [`leader`], [`metrics`], [`http`], [`figures`]: leader election, Prometheus metrics,
//!   the health/metrics endpoint, the RL training figures poller;
//! - [`crdgen`]: the generated CRD files.
pub mod activity;
pub mod cache;
pub mod children;
pub mod controller;
pub mod crdgen;
pub mod figures;
pub mod gpu_hours;
pub mod http;
pub mod kueue;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod reconcile;
