//! Child object names. Every name is a pure function of the run's name (at most
//! [`MAX_RUN_NAME`](rlt_api::spec::MAX_RUN_NAME) characters, a DNS label starting with a
//! letter), a student's name (at most [`MAX_STUDENT_NAME`](rlt_api::spec::MAX_STUDENT_NAME))
//! and the stage attempt (at most [`MAX_ATTEMPT_DIGITS`](rlt_api::spec::MAX_ATTEMPT_DIGITS)
//! digits), sized so that the names the API server derives from them (an Indexed Job's pod
//! hostnames `<job>-<index>`, a StatefulSet's pods `<set>-<ordinal>`) stay 63-character DNS
//! labels.
use super::Stage;

/// The configuration snapshot of one stage attempt: written once when the attempt starts, so
/// every pod of the attempt (a parameter server restarting mid-stage included) reads the same.
pub fn config_map(run: &str, stage: Stage, attempt: u32) -> String {
    format!("{run}-config-{}-{attempt}", stage.label())
}
/// The stage and attempt of a configuration snapshot of `run`, from its name.
pub fn config_map_attempt(name: &str, run: &str) -> Option<(Stage, u32)> {
    let rest = name.strip_prefix(run)?.strip_prefix("-config-")?;
    let (stage, attempt) = rest.rsplit_once('-')?;
    Some((Stage::from_label(stage)?, attempt_number(attempt)?))
}
pub fn workspace(run: &str) -> String {
    format!("{run}-workspace")
}
pub fn warmup_job(run: &str, attempt: u32) -> String {
    format!("{run}-warmup-{attempt}")
}
/// The headless Service of the parameter servers (one per run, across attempts): the
/// subdomain of every shard's DNS name.
pub fn param_servers(run: &str) -> String {
    format!("{run}-ps")
}
/// The parameter-server StatefulSet of one RL attempt. A new attempt gets a new set (never a
/// rolling update of the old one under running learners), and the old set is deleted.
pub fn param_server_set(run: &str, attempt: u32) -> String {
    format!("{run}-ps-{attempt}")
}
/// The attempt of a parameter-server StatefulSet of `run`, from its name.
pub fn param_server_set_attempt(name: &str, run: &str) -> Option<u32> {
    attempt_number(name.strip_prefix(run)?.strip_prefix("-ps-")?)
}
/// An attempt as child names end with it: decimal digits only (no sign, no blank).
fn attempt_number(digits: &str) -> Option<u32> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
/// The pod of one parameter-server shard (the StatefulSet names it `<set>-<ordinal>`).
pub fn param_server_pod(run: &str, attempt: u32, shard: u32) -> String {
    format!("{}-{shard}", param_server_set(run, attempt))
}
/// Stable DNS name of one shard: `<pod>.<headless service>.<namespace>.svc`.
pub fn param_server_host(run: &str, namespace: &str, attempt: u32, shard: u32) -> String {
    format!(
        "{}.{}.{namespace}.svc",
        param_server_pod(run, attempt, shard),
        param_servers(run)
    )
}
/// The headless Service of the data-parallel ranks of the run's warm-up and distillation
/// Jobs (their pods' subdomain): pod `i` of Job `j` is `<j>-<i>.<run>-ranks.<namespace>.svc`.
pub fn ranks(run: &str) -> String {
    format!("{run}-ranks")
}
/// The DNS name of pod `index` of a data-parallel Job under the ranks Service (pod 0's is
/// `MASTER_ADDR`).
pub fn rank_host(run: &str, namespace: &str, job: &str, index: u32) -> String {
    format!("{job}-{index}.{}.{namespace}.svc", ranks(run))
}
/// The Kueue Workload of one admission unit of a stage (RL's parameter servers and learners,
/// a warm-up's ranks, one distillation student): it spans the unit's attempts.
pub fn queue_workload(run: &str, stage: Stage, student: Option<&str>) -> String {
    match student {
        Some(s) => format!("{run}-{}-{s}", stage.label()),
        None => format!("{run}-{}", stage.label()),
    }
}
pub fn learner_job(run: &str, attempt: u32) -> String {
    format!("{run}-learner-{attempt}")
}
pub fn distill_job(run: &str, student: &str, attempt: u32) -> String {
    format!("{run}-distill-{student}-{attempt}")
}
/// `host:port` of every parameter-server shard of an attempt, in shard order.
pub fn param_server_addresses(
    run: &str,
    namespace: &str,
    attempt: u32,
    shards: u32,
    port: u16,
) -> String {
    (0..shards)
        .map(|i| format!("{}:{port}", param_server_host(run, namespace, attempt, i)))
        .collect::<Vec<_>>()
        .join(",")
}
pub fn stage_of_job(name: &str, run: &str) -> Option<Stage> {
    let rest = name.strip_prefix(run)?.strip_prefix('-')?;
    if rest.starts_with("warmup-") {
        Some(Stage::Warmup)
    } else if rest.starts_with("learner-") {
        Some(Stage::Rl)
    } else if rest.starts_with("distill-") {
        Some(Stage::Distillation)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlt_api::spec::{MAX_ATTEMPT_DIGITS, MAX_RUN_NAME, MAX_STUDENT_NAME};

    fn dns_label(s: &str) -> bool {
        s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.ends_with('-')
    }

    #[test]
    fn the_longest_names_stay_dns_labels_with_their_derived_names() {
        let run = "r".repeat(MAX_RUN_NAME);
        let student = "s".repeat(MAX_STUDENT_NAME);
        let attempt: u32 = "9".repeat(MAX_ATTEMPT_DIGITS).parse().unwrap();
        // Indexed Job pods get the hostname `<job>-<index>`; a StatefulSet's pods are
        // `<set>-<ordinal>` and carry `controller-revision-hash: <set>-<10-char hash>`.
        let derived = [
            format!("{}-0", warmup_job(&run, attempt)),
            format!("{}-1023", learner_job(&run, attempt)),
            format!("{}-255", warmup_job(&run, attempt)),
            format!("{}-255", distill_job(&run, &student, attempt)),
            param_server_pod(&run, attempt, 63),
            format!("{}-{}", param_server_set(&run, attempt), "h".repeat(10)),
            param_servers(&run),
            ranks(&run),
            workspace(&run),
            config_map(&run, Stage::Distillation, attempt),
        ];
        for name in derived {
            assert!(dns_label(&name), "{name} ({} chars)", name.len());
        }
        for label in param_server_host(&run, "ns", attempt, 63).split('.') {
            assert!(label.len() <= 63, "{label}");
        }
        let job = distill_job(&run, &student, attempt);
        for label in rank_host(&run, "ns", &job, 255).split('.') {
            assert!(label.len() <= 63, "{label}");
        }
    }

    #[test]
    fn config_snapshots_are_told_apart_by_stage_and_attempt() {
        for stage in Stage::ALL {
            let name = config_map("run", stage, 12);
            assert_eq!(config_map_attempt(&name, "run"), Some((stage, 12)));
            assert_eq!(config_map_attempt(&name, "ru"), None);
        }
        assert_eq!(config_map_attempt("run-config", "run"), None);
        assert_eq!(config_map_attempt("run-config-rl-", "run"), None);
        assert_eq!(config_map_attempt("run-config-ps-2", "run"), None);
        assert_eq!(config_map_attempt("run-2-config-rl-2", "run"), None);
    }

    #[test]
    fn param_server_sets_are_told_apart_by_attempt() {
        assert_eq!(param_server_set_attempt("run-ps-3", "run"), Some(3));
        assert_eq!(param_server_set_attempt("run-ps", "run"), None);
        assert_eq!(param_server_set_attempt("run-ps-3", "ru"), None);
        assert_eq!(param_server_set_attempt("run-2-ps-3", "run"), None);
        assert_eq!(param_server_set_attempt("run-ps-x", "run"), None);
        assert_eq!(
            param_server_addresses("run", "ml", 2, 2, 50051),
            "run-ps-2-0.run-ps.ml.svc:50051,run-ps-2-1.run-ps.ml.svc:50051"
        );
        assert_eq!(
            rank_host("run", "ml", "run-warmup-0", 1),
            "run-warmup-0-1.run-ranks.ml.svc"
        );
    }
}
