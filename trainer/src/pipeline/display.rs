//! The run's state printed as `kubectl get rltruns --watch` prints it: a header once, then a
//! row on every change, with the CRD's printer columns (NAME, PHASE, STAGE PROGRESS, REWARD,
//! ATTEMPT, AGE) and kubectl's age format. Pure formatting, no I/O.
use std::time::Duration;

/// One row: what the operator would have in the run's status at this moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub phase: String,
    pub progress: String,
    pub reward: Option<f64>,
    pub attempt: u32,
    pub age: Duration,
}

/// Column widths: NAME fits the run name (at most 24 characters by the CRD), PHASE fits
/// `Distillation`, the rest fit their usual content; kubectl pads with three spaces.
fn widths(name_len: usize) -> [usize; 5] {
    [name_len.max(4) + 3, 12 + 3, 22 + 3, 8 + 3, 7 + 3]
}

pub fn header(name_len: usize) -> String {
    let w = widths(name_len);
    format!(
        "{:<a$}{:<b$}{:<c$}{:<d$}{:<e$}AGE",
        "NAME",
        "PHASE",
        "STAGE PROGRESS",
        "REWARD",
        "ATTEMPT",
        a = w[0],
        b = w[1],
        c = w[2],
        d = w[3],
        e = w[4]
    )
}

pub fn row(r: &Row) -> String {
    let w = widths(r.name.len());
    let reward = r.reward.map(format_reward).unwrap_or_default();
    format!(
        "{:<a$}{:<b$}{:<c$}{:<d$}{:<e$}{}",
        r.name,
        r.phase,
        r.progress,
        reward,
        r.attempt,
        human_duration(r.age),
        a = w[0],
        b = w[1],
        c = w[2],
        d = w[3],
        e = w[4]
    )
}

/// kubectl prints a `number` column with Go's shortest float format; four decimals keep the
/// column narrow and readable.
fn format_reward(x: f64) -> String {
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// kubectl's AGE format (`HumanDuration` of k8s.io/apimachinery): `45s`, `3m12s`, `47m`,
/// `5h3m`, `20h`, `3d4h`, `12d`, `2y30d`, `9y`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (m, h) = (s / 60, s / 3600);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        match s % 60 {
            0 => format!("{m}m"),
            rest => format!("{m}m{rest}s"),
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            rest => format!("{h}h{rest}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        match h % 24 {
            0 => format!("{}d", h / 24),
            rest => format!("{}d{rest}h", h / 24),
        }
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        let days = (h / 24) % 365;
        match days {
            0 => format!("{}y", h / 24 / 365),
            rest => format!("{}y{rest}d", h / 24 / 365),
        }
    } else {
        format!("{}y", h / 24 / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (192, "3m12s"),
            (600, "10m"),
            (47 * 60 + 5, "47m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 3 * 60, "5h3m"),
            (20 * 3600, "20h"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (12 * 86400, "12d"),
            (2 * 365 * 86400 + 30 * 86400, "2y30d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn rows_line_up_under_the_header() {
        let h = header("tiny-cpu".len());
        let r = row(&Row {
            name: "tiny-cpu".into(),
            phase: "RL".into(),
            progress: "2/3 rl 3/4".into(),
            reward: Some(-1.234567),
            attempt: 1,
            age: Duration::from_secs(75),
        });
        assert!(h.starts_with("NAME"));
        for col in ["PHASE", "STAGE PROGRESS", "REWARD", "ATTEMPT", "AGE"] {
            let at = h.find(col).unwrap();
            assert_ne!(r.as_bytes()[at], b' ', "{col} column misaligned:\n{h}\n{r}");
        }
        assert!(r.contains("-1.2346"));
        assert!(r.ends_with("75s"));
        let pending = row(&Row {
            name: "tiny-cpu".into(),
            phase: "Pending".into(),
            progress: String::new(),
            reward: None,
            attempt: 0,
            age: Duration::ZERO,
        });
        assert_eq!(
            pending.split_whitespace().collect::<Vec<_>>(),
            ["tiny-cpu", "Pending", "0", "0s"]
        );
        assert_eq!(format_reward(0.5), "0.5");
        assert_eq!(format_reward(-0.00001), "0");
    }
}
