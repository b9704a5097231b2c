//! Small helpers around the API client: error codes, retries, timestamps.
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

/// The HTTP status of an API error (None: not an API answer, e.g. a connection error).
pub fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

pub fn is_not_found(e: &kube::Error) -> bool {
    code(e) == Some(404)
}

pub fn is_already_exists(e: &kube::Error) -> bool {
    code(e) == Some(409) && matches!(e, kube::Error::Api(s) if s.reason == "AlreadyExists")
}

/// A failed uid (or resourceVersion) precondition: the object is not the one meant.
pub fn is_precondition_failed(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409
        && (s.message.contains("Precondition failed") || s.message.contains("does not match the UID")))
}

/// Errors worth another try: no answer, conflicts, throttling, server errors.
pub fn is_transient(e: &kube::Error) -> bool {
    match code(e) {
        None => true,
        Some(409) => !is_precondition_failed(e),
        Some(c) => c == 429 || c >= 500,
    }
}

/// Runs `f` until it succeeds or fails with a non-transient error, at most `tries` times,
/// backing off from 200 ms.
pub async fn retry<T, F, Fut>(tries: u32, mut f: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut delay = Duration::from_millis(200);
    let mut n = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if n < tries && is_transient(&e) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32).unwrap_or(Timestamp::UNIX_EPOCH)
}

pub fn time(t: Timestamp) -> Time {
    Time(t)
}

pub fn micro_time(t: Timestamp) -> MicroTime {
    MicroTime(t)
}
