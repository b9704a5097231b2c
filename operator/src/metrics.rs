//! Prometheus metrics: reconciles, errors, reconcile duration, reconciles in flight, runs per
//! phase, and the process's own memory and CPU (`process_*`). Runs per phase is computed from
//! the controller's cache at scrape time, so it is never stale and needs no bookkeeping on
//! deletes.
use kube::runtime::reflector::Store;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
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
    /// Reconciles running now (at most the controller's concurrency): a value pinned at the
    /// limit means runs are queueing for a reconcile.
    pub in_flight: IntGauge,
    pub runs: IntGaugeVec,
    resident_memory: IntGauge,
    cpu_seconds: Gauge,
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
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .unwrap();
        let in_flight = IntGauge::new(
            "rlt_operator_reconciles_in_flight",
            "Reconciles running now",
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
        registry.register(Box::new(in_flight.clone())).unwrap();
        registry.register(Box::new(runs.clone())).unwrap();
        let resident_memory = IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
        )
        .unwrap();
        let cpu_seconds = Gauge::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds",
        )
        .unwrap();
        registry
            .register(Box::new(resident_memory.clone()))
            .unwrap();
        registry.register(Box::new(cpu_seconds.clone())).unwrap();
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            in_flight,
            runs,
            resident_memory,
            cpu_seconds,
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
        if let Some((rss, cpu)) = process_usage() {
            self.resident_memory.set(rss as i64);
            self.cpu_seconds.set(cpu);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }
}

/// This process's resident memory (bytes) and CPU time (user + system, seconds), from
/// `/proc/self` (Linux; `None` elsewhere).
fn process_usage() -> Option<(u64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // utime and stime are fields 14 and 15; the command before them may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture Kubernetes runs on.
    Some((rss_kib * 1024, ticks as f64 / 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_exposition_has_the_process_memory_and_cpu() {
        let text = Metrics::default().render();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in {text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert_eq!(value("rlt_operator_reconciles_in_flight"), 0.0);
    }
}
