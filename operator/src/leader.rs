//! Leader election on a `coordination.k8s.io/v1` Lease, so replicas (and the old and new pod
//! of a rolling update) never reconcile at the same time: one leads, the others stand by.
//! client-go's algorithm and timings:
//!
//! - optimistic concurrency (the Lease's resourceVersion) makes every write safe;
//! - another holder's expiry is judged by LOCAL time: when we first saw its current record
//!   (holder, renewTime, ...) plus its `leaseDurationSeconds`, never by comparing its
//!   `renewTime` with our clock (the clocks of two nodes may disagree by more than a lease);
//! - the leader renews every `retry` and gives up after `renew_deadline` (shorter than the
//!   lease) without a successful renewal: the process exits (as controller-runtime does), so
//!   it has stopped before any standby may take over;
//! - on a clean shutdown the leader releases the Lease, so a rolling update hands over at
//!   once instead of after a lease duration.
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a standby waits, after the Lease last changed, before taking it over.
    pub duration: Duration,
    /// How long the leader may fail to renew before it stops (shorter than `duration`).
    pub renew_deadline: Duration,
    /// How often the Lease is tried.
    pub retry: Duration,
}

impl LeaseSettings {
    /// client-go's defaults scaled down: lease 15 s, renew deadline 10 s, retry 2 s.
    pub fn new(name: String, namespace: String, identity: String) -> LeaseSettings {
        LeaseSettings {
            name,
            namespace,
            identity,
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
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

/// The part of a Lease that changes when its holder renews it.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    transitions: Option<i32>,
    duration: Option<i32>,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time,
            acquire_time: spec.acquire_time,
            transitions: spec.lease_transitions,
            duration: spec.lease_duration_seconds,
        }
    }
}

/// Remembers when (local monotonic time) the Lease's current record was first seen.
#[derive(Debug, Default)]
pub struct Observer {
    seen: Option<(Record, Instant)>,
}

impl Observer {
    /// The pure decision: from the Lease as read now, what we saw before, and local time.
    pub fn decide(&mut self, lease: Option<&Lease>, me: &str, now: Instant) -> Decision {
        let Some(lease) = lease else {
            self.seen = None;
            return Decision::Create;
        };
        let record = Record::of(lease);
        let since = match &self.seen {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.seen = Some((record.clone(), now));
                now
            }
        };
        match record.holder {
            Some(h) if h == me => Decision::Renew,
            None => Decision::TakeOver,
            Some(holder) => {
                let duration = Duration::from_secs(record.duration.unwrap_or(15).max(1) as u64);
                if now.saturating_duration_since(since) >= duration {
                    Decision::TakeOver
                } else {
                    Decision::Standby { holder }
                }
            }
        }
    }
}

