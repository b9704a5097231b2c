//! The training figures parameter server 0 serves on `/status` while RL runs, read off the
//! reconcile path: a [`Poller`] polls every RL run's parameter server at its own rate and
//! bounded concurrency, keeps the latest figures, and asks for a reconcile of a run only when
//! its figures changed, so a reconcile never waits on a trainer and a run whose figures stand
//! still costs no write. The reconcile tells the poller where to look ([`Poller::track`]:
//! [`crate::children::status_url`] is a pure function of the run and what was observed) and reads
//! the latest figures from it ([`Poller::latest`]).
//!
//! A plain HTTP/1.0 GET over TCP: one small JSON document, no client library needed.
use futures::channel::mpsc;
use futures::StreamExt;
use kube::runtime::reflector::{ObjectRef, Store};
use rlt_api::contract::TrainingFigures;
use rlt_api::RltRun;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where figures come from: the parameter servers, or fixed values (tests, benchmarks).
#[derive(Clone)]
pub enum Figures {
    Http { timeout: Duration },
    Fixed(Option<TrainingFigures>),
}

struct Target {
    url: String,
    latest: Option<TrainingFigures>,
}

/// Polls the parameter servers of the runs in RL; see the module docs.
pub struct Poller {
    source: Figures,
    targets: Mutex<HashMap<ObjectRef<RltRun>, Target>>,
    changed: mpsc::UnboundedSender<ObjectRef<RltRun>>,
}

impl Poller {
    /// The poller, and the stream of runs whose figures changed (a reconcile trigger).
    pub fn new(source: Figures) -> (Poller, mpsc::UnboundedReceiver<ObjectRef<RltRun>>) {
        let (changed, receiver) = mpsc::unbounded();
        let poller = Poller {
            source,
            targets: Mutex::default(),
            changed,
        };
        (poller, receiver)
    }

    /// Polls `url` for this run from now on (`None`: stop). A new URL (a new RL attempt)
    /// starts without figures.
    pub fn track(&self, run: ObjectRef<RltRun>, url: Option<String>) {
        let mut targets = self.targets.lock().unwrap();
        match url {
            None => {
                targets.remove(&run);
            }
            Some(url) => {
                if targets.get(&run).is_none_or(|t| t.url != url) {
                    targets.insert(run, Target { url, latest: None });
                }
            }
        }
    }

    /// The run's latest figures.
    pub fn latest(&self, run: &ObjectRef<RltRun>) -> Option<TrainingFigures> {
        match &self.source {
            Figures::Fixed(f) => f.clone(),
            Figures::Http { .. } => self
                .targets
                .lock()
                .unwrap()
                .get(run)
                .and_then(|t| t.latest.clone()),
        }
    }

    /// Polls every tracked run each `every`, at most `concurrency` at once; never returns.
    /// Runs no longer in `runs` (deleted) are forgotten.
    pub async fn run(&self, runs: Store<RltRun>, every: Duration, concurrency: usize) {
        let Figures::Http { timeout } = self.source else {
            // Fixed figures need no polling.
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let due: Vec<(ObjectRef<RltRun>, String)> = {
                let mut targets = self.targets.lock().unwrap();
                targets.retain(|run, _| runs.get(run).is_some());
                targets
                    .iter()
                    .map(|(run, t)| (run.clone(), t.url.clone()))
                    .collect()
            };
            let read: Vec<_> = futures::stream::iter(due)
                .map(|(run, url)| async move {
                    let figures = fetch(&url, timeout).await;
                    (run, url, figures)
                })
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
            for (run, url, figures) in read {
                if self.record(&run, &url, figures) {
                    // The controller has stopped when nobody listens; nothing to do then.
                    let _ = self.changed.unbounded_send(run);
                }
            }
        }
    }

    /// Keeps new figures read at `url`; whether the run's figures changed. An unreachable
    /// parameter server (restarting) keeps the last figures.
    fn record(&self, run: &ObjectRef<RltRun>, url: &str, figures: Option<TrainingFigures>) -> bool {
        let mut targets = self.targets.lock().unwrap();
        match (targets.get_mut(run), figures) {
            (Some(t), Some(f)) if t.url == url && t.latest.as_ref() != Some(&f) => {
                t.latest = Some(f);
                true
            }
            _ => false,
        }
    }
}

