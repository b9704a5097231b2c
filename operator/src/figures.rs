//! Reads the training figures parameter server 0 serves on `/status` while RL runs.
//! A plain HTTP/1.0 GET over TCP: one small JSON document, no client library needed.
use crate::children;
use rlt_api::contract::TrainingFigures;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where figures come from: the parameter servers, or fixed values (tests, benchmarks).
#[derive(Clone)]
pub enum Figures {
    Http { timeout: Duration },
    Fixed(Option<TrainingFigures>),
}

impl Figures {
    pub async fn read(&self, run: &str, namespace: &str) -> Option<TrainingFigures> {
        match self {
            Figures::Fixed(f) => f.clone(),
            Figures::Http { timeout } => {
                let url = children::status_url(run, namespace);
                match tokio::time::timeout(*timeout, get(&url)).await {
                    Ok(Ok(f)) => Some(f),
                    Ok(Err(e)) => {
                        tracing::debug!(%url, error = %e, "training figures unavailable");
                        None
                    }
                    Err(_) => None,
                }
            }
        }
    }
}

/// GETs `http://host:port/path` and parses the JSON body.
pub async fn get(url: &str) -> anyhow::Result<TrainingFigures> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("not an http URL: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.split(':').next().unwrap_or(authority);
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
        let f = Figures::Http {
            timeout: Duration::from_millis(200),
        };
        assert_eq!(f.read("nope", "nowhere.invalid").await, None);
    }
}
