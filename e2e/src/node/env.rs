//! A container's environment, command and arguments, resolved as the kubelet does
//! (`$(VAR)` expansion, `valueFrom`, `envFrom`), then rewritten for a process that has no
//! mount or network namespace of its own (see the binary's documentation). Pure: the
//! ConfigMaps and Secrets referenced are fetched beforehand into [`Sources`].
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, ResourceRequirements, Secret};

use super::ip;

/// `$(VAR)` expansion with the kubelet's rules: `$$` is a literal `$`, an unknown or
/// unterminated reference is left as written.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.as_bytes()[0] {
                b'$' => {
                    out.push('$');
                    1
                }
                b'(' => match rest.find(')') {
                    Some(close) => {
                        let name = &rest[1..close];
                        match lookup(name) {
                            Some(v) => out.push_str(&v),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                _ => {
                    // The operator and the next character, kept as written.
                    let c = rest.chars().next().unwrap_or_default();
                    out.push('$');
                    out.push(c);
                    c.len_utf8()
                }
            };
            cursor += advance + 1;
            checkpoint = cursor;
        } else {
            cursor += 1;
        }
    }
    out.push_str(&input[checkpoint.min(input.len())..]);
    out
}

/// The ConfigMaps and Secrets a container's env refers to (None: not found).
#[derive(Default, Debug, Clone)]
pub struct Sources {
    pub config_maps: BTreeMap<String, Option<ConfigMap>>,
    pub secrets: BTreeMap<String, Option<Secret>>,
}

impl Sources {
    /// The names a container's env refers to: (config maps, secrets).
    pub fn wanted(c: &Container) -> (Vec<String>, Vec<String>) {
        let mut cms = Vec::new();
        let mut secrets = Vec::new();
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &e.secret_ref {
                secrets.push(r.name.clone());
            }
        }
        for e in c.env.iter().flatten() {
            let Some(from) = &e.value_from else { continue };
            if let Some(r) = &from.config_map_key_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &from.secret_key_ref {
                secrets.push(r.name.clone());
            }
        }
        cms.sort();
        cms.dedup();
        secrets.sort();
        secrets.dedup();
        (cms, secrets)
    }

    fn config_map_data(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let cm = self.config_maps.get(name)?.as_ref()?;
        let mut data = cm.data.clone().unwrap_or_default();
        for (k, v) in cm.binary_data.iter().flatten() {
            data.entry(k.clone())
                .or_insert_with(|| String::from_utf8_lossy(&v.0).into_owned());
        }
        Some(data)
    }

    fn secret_data(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let s = self.secrets.get(name)?.as_ref()?;
        let mut data: BTreeMap<String, String> = s
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
            .collect();
        for (k, v) in s.string_data.iter().flatten() {
            data.insert(k.clone(), v.clone());
        }
        Some(data)
    }
}

/// What `fieldRef` and `resourceFieldRef` read besides the pod object.
#[derive(Debug, Clone)]
pub struct FieldCtx<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Ipv4Addr,
    pub host_ip: &'a str,
    /// The node's allocatable cpu (cores) and memory (bytes): what a missing limit reads as.
    pub node_cpu: f64,
    pub node_memory: f64,
}

/// `metadata.labels['x']` -> ("labels", "x").
fn subscript(path: &str) -> Option<(&str, &str)> {
    let (head, rest) = path.split_once("['")?;
    let key = rest.strip_suffix("']")?;
    Some((head, key))
}

/// The value of a downward-API field path.
pub fn field_value(ctx: &FieldCtx, path: &str) -> Result<String> {
    let meta = &ctx.pod.metadata;
    let spec = ctx.pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => ctx.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.to_string(),
        "metadata.labels" | "metadata.annotations" => {
            let map = if path == "metadata.labels" {
                &meta.labels
            } else {
                &meta.annotations
            };
            map.iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
                .collect::<Vec<_>>()
                .join("\n")
        }
        _ => match subscript(path) {
            Some(("metadata.labels", k)) => meta
                .labels
                .as_ref()
                .and_then(|l| l.get(k).cloned())
                .unwrap_or_default(),
            Some(("metadata.annotations", k)) => meta
                .annotations
                .as_ref()
                .and_then(|l| l.get(k).cloned())
                .unwrap_or_default(),
            _ => bail!("unsupported fieldRef fieldPath {path:?}"),
        },
    })
}

/// A Kubernetes quantity as a number (`500m`, `2`, `64Gi`, `1e3`).
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    num.parse::<f64>().ok().map(|n| n * mult)
}

