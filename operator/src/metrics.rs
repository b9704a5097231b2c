//! Prometheus metrics: reconciles, errors, reconcile duration, runs per phase. Runs per phase
//! is computed from the controller's cache at scrape time, so it is never stale and needs no
//! bookkeeping on deletes.
use kube::runtime::reflector::Store;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use rlt_api::status::Phase;
use rlt_api::RltRun;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounterVec,
    pub duration: Histogram,
    pub runs: IntGaugeVec,
    store: Arc<Mutex<Option<Store<RltRun>>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciles =
            IntCounter::new("rlt_operator_reconciles_total", "Reconciles started").unwrap();
        let errors = IntCounterVec::new(
            Opts::new(
                "rlt_operator_reconcile_errors_total",
                "Reconciles that failed",
            ),
            &["kind"],
        )
        .unwrap();
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "rlt_operator_reconcile_duration_seconds",
                "Duration of a reconcile, API calls included",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .unwrap();
        let runs = IntGaugeVec::new(
            Opts::new("rlt_operator_runs", "RltRuns per phase"),
            &["phase"],
        )
        .unwrap();
        registry.register(Box::new(reconciles.clone())).unwrap();
        registry.register(Box::new(errors.clone())).unwrap();
        registry.register(Box::new(duration.clone())).unwrap();
        registry.register(Box::new(runs.clone())).unwrap();
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            runs,
            store: Default::default(),
        }
    }
}

impl Metrics {
    pub fn set_store(&self, store: Store<RltRun>) {
        *self.store.lock().unwrap() = Some(store);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Some(store) = self.store.lock().unwrap().as_ref() {
            let mut counts = [0i64; Phase::ALL.len()];
            for run in store.state() {
                let phase = run
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or(Phase::Pending);
                counts[Phase::ALL.iter().position(|p| *p == phase).unwrap()] += 1;
            }
            for (phase, n) in Phase::ALL.iter().zip(counts) {
                self.runs.with_label_values(&[phase.as_str()]).set(n);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }
}
