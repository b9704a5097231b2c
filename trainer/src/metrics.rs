//! Prometheus `/metrics` and the JSON `/status` (latest [`TrainingFigures`]) over a minimal
//! HTTP/1.1 responder on a background thread: two GET endpoints need no web framework.
use anyhow::{Context, Result};
use prometheus::{Encoder, Registry, TextEncoder};
use rlt_api::contract::{TrainingFigures, STATUS_PATH};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// Shared state the server reads: the registry and the latest figures.
#[derive(Clone, Default)]
pub struct Published {
    pub registry: Registry,
    pub figures: Arc<Mutex<TrainingFigures>>,
}

impl Published {
    pub fn set_figures(&self, f: TrainingFigures) {
        *self.figures.lock().unwrap() = f;
    }
}

/// Binds `bind:port` (0 = any free port) and serves in a background thread; returns the
/// bound port.
pub fn serve(bind: &str, port: u16, published: Published) -> Result<u16> {
    let listener = TcpListener::bind((bind, port))
        .with_context(|| format!("binding metrics port {bind}:{port}"))?;
    let bound = listener.local_addr()?.port();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One request per connection; errors only affect that scrape.
                let _ = respond(stream, &published);
            }
        })?;
    Ok(bound)
}

fn respond(stream: TcpStream, p: &Published) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, ctype, body) = if path == "/metrics" {
        let mut buf = vec![];
        let _ = TextEncoder::new().encode(&p.registry.gather(), &mut buf);
        ("200 OK", "text/plain; version=0.0.4", buf)
    } else if path == STATUS_PATH {
        let body = serde_json::to_vec(&*p.figures.lock().unwrap()).unwrap_or_default();
        ("200 OK", "application/json", body)
    } else {
        ("404 Not Found", "text/plain", b"not found\n".to_vec())
    };
    let mut s = stream;
    write!(s, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    s.write_all(&body)?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(port: u16, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_status() {
        let p = Published::default();
        let g = prometheus::Gauge::new("rlt_test_loss", "loss").unwrap();
        p.registry.register(Box::new(g.clone())).unwrap();
        g.set(1.5);
        p.set_figures(TrainingFigures {
            step: 7,
            total_steps: 10,
            ..Default::default()
        });
        let port = serve("127.0.0.1", 0, p).unwrap();
        assert!(get(port, "/metrics").contains("rlt_test_loss 1.5"));
        assert!(get(port, "/status").contains("\"totalSteps\":10"));
        assert!(get(port, "/nope").starts_with("HTTP/1.1 404"));
    }
}