/// `resourceFieldRef`: limits fall back to the node's allocatable, requests to 0 (cpu: the
/// kubelet reports at least 1 after the divisor's ceiling).
pub fn resource_value(
    ctx: &FieldCtx,
    resources: Option<&ResourceRequirements>,
    resource: &str,
    divisor: Option<&str>,
) -> Result<String> {
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| anyhow!("unsupported resourceFieldRef resource {resource:?}"))?;
    let map = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => bail!("unsupported resourceFieldRef resource {resource:?}"),
    };
    let declared = map
        .and_then(|m| m.get(name))
        .and_then(|q| parse_quantity(&q.0));
    let value = match (declared, kind, name) {
        (Some(v), _, _) => v,
        (None, "limits", "cpu") => ctx.node_cpu,
        (None, "limits", "memory") => ctx.node_memory,
        (None, _, _) => 0.0,
    };
    let divisor = divisor.and_then(parse_quantity).unwrap_or(1.0);
    let mut out = (value / divisor).ceil();
    if name == "cpu" && out < 1.0 {
        out = 1.0;
    }
    Ok(format!("{}", out as i64))
}

/// The container's environment in order (later entries win), `$(VAR)` expanded; not yet
/// rewritten.
pub fn resolve_env(
    c: &Container,
    ctx: &FieldCtx,
    sources: &Sources,
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    fn set(env: &mut Vec<(String, String)>, k: String, v: String) {
        match env.iter_mut().find(|(n, _)| *n == k) {
            Some(e) => e.1 = v,
            None => env.push((k, v)),
        }
    }
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            match sources.config_map_data(&r.name) {
                Some(d) => d,
                None if r.optional == Some(true) => continue,
                None => bail!("configmap {:?} not found", r.name),
            }
        } else if let Some(r) = &from.secret_ref {
            match sources.secret_data(&r.name) {
                Some(d) => d,
                None if r.optional == Some(true) => continue,
                None => bail!("secret {:?} not found", r.name),
            }
        } else {
            continue;
        };
        for (k, v) in data {
            if !k.is_empty() && !k.contains('=') {
                set(&mut env, format!("{prefix}{k}"), v);
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_value(ctx, &f.field_path)?
            } else if let Some(r) = &from.resource_field_ref {
                resource_value(
                    ctx,
                    c.resources.as_ref(),
                    &r.resource,
                    r.divisor.as_ref().map(|d| d.0.as_str()),
                )?
            } else if let Some(r) = &from.config_map_key_ref {
                match sources
                    .config_map_data(&r.name)
                    .and_then(|d| d.get(&r.key).cloned())
                {
                    Some(v) => v,
                    None if r.optional == Some(true) => continue,
                    None => bail!("couldn't find key {} in ConfigMap {:?}", r.key, r.name),
                }
            } else if let Some(r) = &from.secret_key_ref {
                match sources
                    .secret_data(&r.name)
                    .and_then(|d| d.get(&r.key).cloned())
                {
                    Some(v) => v,
                    None if r.optional == Some(true) => continue,
                    None => bail!("couldn't find key {} in Secret {:?}", r.key, r.name),
                }
            } else {
                bail!("env {}: unsupported valueFrom", e.name)
            }
        } else {
            let raw = e.value.clone().unwrap_or_default();
            expand(&raw, |name| {
                env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
            })
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

/// `$(VAR)` expansion of command or args against the resolved environment.
pub fn expand_all(items: &[String], env: &[(String, String)]) -> Vec<String> {
    items
        .iter()
        .map(|s| {
            expand(s, |name| {
                env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
            })
        })
        .collect()
}

/// Rewrites strings handed to a process that shares the host's filesystem and network:
/// container paths under a mount to the host folder behind it, pod DNS names to pod
/// addresses, and `0.0.0.0:` to the pod's own address.
#[derive(Debug, Clone)]
pub struct Rewriter {
    /// (container path, host path), any order; the longest matching container path wins.
    pub mounts: Vec<(String, PathBuf)>,
    pub pod_ip: Ipv4Addr,
}

impl Rewriter {
    /// The mount path at the start of `rest`, if one ends there on a path boundary: (its
    /// length, host path). The longest wins.
    fn mount_at(&self, rest: &str) -> Option<(usize, &PathBuf)> {
        self.mounts
            .iter()
            .map(|(m, h)| (m.trim_end_matches('/'), h))
            .filter(|(m, _)| {
                !m.is_empty()
                    && rest.starts_with(m)
                    && rest[m.len()..]
                        .bytes()
                        .next()
                        .is_none_or(|b| b == b'/' || !continues_name(b))
            })
            .max_by_key(|(m, _)| m.len())
            .map(|(m, h)| (m.len(), h))
    }

    /// Container paths anywhere in `s` (at its start or after a separator such as a space,
    /// `=`, `:`, `,`, `;`, a quote or a redirection) become host paths: `/workspace/x`,
    /// `--config=/etc/rlt/c.yaml`, `PYTHONPATH=/a:/b`, `echo x > /dev/termination-log`.
    pub fn rewrite_paths(&self, s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = String::with_capacity(s.len());
        let (mut i, mut copied) = (0, 0);
        while i < bytes.len() {
            if bytes[i] == b'/' && (i == 0 || separates(bytes[i - 1])) {
                if let Some((len, host)) = self.mount_at(&s[i..]) {
                    out.push_str(&s[copied..i]);
                    out.push_str(&host.display().to_string());
                    i += len;
                    copied = i;
                    continue;
                }
            }
            i += 1;
        }
        out.push_str(&s[copied..]);
        out
    }

    /// One pass over a value or an argument (never applied twice to the same string).
    pub fn rewrite(&self, s: &str) -> String {
        let s = self.rewrite_paths(s);
        let s = ip::rewrite_pod_dns(&s);
        s.replace("0.0.0.0:", &format!("{}:", self.pod_ip))
    }
}

/// A byte that continues a file name (so `/workspace` is not a prefix of `/workspaces`).
fn continues_name(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._-~+@%".contains(&b)
}

/// A byte after which a path may start.
fn separates(b: u8) -> bool {
    b.is_ascii_whitespace() || b"=:,;'\"(<>|&`{[".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource,
        ObjectFieldSelector, PodSpec, ResourceFieldSelector, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::ByteString;

    fn lookup(name: &str) -> Option<String> {
        match name {
            "A" => Some("a".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        assert_eq!(expand("x$(A)y", lookup), "xay");
        assert_eq!(expand("$(A)$(A)", lookup), "aa");
        assert_eq!(expand("$(B)", lookup), "$(B)");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("$$$(A)", lookup), "$a");
        assert_eq!(expand("$(A", lookup), "$(A");
        assert_eq!(expand("a$", lookup), "a$");
        assert_eq!(expand("$x$(EMPTY)é", lookup), "$xé");
        assert_eq!(expand("$é", lookup), "$é");
        assert_eq!(expand("", lookup), "");
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(source),
            ..Default::default()
        }
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                annotations: Some(BTreeMap::from([(
                    "batch.kubernetes.io/job-completion-index".to_string(),
                    "2".to_string(),
                )])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("cpu-0".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn resolves_values_fields_and_references() {
        let pod = pod();
        let ctx = FieldCtx {
            pod: &pod,
            pod_ip: Ipv4Addr::new(127, 64, 0, 1),
            host_ip: "127.0.0.1",
            node_cpu: 16.0,
            node_memory: 64.0 * 1024f64.powi(3),
        };
        let cm = ConfigMap {
            data: Some(BTreeMap::from([
                ("K".to_string(), "kv".to_string()),
                ("OTHER".to_string(), "o".to_string()),
            ])),
            ..Default::default()
        };
        let secret = Secret {
            data: Some(BTreeMap::from([(
                "pw".to_string(),
                ByteString(b"hunter2".to_vec()),
            )])),
            ..Default::default()
        };
        let sources = Sources {
            config_maps: BTreeMap::from([("cm".to_string(), Some(cm))]),
            secrets: BTreeMap::from([("s".to_string(), Some(secret))]),
        };
        let field = |p: &str| EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: p.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = Container {
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    ..Default::default()
                }),
                prefix: Some("CM_".into()),
                ..Default::default()
            }]),
            env: Some(vec![
                from("NAME", field("metadata.name")),
                from(
                    "INDEX",
                    field("metadata.annotations['batch.kubernetes.io/job-completion-index']"),
                ),
                from("IP", field("status.podIP")),
                var("URL", "http://$(IP):80/$(NAME)/$(LATER)"),
                var("LATER", "l"),
                from(
                    "KEY",
                    EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "cm".into(),
                            key: "K".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
                from(
                    "MISSING",
                    EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "nope".into(),
                            key: "K".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    },
                ),
                from(
                    "PW",
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "s".into(),
                            key: "pw".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
                from(
                    "CPU",
                    EnvVarSource {
                        resource_field_ref: Some(ResourceFieldSelector {
                            resource: "limits.cpu".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
                var("CM_OTHER", "override"),
            ]),
            ..Default::default()
        };
        let env = resolve_env(&c, &ctx, &sources).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CM_K"), Some("kv"));
        assert_eq!(get("CM_OTHER"), Some("override"));
        assert_eq!(get("NAME"), Some("p"));
        assert_eq!(get("INDEX"), Some("2"));
        assert_eq!(get("IP"), Some("127.64.0.1"));
        assert_eq!(get("URL"), Some("http://127.64.0.1:80/p/$(LATER)"));
        assert_eq!(get("KEY"), Some("kv"));
        assert_eq!(get("MISSING"), None);
        assert_eq!(get("PW"), Some("hunter2"));
        assert_eq!(get("CPU"), Some("16"));
        assert_eq!(env[0].0, "CM_K");

        assert_eq!(
            expand_all(&["--name=$(NAME)".into(), "$$(NAME)".into()], &env),
            vec!["--name=p".to_string(), "$(NAME)".to_string()]
        );

        let bad = Container {
            env: Some(vec![from(
                "X",
                EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "cm".into(),
                        key: "absent".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )]),
            ..Default::default()
        };
        let err = resolve_env(&bad, &ctx, &sources).unwrap_err().to_string();
        assert!(err.contains("absent"), "{err}");
    }

    #[test]
    fn quantities_and_resource_fields() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("64Gi"), Some(64.0 * 1024f64.powi(3)));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("x"), None);
        let pod = pod();
        let ctx = FieldCtx {
            pod: &pod,
            pod_ip: Ipv4Addr::LOCALHOST,
            host_ip: "127.0.0.1",
            node_cpu: 16.0,
            node_memory: 1024.0,
        };
        let r = ResourceRequirements {
            limits: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("500m".into())),
                ("memory".to_string(), Quantity("1Gi".into())),
            ])),
            ..Default::default()
        };
        let v = |res: &str, div: Option<&str>| resource_value(&ctx, Some(&r), res, div).unwrap();
        assert_eq!(v("limits.cpu", None), "1");
        assert_eq!(v("limits.cpu", Some("1m")), "500");
        assert_eq!(v("limits.memory", Some("1Mi")), "1024");
        assert_eq!(v("requests.memory", None), "0");
    }

    #[test]
    fn rewrites_paths_hosts_and_wildcard_binds() {
        let ip = Ipv4Addr::new(127, 70, 1, 2);
        let rw = Rewriter {
            mounts: vec![
                ("/workspace".into(), PathBuf::from("/state/volumes/pv-1")),
                (
                    "/etc/rlt".into(),
                    PathBuf::from("/state/pods/p/volumes/config"),
                ),
                ("/etc".into(), PathBuf::from("/state/pods/p/volumes/etc")),
                ("/tmp/".into(), PathBuf::from("/state/pods/p/volumes/tmp")),
                (
                    "/dev/termination-log".into(),
                    PathBuf::from("/state/pods/p/termination-log"),
                ),
            ],
            pod_ip: ip,
        };
        assert_eq!(rw.rewrite("/workspace"), "/state/volumes/pv-1");
        assert_eq!(rw.rewrite("/workspace/a/b"), "/state/volumes/pv-1/a/b");
        assert_eq!(rw.rewrite("/workspaces"), "/workspaces");
        assert_eq!(
            rw.rewrite("/etc/rlt/config.yaml"),
            "/state/pods/p/volumes/config/config.yaml"
        );
        assert_eq!(rw.rewrite("/etc/hosts"), "/state/pods/p/volumes/etc/hosts");
        assert_eq!(rw.rewrite("/tmp"), "/state/pods/p/volumes/tmp");
        assert_eq!(
            rw.rewrite("/dev/termination-log"),
            "/state/pods/p/termination-log"
        );
        assert_eq!(
            rw.rewrite("--config=/etc/rlt/c.yaml"),
            "--config=/state/pods/p/volumes/config/c.yaml"
        );
        assert_eq!(
            rw.rewrite("x=/etc/rlt/c.yaml:/workspace"),
            "x=/state/pods/p/volumes/config/c.yaml:/state/volumes/pv-1"
        );
        assert_eq!(
            rw.rewrite("echo hi > /dev/termination-log; ls '/tmp/x'"),
            "echo hi > /state/pods/p/termination-log; ls '/state/pods/p/volumes/tmp/x'"
        );
        assert_eq!(rw.rewrite("relative/workspace"), "relative/workspace");
        assert_eq!(rw.rewrite("http://h/tmp/x"), "http://h/tmp/x");
        assert_eq!(rw.rewrite("/tmp.txt /etcetera"), "/tmp.txt /etcetera");
        assert_eq!(
            rw.rewrite("--metrics-addr=0.0.0.0:8080"),
            "--metrics-addr=127.70.1.2:8080"
        );
        let ps = ip::pod_ip("ns", "", Some("r-ps-0"), Some("r-ps"));
        assert_eq!(
            rw.rewrite("r-ps-0.r-ps.ns.svc:50051"),
            format!("{ps}:50051")
        );
    }
}
