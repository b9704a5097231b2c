//! Readiness probes against the pod's address: tcpSocket, httpGet (plain HTTP; an HTTPS or
//! gRPC probe is a TCP connect), exec (the command, in the container's environment).
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::images::find_program;

/// Where and how an exec probe runs.
#[derive(Debug, Clone)]
pub struct Target {
    pub ip: Ipv4Addr,
    pub ports: BTreeMap<String, i32>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub search: Vec<PathBuf>,
}

impl Target {
    pub fn named_ports(c: &Container) -> BTreeMap<String, i32> {
        c.ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone().map(|n| (n, p.container_port)))
            .collect()
    }

    fn port(&self, p: &IntOrString) -> Option<u16> {
        match p {
            IntOrString::Int(i) => u16::try_from(*i).ok(),
            IntOrString::String(s) => self
                .ports
                .get(s)
                .and_then(|i| u16::try_from(*i).ok())
                .or_else(|| s.parse().ok()),
        }
    }
}

async fn tcp(host: &str, port: u16) -> bool {
    TcpStream::connect((host, port)).await.is_ok()
}

async fn http(host: &str, port: u16, path: &str, headers: &[(String, String)]) -> bool {
    let Ok(mut s) = TcpStream::connect((host, port)).await else {
        return false;
    };
    let path = if path.is_empty() { "/" } else { path };
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.36\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let code: Option<u16> = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    matches!(code, Some(200..=399))
}

async fn exec(target: &Target, command: &[String]) -> bool {
    let Some((program, args)) = command.split_first() else {
        return false;
    };
    let Some(program) = find_program(program, &target.search) else {
        return false;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&target.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    matches!(cmd.status().await, Ok(s) if s.success())
}

/// One probe attempt, bounded by the probe's timeout.
pub async fn check(
    probe: &Probe,
    target: &Target,
    rewrite: &(dyn Fn(&str) -> String + Send + Sync),
) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let ip = target.ip.to_string();
    let attempt = async {
        if let Some(t) = &probe.tcp_socket {
            let host = t.host.clone().unwrap_or_else(|| ip.clone());
            match target.port(&t.port) {
                Some(p) => tcp(&host, p).await,
                None => false,
            }
        } else if let Some(h) = &probe.http_get {
            let host = h.host.clone().unwrap_or_else(|| ip.clone());
            let Some(port) = target.port(&h.port) else {
                return false;
            };
            if h.scheme.as_deref() == Some("HTTPS") {
                return tcp(&host, port).await;
            }
            let headers: Vec<(String, String)> = h
                .http_headers
                .iter()
                .flatten()
                .map(|hh| (hh.name.clone(), hh.value.clone()))
                .collect();
            http(&host, port, h.path.as_deref().unwrap_or("/"), &headers).await
        } else if let Some(e) = &probe.exec {
            let cmd: Vec<String> = e.command.iter().flatten().map(|a| rewrite(a)).collect();
            exec(target, &cmd).await
        } else if let Some(g) = &probe.grpc {
            match u16::try_from(g.port) {
                Ok(p) => tcp(&ip, p).await,
                Err(_) => false,
            }
        } else {
            true
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(false)
}

/// Runs a readiness probe for as long as the returned task lives, publishing readiness:
/// false until `successThreshold` successes in a row, then false again after
/// `failureThreshold` failures in a row.
pub fn readiness(
    probe: Probe,
    target: Target,
    rewrite: impl Fn(&str) -> String + Send + Sync + 'static,
    ready: watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        let need_ok = probe.success_threshold.unwrap_or(1).max(1);
        let need_fail = probe.failure_threshold.unwrap_or(3).max(1);
        tokio::time::sleep(delay).await;
        let (mut oks, mut fails) = (0, 0);
        loop {
            if check(&probe, &target, &rewrite).await {
                oks += 1;
                fails = 0;
                if oks >= need_ok {
                    ready.send_if_modified(|r| !std::mem::replace(r, true));
                }
            } else {
                fails += 1;
                oks = 0;
                if fails >= need_fail {
                    ready.send_if_modified(|r| std::mem::replace(r, false));
                }
            }
            tokio::time::sleep(period).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HTTPGetAction, TCPSocketAction};

    #[tokio::test]
    async fn tcp_and_http_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /ok ") {
                    "200 OK"
                } else {
                    "503 No"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let target = Target {
            ip: Ipv4Addr::LOCALHOST,
            ports: BTreeMap::from([("web".to_string(), port as i32)]),
            env: vec![],
            cwd: std::env::temp_dir(),
            search: vec![],
        };
        let id = |s: &str| s.to_string();
        let tcp_probe = |p: IntOrString| Probe {
            tcp_socket: Some(TCPSocketAction {
                port: p,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check(&tcp_probe(IntOrString::String("web".into())), &target, &id).await);
        assert!(!check(&tcp_probe(IntOrString::String("nope".into())), &target, &id).await);
        let http_probe = |path: &str| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::Int(port as i32),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check(&http_probe("/ok"), &target, &id).await);
        assert!(!check(&http_probe("/bad"), &target, &id).await);
    }
}
