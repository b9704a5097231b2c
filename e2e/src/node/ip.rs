//! Deterministic pod IPs in 127.64.0.0/10, and rewriting of pod DNS names to them.
//!
//! A pod with `spec.hostname` and `spec.subdomain` (StatefulSet pods behind a headless
//! Service, or any pod that sets both) gets the address of (namespace, subdomain, hostname),
//! so `<hostname>.<subdomain>.<ns>.svc[.cluster.local]` maps to it before the pod exists;
//! other pods get the address of (namespace, name). Collisions are possible (22 bits) but
//! rare at e2e sizes, and only matter when two colliding pods listen on the same port.
use std::net::Ipv4Addr;

/// FNV-1a over the parts, separated by NUL so ("ab","c") and ("a","bc") differ.
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for (i, p) in parts.iter().enumerate() {
        let sep: &[u8] = if i > 0 { &[0] } else { &[] };
        for b in sep.iter().copied().chain(p.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// 127.64.0.0/10 minus the .0 and .255 host bytes: 64 * 256 * 254 addresses.
fn ip_of(parts: &[&str]) -> Ipv4Addr {
    let h = fnv(parts);
    let last = 1 + (h % 254) as u8;
    let rest = (h / 254) % (64 * 256);
    Ipv4Addr::new(127, 64 + (rest >> 8) as u8, (rest & 0xff) as u8, last)
}

/// The address of a pod.
pub fn pod_ip(
    namespace: &str,
    name: &str,
    hostname: Option<&str>,
    subdomain: Option<&str>,
) -> Ipv4Addr {
    match (hostname, subdomain) {
        (Some(h), Some(s)) if !h.is_empty() && !s.is_empty() => ip_of(&["dns", namespace, s, h]),
        _ => ip_of(&["pod", namespace, name]),
    }
}

/// The address a pod DNS name resolves to: `<hostname>.<subdomain>.<ns>.svc` or
/// `<hostname>.<subdomain>.<ns>.svc.cluster.local` (a trailing dot allowed); None otherwise.
pub fn resolve_pod_dns(host: &str) -> Option<Ipv4Addr> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let labels: Vec<&str> = host.split('.').collect();
    let head = match labels.as_slice() {
        [h, s, n, "svc"] => [*h, *s, *n],
        [h, s, n, "svc", "cluster", "local"] => [*h, *s, *n],
        _ => return None,
    };
    if head.iter().any(|l| !is_dns_label(l)) {
        return None;
    }
    let [hostname, subdomain, ns] = head;
    Some(pod_ip(ns, "", Some(hostname), Some(subdomain)))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Replaces every pod DNS name inside `s` (e.g. in `http://ps-0.ps.ns.svc:8080/x` or a
/// comma-separated address list) by its address. Host names are the maximal runs of
/// `[A-Za-z0-9.-]`.
pub fn rewrite_pod_dns(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        match resolve_pod_dns(run) {
            Some(ip) => out.push_str(&ip.to_string()),
            None => out.push_str(run),
        }
        run.clear();
    };
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let a = pod_ip("ns", "p", None, None);
        assert_eq!(a, pod_ip("ns", "p", None, None));
        assert_ne!(a, pod_ip("ns", "q", None, None));
        assert_ne!(a, pod_ip("nsp", "", None, None));
        for i in 0..2000 {
            let ip = pod_ip("ns", &format!("pod-{i}"), None, None).octets();
            assert_eq!(ip[0], 127);
            assert!((64..128).contains(&ip[1]), "{ip:?}");
            assert!(ip[3] != 0 && ip[3] != 255);
        }
    }

    #[test]
    fn hostname_and_subdomain_win_over_name() {
        let by_dns = pod_ip("ns", "ps-0", Some("ps-0"), Some("ps"));
        assert_ne!(by_dns, pod_ip("ns", "ps-0", None, None));
        assert_eq!(by_dns, pod_ip("ns", "other-name", Some("ps-0"), Some("ps")));
        assert_eq!(resolve_pod_dns("ps-0.ps.ns.svc"), Some(by_dns));
        assert_eq!(
            resolve_pod_dns("ps-0.ps.ns.svc.cluster.local."),
            Some(by_dns)
        );
        assert_eq!(resolve_pod_dns("ps.ns.svc"), None);
        assert_eq!(resolve_pod_dns("a.b.c.d"), None);
    }

    #[test]
    fn rewrites_names_inside_strings() {
        let ip0 = pod_ip("ns", "", Some("r-ps-0"), Some("r-ps"));
        let ip1 = pod_ip("ns", "", Some("r-ps-1"), Some("r-ps"));
        assert_eq!(
            rewrite_pod_dns("r-ps-0.r-ps.ns.svc:50051,r-ps-1.r-ps.ns.svc.cluster.local:50051"),
            format!("{ip0}:50051,{ip1}:50051")
        );
        assert_eq!(
            rewrite_pod_dns("http://r-ps-0.r-ps.ns.svc:8080/status"),
            format!("http://{ip0}:8080/status")
        );
        assert_eq!(
            rewrite_pod_dns("/etc/rlt/config.yaml"),
            "/etc/rlt/config.yaml"
        );
        assert_eq!(rewrite_pod_dns("my-svc.ns.svc:80"), "my-svc.ns.svc:80");
    }
}
