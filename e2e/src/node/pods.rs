//! Watches the pods bound to the agent's nodes and hands each one to its own worker task.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{worker, Agent};

struct Handle {
    node: String,
    tx: watch::Sender<Option<Arc<Pod>>>,
}

/// Runs until the agent's shutdown signal, then waits (bounded) for the workers to stop
/// their processes.
pub async fn run(agent: Arc<Agent>, nodes: Vec<String>) {
    let api: Api<Pod> = Api::all(agent.client.clone());
    let streams = nodes.iter().map(|n| {
        let node = n.clone();
        watcher::watcher(
            api.clone(),
            watcher::Config::default().fields(&format!("spec.nodeName={n}")),
        )
        .default_backoff()
        .map(move |ev| (node.clone(), ev))
        .boxed()
    });
    let mut events = stream::select_all(streams);
    let mut workers: HashMap<String, Handle> = HashMap::new();
    let mut relisted: HashMap<String, HashSet<String>> = HashMap::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    let mut shutdown = agent.shutdown.clone();

    let upsert = |workers: &mut HashMap<String, Handle>,
                  tasks: &mut JoinSet<String>,
                  node: &str,
                  pod: Pod| {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let pod = Arc::new(pod);
        match workers.get(&uid) {
            Some(h) => {
                h.tx.send_replace(Some(pod));
            }
            None => {
                let (tx, rx) = watch::channel(Some(pod.clone()));
                tasks.spawn(worker::run(agent.clone(), pod, rx));
                workers.insert(
                    uid,
                    Handle {
                        node: node.to_string(),
                        tx,
                    },
                );
            }
        }
    };

    loop {
        tokio::select! {
            ev = events.next() => {
                let Some((node, ev)) = ev else { break };
                match ev {
                    Ok(Event::Apply(pod)) => upsert(&mut workers, &mut tasks, &node, pod),
                    Ok(Event::Init) => {
                        relisted.insert(node.clone(), HashSet::new());
                    }
                    Ok(Event::InitApply(pod)) => {
                        if let Some(uid) = &pod.metadata.uid {
                            relisted.entry(node.clone()).or_default().insert(uid.clone());
                        }
                        upsert(&mut workers, &mut tasks, &node, pod);
                    }
                    Ok(Event::InitDone) => {
                        let seen = relisted.remove(&node).unwrap_or_default();
                        for (uid, h) in workers.iter() {
                            if h.node == node && !seen.contains(uid) {
                                h.tx.send_replace(None);
                            }
                        }
                    }
                    Ok(Event::Delete(pod)) => {
                        if let Some(h) = pod.metadata.uid.as_ref().and_then(|u| workers.get(u)) {
                            h.tx.send_replace(None);
                        }
                    }
                    Err(e) => tracing::warn!(node = %node, "pods watch: {e}"),
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                match done {
                    Ok(uid) => { workers.remove(&uid); }
                    Err(e) => tracing::error!("pod worker panicked: {e}"),
                }
            }
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() { break }
            }
        }
    }
    // Workers see the shutdown signal and stop their processes (SIGTERM, then SIGKILL).
    let wait = agent.shutdown_grace + Duration::from_secs(5);
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(wait, all).await.is_err() {
        tracing::warn!("some pod workers did not stop in time");
    }
    drop(workers);
}