/// Whether a leader whose last successful renewal was at `last_renewal` must stop.
pub fn renewal_overdue(last_renewal: Instant, now: Instant, renew_deadline: Duration) -> bool {
    now.saturating_duration_since(last_renewal) >= renew_deadline
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
pub async fn try_acquire(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&settings.name).await?;
    let decision = observer.decide(current.as_ref(), &settings.identity, Instant::now());
    let lease = held(settings, Timestamp::now(), current.as_ref(), &decision);
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
/// future resolves when leadership is lost or could not be renewed within the deadline (the
/// caller must stop reconciling at once: exit).
pub async fn lead(
    client: Client,
    settings: LeaseSettings,
) -> impl std::future::Future<Output = ()> {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let mut observer = Observer::default();
    loop {
        match try_acquire(&api, &settings, &mut observer).await {
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
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(settings.retry).await;
            // A hung request must not outlive the deadline.
            let left = settings
                .renew_deadline
                .saturating_sub(last_renewal.elapsed());
            match tokio::time::timeout(left, try_acquire(&api, &settings, &mut observer)).await {
                Ok(Ok(true)) => last_renewal = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!("lost the lease to another replica");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing lease"),
                Err(_) => tracing::warn!("renewing lease: timed out"),
            }
            if renewal_overdue(last_renewal, Instant::now(), settings.renew_deadline) {
                tracing::error!(
                    deadline_s = settings.renew_deadline.as_secs(),
                    "could not renew the lease in time"
                );
                return;
            }
        }
    }
}

/// Gives the Lease up (clean shutdown), so a standby takes over at its next try.
pub async fn release(client: Client, settings: &LeaseSettings) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&settings.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn lease(holder: Option<&str>, renew_time: Timestamp, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(renew_time)),
                ..Default::default()
            }),
        }
    }

    fn wall(secs: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + secs).unwrap()
    }

    #[test]
    fn decisions() {
        let t0 = Instant::now();
        let mut o = Observer::default();
        assert_eq!(o.decide(None, "a", t0), Decision::Create);
        assert_eq!(
            o.decide(Some(&lease(Some("a"), wall(0), 15)), "a", t0),
            Decision::Renew
        );
        assert_eq!(
            o.decide(Some(&lease(Some("b"), wall(0), 15)), "a", t0),
            Decision::Standby { holder: "b".into() }
        );
        assert_eq!(
            o.decide(Some(&lease(None, wall(0), 15)), "a", t0),
            Decision::TakeOver
        );
        assert_eq!(
            o.decide(Some(&lease(Some(""), wall(0), 15)), "a", t0),
            Decision::TakeOver,
            "released"
        );
    }

    #[test]
    fn another_holders_expiry_is_judged_by_local_time_not_its_renew_time() {
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        // Its clock runs an hour behind ours: its renewTime looks long expired, yet it renews.
        let mut o = Observer::default();
        let behind = lease(Some("b"), wall(-3600), 15);
        let standby = Decision::Standby { holder: "b".into() };
        assert_eq!(o.decide(Some(&behind), "a", t0), standby);
        assert_eq!(o.decide(Some(&behind), "a", secs(14)), standby);
        // It renewed (a new record): the wait starts again from when we saw it.
        let renewed = lease(Some("b"), wall(-3590), 15);
        assert_eq!(o.decide(Some(&renewed), "a", secs(14)), standby);
        assert_eq!(o.decide(Some(&renewed), "a", secs(28)), standby);
        // It stopped renewing: expired a lease duration after we first saw this record.
        assert_eq!(o.decide(Some(&renewed), "a", secs(29)), Decision::TakeOver);

        // Its clock runs ahead: a renewTime in our future never keeps a dead holder alive.
        let mut o = Observer::default();
        let ahead = lease(Some("b"), wall(3600), 15);
        assert_eq!(o.decide(Some(&ahead), "a", t0), standby);
        assert_eq!(o.decide(Some(&ahead), "a", secs(15)), Decision::TakeOver);
    }

    #[test]
    fn the_leader_stops_when_the_renew_deadline_passes_before_the_lease_expires() {
        let s = LeaseSettings::new("l".into(), "ns".into(), "a".into());
        assert!(s.renew_deadline < s.duration && s.retry < s.renew_deadline);
        let t0 = Instant::now();
        assert!(!renewal_overdue(
            t0,
            t0 + Duration::from_secs(9),
            s.renew_deadline
        ));
        assert!(renewal_overdue(t0, t0 + s.renew_deadline, s.renew_deadline));
        // So the old leader has stopped before a standby, which waits a whole lease duration
        // after it last saw the Lease change, may take over.
        assert!(renewal_overdue(t0, t0 + s.duration, s.renew_deadline));
    }

    #[test]
    fn takeover_counts_a_transition_and_keeps_the_resource_version() {
        let now = wall(0);
        let s = LeaseSettings::new("l".into(), "ns".into(), "a".into());
        let prev = lease(Some("b"), now - SignedDuration::from_secs(20), 15);
        let l = held(&s, now, Some(&prev), &Decision::TakeOver);
        let spec = l.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(l.metadata.resource_version.as_deref(), Some("7"));
    }
}
