//! `/metrics`, `/healthz` and `/readyz` on one port. A minimal HTTP/1.1 responder (one
//! request per connection) keeps the operator small; these endpoints are scraped and probed,
//! nothing more.
//!
//! - `/readyz`: a standby replica (leader election on, another replica leads) is ready: it can
//!   take over, and a rolling update must be able to start it while the old leader still
//!   holds the Lease. The leader (or the only replica) is ready once every watch it reads
//!   (the runs', each child kind's, the pods', the Events') has listed, and while none has
//!   been failing for [`WATCH_READY_GRACE`]: a reconcile reads those caches, so a wedged watch
//!   (RBAC revoked, a CRD gone) makes the operator unready instead of silently stale.
//! - `/healthz`: fails (and the kubelet restarts the pod) when the controller's RltRun watch
//!   has failed for [`WATCH_FAILURE_LIMIT`] without one successful event or relist, or the
//!   cache has not synced [`SYNC_TIMEOUT`] after the controller started. A standby is live.
use crate::metrics::Metrics;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long the RltRun watch may fail without a success before the pod is unhealthy.
pub const WATCH_FAILURE_LIMIT: Duration = Duration::from_secs(300);
/// How long the first list of RltRuns may take before the pod is unhealthy.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long any watch may fail without a success before the operator is unready (a watcher
/// retries with backoff; one refused request is not yet a wedged watch).
pub const WATCH_READY_GRACE: Duration = Duration::from_secs(30);
/// The runs' own watch (the one liveness also looks at).
pub const RUNS_WATCH: &str = "rltruns";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// No API client yet, or leader election not started.
    #[default]
    Starting,
    /// Leader election is on and another replica leads.
    Standby,
    /// Reconciling (the leader, or the only replica without leader election).
    Active,
}

#[derive(Debug, Default)]
struct WatchState {
    /// The first full list is in its cache.
    synced: bool,
    failing_since: Option<Instant>,
    last_error: String,
}

#[derive(Debug, Default)]
struct State {
    role: Role,
    controller_started: Option<Instant>,
    /// Every watch the controller reads, by name (registered when it starts).
    watches: BTreeMap<&'static str, WatchState>,
}

/// What the probes report; fed by `main` (leadership) and the controller (its watches).
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
    fn watch<T>(&self, name: &'static str, f: impl FnOnce(&mut WatchState) -> T) -> T {
        self.with(|s| f(s.watches.entry(name).or_default()))
    }
    pub fn set_role(&self, role: Role) {
        self.with(|s| s.role = role)
    }
    pub fn controller_started(&self, now: Instant) {
        self.with(|s| s.controller_started = Some(now))
    }
    /// A watch the controller reads starts (not yet listed).
    pub fn watch_started(&self, name: &'static str) {
        self.watch(name, |_| ())
    }
    /// The watch's first full list is in its cache.
    pub fn synced(&self, name: &'static str) {
        self.watch(name, |w| {
            w.synced = true;
            w.failing_since = None;
        })
    }
    /// The watch produced an event (an object, or a relist).
    pub fn watch_ok(&self, name: &'static str) {
        self.watch(name, |w| w.failing_since = None)
    }
    pub fn watch_error(&self, name: &'static str, error: String, now: Instant) {
        self.watch(name, |w| {
            w.failing_since.get_or_insert(now);
            w.last_error = error;
        })
    }

    pub fn ready(&self, now: Instant) -> Result<&'static str, String> {
        self.with(|s| match s.role {
            Role::Starting => Err("starting".into()),
            Role::Standby => Ok("standby"),
            Role::Active => {
                let problems: Vec<String> = s
                    .watches
                    .iter()
                    .filter_map(|(name, w)| match w.failing_since {
                        Some(t) if now.saturating_duration_since(t) >= WATCH_READY_GRACE => {
                            Some(format!(
                                "the {name} watch has failed for {}s: {}",
                                now.saturating_duration_since(t).as_secs(),
                                w.last_error
                            ))
                        }
                        _ if !w.synced => Some(format!("the {name} watch has not listed yet")),
                        _ => None,
                    })
                    .collect();
                if s.watches.is_empty() {
                    Err("no watch started yet".into())
                } else if problems.is_empty() {
                    Ok("active")
                } else {
                    Err(problems.join("; "))
                }
            }
        })
    }

    pub fn live(&self, now: Instant) -> Result<(), String> {
        self.with(|s| {
            let runs = s.watches.get(RUNS_WATCH);
            if let Some(since) = runs.and_then(|w| w.failing_since) {
                let failing = now.saturating_duration_since(since);
                if failing > WATCH_FAILURE_LIMIT {
                    return Err(format!(
                        "the RltRun watch has failed for {}s without a success",
                        failing.as_secs()
                    ));
                }
            }
            let synced = runs.is_some_and(|w| w.synced);
            match s.controller_started {
                Some(t) if !synced && now.saturating_duration_since(t) > SYNC_TIMEOUT => {
                    Err(format!(
                        "the RltRun cache has not synced {}s after the controller started",
                        now.saturating_duration_since(t).as_secs()
                    ))
                }
                _ => Ok(()),
            }
        })
    }
}

