//! Prometheus metrics: reconciles, errors, reconcile duration, reconciles in flight, runs per
//! phase, leadership, completed stages' durations, GPU-hours spent, and the process's own memory and CPU
//! (`process_*`). Runs per phase is computed from
//! the controller's cache at scrape time, so it is never stale and needs no bookkeeping on
//! deletes.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::Store;
use prometheus::{
    CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use rlt_api::stage::Stage;
use rlt_api::status::{Phase, RltRunStatus};
use rlt_api::RltRun;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounterVec,
    pub duration: Histogram,
    /// The operator's own share of a reconcile: reading its caches and deciding (the pure
    /// reconcile), without the API calls that carry the plan out.
    pub decision: Histogram,
    /// Reconciles running now (at most the controller's concurrency): a value pinned at the
    /// limit means runs are queueing for a reconcile.
    pub in_flight: IntGauge,
    pub runs: IntGaugeVec,
    /// 1 while this replica leads (reconciles), 0 while it stands by.
    pub leader: IntGauge,
    /// Wall time of each stage that completed, from its start to its completion (every
    /// attempt included), by stage.
    pub stage_duration: HistogramVec,
    /// GPU-hours of the stage attempts that ended (the runs' `status.stages.*.gpuHours`), by
    /// stage: what the fleet spent.
    pub gpu_hours: CounterVec,
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
        let decision = Histogram::with_opts(
            HistogramOpts::new(
                "rlt_operator_reconcile_decision_seconds",
                "The operator's own share of a reconcile: reading its caches and deciding, without API calls",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
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
        registry.register(Box::new(decision.clone())).unwrap();
        registry.register(Box::new(in_flight.clone())).unwrap();
        registry.register(Box::new(runs.clone())).unwrap();
        let leader = IntGauge::new(
            "rlt_operator_leader",
            "1 while this replica leads and reconciles, 0 while it stands by",
        )
        .unwrap();
        let stage_duration = HistogramVec::new(
            HistogramOpts::new(
                "rlt_operator_stage_duration_seconds",
                "Wall time of a completed stage, from its start to its completion",
            )
            .buckets(vec![
                60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0, 259200.0,
            ]),
            &["stage"],
        )
        .unwrap();
        registry.register(Box::new(leader.clone())).unwrap();
        registry.register(Box::new(stage_duration.clone())).unwrap();
        let gpu_hours = CounterVec::new(
            Opts::new(
                "rlt_operator_gpu_hours_total",
                "GPU-hours of the stage attempts that ended (GPUs held times pod running time)",
            ),
            &["stage"],
        )
        .unwrap();
        registry.register(Box::new(gpu_hours.clone())).unwrap();
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
            decision,
            in_flight,
            runs,
            leader,
            stage_duration,
            gpu_hours,
            resident_memory,
            cpu_seconds,
            store: Default::default(),
        }
    }
}

impl Metrics {
    /// Observes what a status write records: each stage it completes (absent from `old`,
    /// present in `new`) and the GPU-hours of the attempts it ends.
    pub fn observe_status_write(&self, old: Option<&RltRunStatus>, new: &RltRunStatus) {
        for stage in Stage::ALL {
            let ended = |s: Option<&RltRunStatus>| {
                s.and_then(|s| s.stages.get(stage)?.ended_attempts_gpu_hours)
                    .unwrap_or(0.0)
            };
            let spent = ended(Some(new)) - ended(old);
            if spent > 0.0 {
                self.gpu_hours
                    .with_label_values(&[stage.label()])
                    .inc_by(spent);
            }
        }
        self.observe_completed_stages(old, new);
    }

    fn observe_completed_stages(&self, old: Option<&RltRunStatus>, new: &RltRunStatus) {
        fn completed(s: Option<&RltRunStatus>, stage: Stage) -> Option<(&Time, &Time)> {
            let st = s?.stages.get(stage)?;
            Some((st.start_time.as_ref()?, st.completion_time.as_ref()?))
        }
        for stage in Stage::ALL {
            if completed(old, stage).is_some() {
                continue;
            }
            if let Some((start, end)) = completed(Some(new), stage) {
                let seconds = end.0.duration_since(start.0).as_secs_f64().max(0.0);
                self.stage_duration
                    .with_label_values(&[stage.label()])
                    .observe(seconds);
            }
        }
    }

    /// Every metric name this operator exports, labelled series or not yet (for checks of
    /// dashboards and alerts).
    pub fn names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let collectors: [&dyn Collector; 11] = [
            &self.reconciles,
            &self.errors,
            &self.duration,
            &self.decision,
            &self.in_flight,
            &self.runs,
            &self.leader,
            &self.stage_duration,
            &self.gpu_hours,
            &self.resident_memory,
            &self.cpu_seconds,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
    }

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

    #[test]
    fn a_stage_is_observed_once_when_a_status_write_completes_it() {
        use rlt_api::status::StageStatus;
        let at =
            |s: i64| Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap());
        let m = Metrics::default();
        let mut running = RltRunStatus::default();
        running.stages.warmup = Some(StageStatus {
            start_time: Some(at(0)),
            ..Default::default()
        });
        let mut done = running.clone();
        done.stages.warmup.as_mut().unwrap().completion_time = Some(at(120));
        m.observe_status_write(Some(&running), &running);
        m.observe_status_write(Some(&running), &done);
        m.observe_status_write(Some(&done), &done);
        let h = m.stage_duration.with_label_values(&["warmup"]);
        assert_eq!((h.get_sample_count(), h.get_sample_sum()), (1, 120.0));
    }

    #[test]
    fn gpu_hours_count_once_as_attempts_end() {
        use rlt_api::status::StageStatus;
        let m = Metrics::default();
        let with = |ended: Option<f64>| {
            let mut s = RltRunStatus::default();
            s.stages.rl = Some(StageStatus {
                gpu_hours: Some(9.0),
                ended_attempts_gpu_hours: ended,
                ..Default::default()
            });
            s
        };
        m.observe_status_write(None, &with(None));
        m.observe_status_write(Some(&with(None)), &with(Some(2.5)));
        m.observe_status_write(Some(&with(Some(2.5))), &with(Some(2.5)));
        m.observe_status_write(Some(&with(Some(2.5))), &with(Some(4.0)));
        assert_eq!(m.gpu_hours.with_label_values(&["rl"]).get(), 4.0);
    }
}
