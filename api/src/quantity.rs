//! Kubernetes resource quantities (`500m`, `2Gi`, `1e3`), parsed exactly enough to compare
//! them the way the API server does when it validates a pod's resources: requests against
//! limits, whole numbers for extended resources. Values are held in nano-units (the API
//! server's finest precision, rounding up), so `0.1` and `100m` compare equal.
use regex::Regex;
use std::sync::OnceLock;

/// A parsed quantity, in nano-units (saturating far beyond any real resource amount).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    nanos: i128,
}

const NANOS_PER_UNIT: i128 = 1_000_000_000;

fn grammar() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"^([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:([KMGTPE]i)|([numkMGTPE])|[eE]([+-]?[0-9]+))?$",
        )
        .unwrap()
    })
}

/// Whether `s` is a quantity the API server accepts (e.g. `500m`, `2Gi`, `1`).
pub fn is_quantity(s: &str) -> bool {
    grammar().is_match(s)
}

impl Quantity {
    /// Parses a quantity; `None` when `s` is not one.
    pub fn parse(s: &str) -> Option<Quantity> {
        let c = grammar().captures(s)?;
        let negative = &c[1] == "-";
        let number = &c[2];
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let digits = format!("{whole}{frac}");
        // value = digits * 10^(exp10 - frac.len()) * 2^exp2
        let (mut exp10, exp2): (i64, u32) = if let Some(bin) = c.get(3) {
            let p = match bin.as_str() {
                "Ki" => 10,
                "Mi" => 20,
                "Gi" => 30,
                "Ti" => 40,
                "Pi" => 50,
                _ => 60,
            };
            (0, p)
        } else if let Some(dec) = c.get(4) {
            let e = match dec.as_str() {
                "n" => -9,
                "u" => -6,
                "m" => -3,
                "k" => 3,
                "M" => 6,
                "G" => 9,
                "T" => 12,
                "P" => 15,
                _ => 18,
            };
            (e, 0)
        } else if let Some(e) = c.get(5) {
            (e.as_str().parse::<i64>().ok()?.clamp(-1000, 1000), 0)
        } else {
            (0, 0)
        };
        exp10 -= frac.len() as i64;
        exp10 += 9; // nano-units
        let digits = digits.trim_start_matches('0');
        let mut nanos: i128 = 0;
        let mut saturated = false;
        for d in digits.bytes() {
            nanos = match nanos
                .checked_mul(10)
                .and_then(|n| n.checked_add((d - b'0') as i128))
            {
                Some(n) => n,
                None => {
                    saturated = true;
                    // Digits past i128 only shift the magnitude.
                    exp10 += 1;
                    continue;
                }
            };
        }
        if saturated {
            nanos = i128::MAX;
        }
        let scale = |n: i128, by: i128| n.checked_mul(by).unwrap_or(i128::MAX);
        for _ in 0..exp2 {
            nanos = scale(nanos, 2);
        }
        while exp10 > 0 && nanos != 0 && nanos != i128::MAX {
            nanos = scale(nanos, 10);
            exp10 -= 1;
        }
        while exp10 < 0 && nanos != 0 {
            // Below nano precision the API server rounds up.
            let rounded_up = nanos % 10 != 0;
            nanos = nanos / 10 + rounded_up as i128;
            exp10 += 1;
        }
        Some(Quantity {
            nanos: if negative { -nanos } else { nanos },
        })
    }

    /// The amount in units (bytes for memory and storage).
    pub fn as_f64(self) -> f64 {
        self.nanos as f64 / NANOS_PER_UNIT as f64
    }

    pub fn is_negative(self) -> bool {
        self.nanos < 0
    }

    /// Whether the quantity is a whole number (extended resources must be).
    pub fn is_integer(self) -> bool {
        self.nanos % NANOS_PER_UNIT == 0
    }
}

/// Resource names the API server lets requests go below limits for (cpu, memory, ...);
/// extended resources (`nvidia.com/gpu`) and huge pages must request exactly their limit.
pub fn overcommit_allowed(resource: &str) -> bool {
    is_native(resource) && !resource.starts_with("hugepages-")
}

/// `cpu`, `memory`, ... and `*kubernetes.io/*`: the resources Kubernetes itself defines.
pub fn is_native(resource: &str) -> bool {
    !resource.contains('/') || resource.contains("kubernetes.io/")
}

/// The unprefixed resources a container may request.
pub fn is_standard_container_resource(resource: &str) -> bool {
    matches!(resource, "cpu" | "memory" | "ephemeral-storage") || resource.starts_with("hugepages-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap_or_else(|| panic!("{s} is a quantity"))
    }

    #[test]
    fn compares_like_the_api_server() {
        assert_eq!(q("100m"), q("0.1"));
        assert_eq!(q("1Gi"), q("1073741824"));
        assert_eq!(q("1k"), q("1e3"));
        assert_eq!(q("2"), q("2000m"));
        assert!(q("1Gi") > q("1G"));
        assert!(q("500Mi") < q("1Gi"));
        assert!(q("-1").is_negative());
        assert!(q("1").is_integer() && q("4e0").is_integer() && !q("1500m").is_integer());
        assert_eq!(q("1n"), q("0.0000000001")); // rounded up to a nano-unit
        assert!(q("9999999999999999999999999999999999999999Ei") > q("1E"));
        for bad in ["", "1.2.3", "Gi", "1gi", "1 Gi", "--1", "1e"] {
            assert_eq!(Quantity::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn resource_kinds() {
        assert!(overcommit_allowed("cpu") && overcommit_allowed("memory"));
        assert!(!overcommit_allowed("nvidia.com/gpu"));
        assert!(!overcommit_allowed("hugepages-2Mi"));
        assert!(is_standard_container_resource("ephemeral-storage"));
        assert!(!is_standard_container_resource("gpu"));
    }
}
