//! GPU-hours: what a stage attempt's pods held, from their GPU requests and the time from each
//! pod's start to its end (or now). Pure: the reconciler records the figures in status.
use crate::children::Stage;
use crate::observe::ObservedPod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rlt_api::status::StageStatus;

/// GPU-hours the pods of the stage's current attempt (each student's own, in distillation)
/// have held until `now`; of one student's only, when `student` is given. A pod deleted before
/// this look (an evicted pod the Job replaced) is no longer seen and not counted.
pub fn of_attempt(
    pods: &[ObservedPod],
    stage: Stage,
    st: &StageStatus,
    student: Option<&str>,
    now: &Time,
) -> f64 {
    pods.iter()
        .filter(|p| p.stage == Some(stage) && p.gpus > 0)
        .filter(|p| p.attempt == Some(st.attempt_of(p.student.as_deref())))
        .filter(|p| student.is_none() || p.student.as_deref() == student)
        .filter_map(|p| {
            let start = p.started.as_ref()?;
            let end = p.finished.as_ref().unwrap_or(now);
            let seconds = end.0.duration_since(start.0).as_secs_f64().max(0.0);
            Some(f64::from(p.gpus) * seconds / 3600.0)
        })
        .sum()
}

/// Whether a running attempt's figure has grown enough since `shown` to be written again:
/// by 0.1 GPU-hours or 1%, whichever is more, so that a large run's status is not rewritten
/// on every look while its cost stays readable.
pub fn worth_writing(shown: f64, now: f64) -> bool {
    (now - shown).abs() >= (0.01 * now).max(0.1)
}

/// GPU-hours as recorded: to the thousandth (3.6 GPU-seconds).
pub fn round(hours: f64) -> f64 {
    (hours * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + s).unwrap())
    }

    fn pod(gpus: u32, attempt: u32, started: i64, finished: Option<i64>) -> ObservedPod {
        ObservedPod {
            name: "p".into(),
            stage: Some(Stage::Rl),
            attempt: Some(attempt),
            gpus,
            started: Some(at(started)),
            finished: finished.map(at),
            ..Default::default()
        }
    }

    #[test]
    fn gpus_times_running_time_of_the_attempts_pods() {
        let pods = [
            pod(8, 1, 0, Some(1800)), // 8 GPUs for half an hour: 4
            pod(2, 1, 900, None),     // 2 GPUs from 15 min to now (1 h): 1.5
            pod(0, 1, 0, None),       // a CPU-only parameter server
            pod(8, 0, 0, Some(3600)), // an earlier attempt's
        ];
        let on = |attempt| StageStatus {
            attempt,
            ..Default::default()
        };
        let of = |stage, attempt| of_attempt(&pods, stage, &on(attempt), None, &at(3600));
        assert_eq!(of(Stage::Rl, 1), 5.5);
        assert_eq!(of(Stage::Rl, 0), 8.0);
        assert_eq!(of(Stage::Warmup, 1), 0.0);
    }

    #[test]
    fn a_student_retried_alone_is_counted_on_its_own_attempt() {
        let student = |name: &str, attempt| ObservedPod {
            stage: Some(Stage::Distillation),
            student: Some(name.into()),
            ..pod(1, attempt, 0, None)
        };
        let pods = [student("a", 0), student("b", 0), student("b", 1)];
        let mut st = StageStatus::default();
        st.next_student_attempt("b");
        let of = |student| of_attempt(&pods, Stage::Distillation, &st, student, &at(3600));
        assert_eq!(of(None), 2.0, "a's attempt 0 and b's attempt 1");
        assert_eq!(of(Some("b")), 1.0);
    }

    #[test]
    fn a_running_figure_is_rewritten_by_steps() {
        assert!(!worth_writing(0.0, 0.05));
        assert!(worth_writing(0.0, 0.1));
        assert!(!worth_writing(100.0, 100.9));
        assert!(worth_writing(100.0, 101.1));
        assert_eq!(round(1.23456), 1.235);
    }
}
