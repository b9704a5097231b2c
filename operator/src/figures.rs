//! Reads the training figures parameter server 0 serves on `/status` while RL runs.
//! A plain HTTP/1.0 GET over TCP: one small JSON document, no client library needed.
//! Where to read them is a pure function of the run and what was observed
//! ([`children::status_url`]): the pod's IP when known, else its cluster DNS name.
use crate::children;
use crate::observe::Observed;
use rlt_api::contract::TrainingFigures;
use rlt_api::RltRun;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where figures come from: the parameter servers, or fixed values (tests, benchmarks).
#[derive(Clone)]
pub enum Figures {
    Http { timeout: Duration },
    Fixed(Option<TrainingFigures>),
}

impl Figures {
    /// Parameter server 0's figures in the run's current RL attempt, at its observed pod IP
    /// (an operator outside the cluster's DNS reaches it too), else at its DNS name.
    pub async fn read_observed(&self, run: &RltRun, obs: &Observed) -> Option<TrainingFigures> {
        match self {
            Figures::Fixed(f) => f.clone(),
            Figures::Http { timeout } => fetch(&children::status_url(run, obs), *timeout).await,
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
                student: None,
                problem: None,
                ip: Some("127.0.0.1".into()),
                deleting: false,
            }],
            ..Default::default()
        };
        let url = children::status_url(&run, &obs("r-ps-0-0"));
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
            children::status_url(&run, &obs("r-ps-0-0")),
            "http://r-ps-1-0.r-ps.ml.svc:9090/status"
        );
    }
}