pub async fn serve(addr: SocketAddr, metrics: Metrics, health: Health) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics /healthz /readyz");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (code, ctype, body) = route(path, &metrics, &health, Instant::now());
            let resp = format!("HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

const UNAVAILABLE: &str = "503 Service Unavailable";

fn route(
    path: &str,
    metrics: &Metrics,
    health: &Health,
    now: Instant,
) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => match health.live(now) {
            Ok(()) => ("200 OK", "text/plain", "ok\n".into()),
            Err(why) => (UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        "/readyz" => match health.ready(now) {
            Ok(what) => ("200 OK", "text/plain", format!("ready: {what}\n")),
            Err(why) => (UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::default();
        m.reconciles.inc();
        let h = Health::default();
        let now = Instant::now();
        assert!(route("/metrics", &m, &h, now)
            .2
            .contains("rlt_operator_reconciles_total 1"));
        assert_eq!(route("/healthz", &m, &h, now).0, "200 OK");
        assert_eq!(route("/readyz", &m, &h, now).0, UNAVAILABLE);
        assert_eq!(route("/nope", &m, &h, now).0, "404 Not Found");
    }

    #[test]
    fn ready_means_standby_or_active_with_every_watch_listed_and_none_failing() {
        let t0 = Instant::now();
        let h = Health::default();
        assert!(h.ready(t0).is_err(), "starting");
        h.set_role(Role::Standby);
        assert_eq!(h.ready(t0), Ok("standby"));
        h.set_role(Role::Active);
        h.controller_started(t0);
        assert!(h.ready(t0).is_err(), "leading, no watch yet");
        h.watch_started(RUNS_WATCH);
        h.watch_started("pods");
        h.synced(RUNS_WATCH);
        let why = h.ready(t0).unwrap_err();
        assert_eq!(why, "the pods watch has not listed yet");
        h.synced("pods");
        assert_eq!(h.ready(t0), Ok("active"));
        // The pods watch is refused: unready once that lasts, naming the watch and why.
        h.watch_error("pods", "403 Forbidden: pods is forbidden".into(), t0);
        assert_eq!(h.ready(t0 + WATCH_READY_GRACE / 2), Ok("active"));
        let why = h.ready(t0 + WATCH_READY_GRACE).unwrap_err();
        assert!(
            why.starts_with("the pods watch has failed for 30s: 403"),
            "{why}"
        );
        h.watch_ok("pods");
        assert_eq!(h.ready(t0 + WATCH_READY_GRACE), Ok("active"));
    }

    #[test]
    fn live_unless_the_watch_keeps_failing_or_the_cache_never_syncs() {
        let m = Metrics::default();
        let t0 = Instant::now();
        let h = Health::default();
        h.set_role(Role::Active);
        h.controller_started(t0);
        h.watch_started(RUNS_WATCH);
        assert_eq!(route("/healthz", &m, &h, t0 + SYNC_TIMEOUT / 2).0, "200 OK");
        let (code, _, why) = route("/healthz", &m, &h, t0 + SYNC_TIMEOUT * 2);
        assert_eq!(code, UNAVAILABLE);
        assert!(why.contains("not synced"), "{why}");
        h.synced(RUNS_WATCH);
        h.watch_error(RUNS_WATCH, "503".into(), t0);
        // still failing since t0
        h.watch_error(RUNS_WATCH, "503".into(), t0 + Duration::from_secs(60));
        assert_eq!(
            route("/healthz", &m, &h, t0 + Duration::from_secs(120)).0,
            "200 OK"
        );
        let late = t0 + WATCH_FAILURE_LIMIT + Duration::from_secs(1);
        assert_eq!(route("/healthz", &m, &h, late).0, UNAVAILABLE);
        h.watch_ok(RUNS_WATCH);
        assert_eq!(route("/healthz", &m, &h, late).0, "200 OK");
        // A child watch failing makes the operator unready, not unhealthy.
        h.watch_error("jobs", "403".into(), t0);
        assert_eq!(route("/healthz", &m, &h, late).0, "200 OK");
        assert_eq!(route("/readyz", &m, &h, late).0, UNAVAILABLE);
    }
}
