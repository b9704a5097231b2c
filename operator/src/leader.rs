//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can run: one
//! reconciles, the other waits. Optimistic concurrency (the Lease's resourceVersion) makes
//! takeover safe; a leader that cannot renew in time exits (the standby takes over and
//! Kubernetes restarts this pod), as controller-runtime does.
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub retry: Duration,
}

/// What to do with the Lease as observed.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No Lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Another holder let it expire (or released it): take it over.
    TakeOver,
    /// Another holder is current.
    Standby { holder: String },
}

/// The pure part: decides from the Lease and the time.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            Decision::TakeOver
        } else {
            Decision::Create
        };
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(holder) => {
            let expires = spec.renew_time.as_ref().map(|t| {
                t.0 + SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15) as i64)
            });
            match expires {
                Some(e) if e > now => Decision::Standby {
                    holder: holder.into(),
                },
                _ => Decision::TakeOver,
            }
        }
    }
}

fn held(
    settings: &LeaseSettings,
    now: Timestamp,
    prev: Option<&Lease>,
    decision: &Decision,
) -> Lease {
    let old = prev.and_then(|l| l.spec.clone()).unwrap_or_default();
    let transitions = old.lease_transitions.unwrap_or(0)
        + if *decision == Decision::TakeOver {
            1
        } else {
            0
        };
    Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            namespace: Some(settings.namespace.clone()),
            resource_version: prev.and_then(|l| l.metadata.resource_version.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(settings.identity.clone()),
            lease_duration_seconds: Some(settings.duration.as_secs() as i32),
            acquire_time: if *decision == Decision::Renew {
                old.acquire_time
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }),
    }
}

/// One round: returns whether we hold the Lease afterwards.
pub async fn try_acquire(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&settings.name).await?;
    let decision = decide(current.as_ref(), &settings.identity, now);
    let lease = held(settings, now, current.as_ref(), &decision);
    let res = match decision {
        Decision::Standby { .. } => return Ok(false),
        Decision::Create => api.create(&PostParams::default(), &lease).await,
        Decision::Renew | Decision::TakeOver => {
            api.replace(&settings.name, &PostParams::default(), &lease)
                .await
        }
    };
    match res {
        Ok(_) => Ok(true),
        // Someone else wrote it first (409 conflict / 409 already exists): not ours this round.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocks until this instance leads, then keeps renewing in the background; the returned
/// future resolves if leadership is lost (the caller exits).
pub async fn lead(
    client: Client,
    settings: LeaseSettings,
) -> impl std::future::Future<Output = ()> {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    loop {
        match try_acquire(&api, &settings).await {
            Ok(true) => break,
            Ok(false) => {
                tracing::info!(lease = %settings.name, "standing by: another replica leads")
            }
            Err(e) => tracing::warn!(error = %e, "lease"),
        }
        tokio::time::sleep(settings.retry).await;
    }
    tracing::info!(lease = %settings.name, identity = %settings.identity, "leading");
    async move {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(settings.retry).await;
            match try_acquire(&api, &settings).await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("lost the lease to another replica");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing lease"),
            }
            if last_renewal.elapsed() > settings.duration {
                tracing::error!("could not renew the lease in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::from_second(1_000_000).unwrap();
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(
            decide(Some(&lease(Some("a"), 5, 15)), "a", now),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 5, 15)), "a", now),
            Decision::Standby { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 20, 15)), "a", now),
            Decision::TakeOver
        );
        assert_eq!(
            decide(Some(&lease(None, 0, 15)), "a", now),
            Decision::TakeOver
        );
    }

    #[test]
    fn takeover_counts_a_transition_and_keeps_the_resource_version() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let s = LeaseSettings {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        };
        let prev = lease(Some("b"), 20, 15);
        let l = held(&s, now, Some(&prev), &Decision::TakeOver);
        let spec = l.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(l.metadata.resource_version.as_deref(), Some("7"));
    }
}
