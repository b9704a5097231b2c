//! The Node objects the agent stands in for: registration, a Lease per node renewed every
//! 10 s, the Ready heartbeat every 30 s, and removal of the not-ready/unreachable taints the
//! node lifecycle controller may have added before the first heartbeat.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::{json, Value};

use super::cli::Args;
use super::kubeapi::{self, is_already_exists, is_not_found, micro_time, now, time};

pub const POOL_LABEL: &str = "rlt.dev/e2e-pool";
pub const KUBELET_VERSION: &str = "v1.36.3";
const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_SECONDS: i32 = 40;
const LEASE_EVERY: Duration = Duration::from_secs(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);
const TAINTS_REMOVED: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

#[derive(Debug, Clone)]
pub struct NodeDef {
    pub name: String,
    pub gpus: u32,
}

pub fn definitions(args: &Args) -> Vec<NodeDef> {
    let cpu = (0..args.cpu_nodes).map(|i| NodeDef {
        name: format!("cpu-{i}"),
        gpus: 0,
    });
    let gpu = (0..args.gpu_nodes).map(|i| NodeDef {
        name: format!("gpu-{i}"),
        gpus: args.gpus_per_node,
    });
    cpu.chain(gpu).collect()
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn labels(def: &NodeDef) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), def.name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch().to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), arch().to_string()),
        (
            POOL_LABEL.to_string(),
            if def.gpus > 0 { "gpu" } else { "cpu" }.to_string(),
        ),
    ]);
    if def.gpus > 0 {
        l.insert("nvidia.com/gpu.present".into(), "true".into());
    }
    l
}

fn capacity(def: &NodeDef, args: &Args) -> Value {
    let mut c = json!({
        "cpu": args.cpu_per_node.to_string(),
        "memory": args.memory_per_node,
        "pods": args.pods_per_node.to_string(),
        "ephemeral-storage": "100Gi",
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    });
    if def.gpus > 0 {
        c["nvidia.com/gpu"] = def.gpus.to_string().into();
    }
    c
}

fn conditions(transition: &Value) -> Value {
    let at = time(now());
    let cond = |ty: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": ty,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": at,
            "lastTransitionTime": transition,
        })
    };
    json!([
        cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        cond(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        cond(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        cond(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status"
        ),
    ])
}

fn status(def: &NodeDef, args: &Args, transition: &Value) -> Value {
    let cap = capacity(def, args);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "capacity": cap,
        "allocatable": cap,
        "conditions": conditions(transition),
        "addresses": [
            { "type": "InternalIP", "address": "127.0.0.1" },
            { "type": "Hostname", "address": def.name },
        ],
        "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
        "nodeInfo": {
            "machineID": format!("rlt-e2e-{}", def.name),
            "systemUUID": format!("rlt-e2e-{}", def.name),
            "bootID": boot_id,
            "kernelVersion": kernel,
            "osImage": "rlt-e2e-node (processes on the host)",
            "containerRuntimeVersion": concat!("rlt-e2e-node://", env!("CARGO_PKG_VERSION")),
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch(),
        },
    })
}

/// Creates (or updates) every node and its status; returns the node uids by name.
pub async fn register(client: &Client, args: &Args, defs: &[NodeDef]) -> Result<Vec<Node>> {
    let api: Api<Node> = Api::all(client.clone());
    let transition = serde_json::to_value(time(now()))?;
    let mut out = Vec::new();
    for def in defs {
        let meta = json!({
            "name": def.name,
            "labels": labels(def),
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        });
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": meta,
            "spec": {},
            "status": status(def, args, &transition),
        }))?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => tracing::info!(node = %def.name, "registered"),
            Err(e) if is_already_exists(&e) => {
                api.patch(
                    &def.name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": meta })),
                )
                .await
                .with_context(|| format!("update node {}", def.name))?;
                tracing::info!(node = %def.name, "already registered; updated");
            }
            Err(e) => return Err(e).with_context(|| format!("create node {}", def.name)),
        }
        let patch = Patch::Strategic(json!({ "status": status(def, args, &transition) }));
        let pp = PatchParams::default();
        let node = kubeapi::retry(8, || api.patch_status(&def.name, &pp, &patch))
            .await
            .with_context(|| format!("node {} status", def.name))?;
        out.push(node);
    }
    Ok(out)
}

async fn renew_lease(api: &Api<Lease>, node: &Node) -> Result<(), kube::Error> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let renew = micro_time(now());
    let patch = json!({ "spec": { "holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew } });
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: name.clone(),
                        uid: node.metadata.uid.clone().unwrap_or_default(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    renew_time: Some(micro_time(now())),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Err(e) if !is_already_exists(&e) => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}

async fn heartbeat(api: &Api<Node>, node: &Node) -> Result<(), kube::Error> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let transition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.clone())
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .unwrap_or_else(|| serde_json::to_value(time(now())).unwrap_or_default());
    let patch = json!({ "status": { "conditions": conditions(&transition) } });
    api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

/// Removes the taints the node lifecycle controller puts on nodes it thinks not ready.
async fn untaint(api: &Api<Node>, name: &str) -> Result<(), kube::Error> {
    let node = api.get(name).await?;
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    if !taints
        .iter()
        .any(|t| TAINTS_REMOVED.contains(&t.key.as_str()))
    {
        return Ok(());
    }
    let kept: Vec<_> = taints
        .into_iter()
        .filter(|t| !TAINTS_REMOVED.contains(&t.key.as_str()))
        .collect();
    tracing::info!(node = %name, "removing not-ready taints");
    let patch = json!({ "spec": { "taints": kept } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Keeps the nodes alive until the task is dropped.
pub async fn keep_alive(client: Client, nodes: Vec<Node>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let api: Api<Node> = Api::all(client);
    let mut tick = tokio::time::interval(LEASE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let beats_per_heartbeat = (HEARTBEAT_EVERY.as_secs() / LEASE_EVERY.as_secs()).max(1);
    loop {
        tick.tick().await;
        for node in &nodes {
            let name = node.metadata.name.as_deref().unwrap_or_default();
            if let Err(e) = renew_lease(&leases, node).await {
                tracing::warn!(node = %name, "lease: {e}");
            }
            if n > 0 && n.is_multiple_of(beats_per_heartbeat) {
                if let Err(e) = heartbeat(&api, node).await {
                    tracing::warn!(node = %name, "heartbeat: {e}");
                }
            }
            if let Err(e) = untaint(&api, name).await {
                tracing::warn!(node = %name, "taints: {e}");
            }
        }
        n += 1;
    }
}