async fn fetch(url: &str, timeout: Duration) -> Option<TrainingFigures> {
    match tokio::time::timeout(timeout, get(url)).await {
        Ok(Ok(f)) => Some(f),
        Ok(Err(e)) => {
            tracing::debug!(%url, error = %e, "training figures unavailable");
            None
        }
        Err(_) => None,
    }
}

/// GETs `http://host:port/path` and parses the JSON body.
pub async fn get(url: &str) -> anyhow::Result<TrainingFigures> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("not an http URL: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // `host:port`, or `[v6]:port`.
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n",
        if path.is_empty() { "/" } else { path }
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    stream.take(1 << 20).read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        anyhow::bail!("{status_line}");
    }
    Ok(serde_json::from_str(body.trim())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::status_url;
    use crate::observe::Observed;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn reads_figures_from_a_status_endpoint() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            assert!(String::from_utf8_lossy(&req[..n]).starts_with("GET /status HTTP/1.0"));
            let body = r#"{"step":7,"totalSteps":125,"meanReward":-0.25}"#;
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        let f = get(&format!("http://{addr}/status")).await.unwrap();
        assert_eq!(
            (f.step, f.total_steps, f.mean_reward),
            (7, 125, Some(-0.25))
        );
    }

    #[test]
    fn only_changed_figures_of_the_tracked_url_ask_for_a_reconcile() {
        let (poller, _changed) = Poller::new(Figures::Http {
            timeout: Duration::from_secs(1),
        });
        let run = ObjectRef::<RltRun>::new("r").within("ml");
        let at = |step: u64| TrainingFigures {
            step,
            total_steps: 8,
            ..Default::default()
        };
        poller.track(run.clone(), Some("http://a/status".into()));
        assert!(poller.record(&run, "http://a/status", Some(at(1))));
        assert!(
            !poller.record(&run, "http://a/status", Some(at(1))),
            "unchanged"
        );
        assert!(
            !poller.record(&run, "http://a/status", None),
            "unreachable keeps them"
        );
        assert_eq!(poller.latest(&run), Some(at(1)));
        // A new attempt's parameter server: the old figures are gone, a late read of the old
        // one is ignored.
        poller.track(run.clone(), Some("http://b/status".into()));
        assert_eq!(poller.latest(&run), None);
        assert!(!poller.record(&run, "http://a/status", Some(at(2))));
        assert!(poller.record(&run, "http://b/status", Some(at(2))));
        poller.track(run.clone(), None);
        assert_eq!(poller.latest(&run), None);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_no_figures() {
        let url = "http://nope.nowhere.invalid:9090/status";
        assert_eq!(fetch(url, Duration::from_millis(200)).await, None);
    }

    #[tokio::test]
    async fn reads_figures_at_parameter_server_0s_observed_pod_ip() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            assert!(String::from_utf8_lossy(&req[..n]).contains("Host: 127.0.0.1\r\n"));
            let body = r#"{"step":3,"totalSteps":8}"#;
            let resp = format!("HTTP/1.0 200 OK\r\n\r\n{body}");
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        // The URL is built from the observed pod IP (the metrics port is fixed by the
        // contract), so check the choice and read through `get` at the test's port.
        let mut run: RltRun = serde_json::from_value(serde_json::json!({
            "apiVersion": "rlt.dev/v1alpha1", "kind": "RltRun",
            "metadata": {"name": "r", "namespace": "ml"},
            "spec": {"image": "i", "teacher": {"tiny": {}}, "dataset": {"synthetic": {}}},
        }))
        .unwrap();
        let obs = |name: &str| Observed {
            pods: vec![crate::observe::ObservedPod {
                name: name.into(),
                stage: None,
                attempt: None,
                ip: Some("127.0.0.1".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let url = status_url(&run, &obs("r-ps-0-0"));
        assert_eq!(url, "http://127.0.0.1:9090/status");
        let f = get(&url.replace(":9090", &format!(":{port}")))
            .await
            .unwrap();
        assert_eq!((f.step, f.total_steps), (3, 8));
        // Another attempt's pod is not it: the current attempt's DNS name is the fallback.
        run.status = Some(
            serde_json::from_value(serde_json::json!({"stages": {"rl": {"attempt": 1}}})).unwrap(),
        );
        assert_eq!(
            status_url(&run, &obs("r-ps-0-0")),
            "http://r-ps-1-0.r-ps.ml.svc:9090/status"
        );
    }
}
