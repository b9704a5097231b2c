//! Service-account credentials for a pod's process: a bound token from the TokenRequest API
//! and a kubeconfig naming it, so clients authenticate as the pod's service account exactly
//! as they would in cluster.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::Client;

/// How processes reach the API server: the agent's own server and CA.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub server: String,
    pub ca_pem: Option<String>,
    pub insecure: bool,
    pub tls_server_name: Option<String>,
}

impl Cluster {
    pub fn from_config(c: &kube::Config) -> Cluster {
        let ca_pem = c.root_cert.as_ref().map(|certs| {
            certs
                .iter()
                .map(|der| {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
                    let lines: Vec<&str> = b64
                        .as_bytes()
                        .chunks(64)
                        .map(|c| std::str::from_utf8(c).unwrap_or_default())
                        .collect();
                    format!(
                        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                        lines.join("\n")
                    )
                })
                .collect::<String>()
        });
        Cluster {
            server: c.cluster_url.to_string().trim_end_matches('/').to_string(),
            ca_pem,
            insecure: c.accept_invalid_certs,
            tls_server_name: c.tls_server_name.clone(),
        }
    }
}

pub fn service_account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The pod's `automountServiceAccountToken`, else the service account's, else true.
pub fn automount(pod: &Pod, sa: Option<&ServiceAccount>) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.automount_service_account_token)
        .or_else(|| sa.and_then(|sa| sa.automount_service_account_token))
        .unwrap_or(true)
}

/// A token for the pod's service account, bound to the pod.
pub async fn request(
    client: &Client,
    pod: &Pod,
    audiences: Vec<String>,
    expiration_seconds: i64,
) -> Result<String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = service_account_name(pod);
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences,
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let answer = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("token request for serviceaccount {ns}/{sa}"))?;
    Ok(answer.status.map(|s| s.token).unwrap_or_default())
}

/// Writes a file atomically (temp file + rename), so readers never see half a token.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {}", path.display()))?;
    Ok(())
}

/// The in-cluster files (`token`, `ca.crt`, `namespace`) under `dir`, and a kubeconfig next
/// to them that reads the token file (clients re-read it, so refreshing the file is enough).
/// Returns the kubeconfig's path.
pub fn write_credentials(
    dir: &Path,
    cluster: &Cluster,
    namespace: &str,
    token: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let token_file = dir.join("token");
    write_atomic(&token_file, token.as_bytes())?;
    write_atomic(&dir.join("namespace"), namespace.as_bytes())?;
    let mut cluster_entry = serde_json::json!({ "server": cluster.server });
    if let Some(ca) = &cluster.ca_pem {
        let ca_file = dir.join("ca.crt");
        write_atomic(&ca_file, ca.as_bytes())?;
        cluster_entry["certificate-authority"] = ca_file.display().to_string().into();
    }
    if cluster.insecure {
        cluster_entry["insecure-skip-tls-verify"] = true.into();
    }
    if let Some(name) = &cluster.tls_server_name {
        cluster_entry["tls-server-name"] = name.clone().into();
    }
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "cluster", "cluster": cluster_entry }],
        "users": [{ "name": "serviceaccount", "user": { "tokenFile": token_file.display().to_string() } }],
        "contexts": [{
            "name": "pod",
            "context": { "cluster": "cluster", "user": "serviceaccount", "namespace": namespace }
        }],
        "current-context": "pod",
    });
    let path = dir.join("kubeconfig");
    write_atomic(&path, serde_yaml::to_string(&kubeconfig)?.as_bytes())?;
    Ok(path)
}
