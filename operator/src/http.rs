//! `/metrics`, `/healthz` and `/readyz` on one port. A minimal HTTP/1.1 responder (one
//! request per connection) keeps the operator small; these endpoints are scraped and probed,
//! nothing more.
use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Ready once the operator has its API client and is either leading or standing by.
#[derive(Clone, Default)]
pub struct Health {
    pub ready: Arc<AtomicBool>,
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
            let (code, ctype, body) = route(path, &metrics, &health);
            let resp = format!("HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

fn route(path: &str, metrics: &Metrics, health: &Health) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if health.ready.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ready\n".into())
        }
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".into(),
        ),
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
        assert!(route("/metrics", &m, &h)
            .2
            .contains("rlt_operator_reconciles_total 1"));
        assert_eq!(route("/healthz", &m, &h).0, "200 OK");
        assert_eq!(route("/readyz", &m, &h).0, "503 Service Unavailable");
        h.ready.store(true, Ordering::Relaxed);
        assert_eq!(route("/readyz", &m, &h).0, "200 OK");
        assert_eq!(route("/nope", &m, &h).0, "404 Not Found");
    }
}
