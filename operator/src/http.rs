//! `/metrics`, `/healthz` and `/readyz` on one port. A minimal HTTP/1.1 responder (one
//! request per connection) keeps the operator small; these endpoints are scraped and probed,
//! nothing more.
//!
//! - `/readyz`: a standby replica (leader election on, another replica leads) is ready: it can
//!   take over, and a rolling update must be able to start it while the old leader still
//!   holds the Lease. The leader (or the only replica) is ready once its RltRun cache synced.
//! - `/healthz`: fails (and the kubelet restarts the pod) when the controller's RltRun watch
//!   has failed for [`WATCH_FAILURE_LIMIT`] without one successful event or relist, or the
//!   cache has not synced [`SYNC_TIMEOUT`] after the controller started. A standby is live.
use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long the RltRun watch may fail without a success before the pod is unhealthy.
pub const WATCH_FAILURE_LIMIT: Duration = Duration::from_secs(300);
/// How long the first list of RltRuns may take before the pod is unhealthy.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

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
struct State {
    role: Role,
    controller_started: Option<Instant>,
    synced: bool,
    watch_failing_since: Option<Instant>,
}

/// What the probes report; fed by `main` (leadership) and the controller (watch, cache).
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
    pub fn set_role(&self, role: Role) {
        self.with(|s| s.role = role)
    }
    pub fn controller_started(&self, now: Instant) {
        self.with(|s| s.controller_started = Some(now))
    }
    /// The RltRun cache holds a full list.
    pub fn synced(&self) {
        self.with(|s| s.synced = true)
    }
    /// The RltRun watch produced an event (an object, or a relist).
    pub fn watch_ok(&self) {
        self.with(|s| s.watch_failing_since = None)
    }
    pub fn watch_error(&self, now: Instant) {
        self.with(|s| {
            s.watch_failing_since.get_or_insert(now);
        })
    }

    pub fn ready(&self) -> Result<&'static str, String> {
        self.with(|s| match s.role {
            Role::Starting => Err("starting".into()),
            Role::Standby => Ok("standby"),
            Role::Active if s.synced => Ok("active"),
            Role::Active => Err("the RltRun cache has not synced yet".into()),
        })
    }

    pub fn live(&self, now: Instant) -> Result<(), String> {
        self.with(|s| {
            if let Some(since) = s.watch_failing_since {
                let failing = now.saturating_duration_since(since);
                if failing > WATCH_FAILURE_LIMIT {
                    return Err(format!(
                        "the RltRun watch has failed for {}s without a success",
                        failing.as_secs()
                    ));
                }
            }
            match s.controller_started {
                Some(t) if !s.synced && now.saturating_duration_since(t) > SYNC_TIMEOUT => {
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
        "/readyz" => match health.ready() {
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
    fn ready_means_standby_or_active_with_a_synced_cache() {
        let h = Health::default();
        assert!(h.ready().is_err(), "starting");
        h.set_role(Role::Standby);
        assert_eq!(h.ready(), Ok("standby"));
        h.set_role(Role::Active);
        h.controller_started(Instant::now());
        assert!(h.ready().is_err(), "leading, cache not synced");
        h.synced();
        assert_eq!(h.ready(), Ok("active"));
    }

    #[test]
    fn live_unless_the_watch_keeps_failing_or_the_cache_never_syncs() {
        let m = Metrics::default();
        let t0 = Instant::now();
        let h = Health::default();
        h.set_role(Role::Active);
        h.controller_started(t0);
        assert_eq!(route("/healthz", &m, &h, t0 + SYNC_TIMEOUT / 2).0, "200 OK");
        let (code, _, why) = route("/healthz", &m, &h, t0 + SYNC_TIMEOUT * 2);
        assert_eq!(code, UNAVAILABLE);
        assert!(why.contains("not synced"), "{why}");
        h.synced();
        h.watch_error(t0);
        h.watch_error(t0 + Duration::from_secs(60)); // still failing since t0
        assert_eq!(
            route("/healthz", &m, &h, t0 + Duration::from_secs(120)).0,
            "200 OK"
        );
        let late = t0 + WATCH_FAILURE_LIMIT + Duration::from_secs(1);
        assert_eq!(route("/healthz", &m, &h, late).0, UNAVAILABLE);
        h.watch_ok();
        assert_eq!(route("/healthz", &m, &h, late).0, "200 OK");
    }
}
