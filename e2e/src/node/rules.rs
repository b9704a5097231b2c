//! Fault-injection rules: the ConfigMap `kube-system/rlt-e2e-node-rules`, key `rules.yaml`,
//! a YAML list evaluated in order (first match wins) at every start of a container:
//!
//! ```yaml
//! - selector: "rlt.dev/run=oom-run,rlt.dev/role=learner"  # label selector (=, ==, !=, k, !k, in, notin)
//!   namespace: e2e-faults   # optional
//!   container: trainer      # optional; without it the rule applies to the pod's first container only
//!   action: oomkill         # run | simulate | fail | oomkill
//!   after: 2s               # simulate/fail/oomkill: how long the container runs first
//!   exitCode: 3             # fail (default 1); simulate (default 0)
//!   message: "boom"         # fail: the termination message
//! ```
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

pub const CONFIG_MAP: &str = "rlt-e2e-node-rules";
pub const NAMESPACE: &str = "kube-system";
pub const KEY: &str = "rules.yaml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Run,
    Simulate,
    Fail,
    Oomkill,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub container: Option<String>,
    pub action: Action,
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub message: Option<String>,
}

/// `2s`, `500ms`, `1m`, `1h`, `1m30s`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Ok(Duration::from_secs_f64(secs.max(0.0)));
    }
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| anyhow!("duration {s:?}: missing unit"))?;
        let (num, tail) = rest.split_at(num_end);
        let num: f64 = num.parse().with_context(|| format!("duration {s:?}"))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        total += num
            * match unit {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => bail!("duration {s:?}: unknown unit {unit:?}"),
            };
        rest = tail;
    }
    Ok(Duration::from_secs_f64(total))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A label selector in the `kubectl -l` syntax.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Term>);

impl Selector {
    pub fn parse(s: &str) -> Result<Selector> {
        // Split on commas outside parentheses.
        let mut parts = Vec::new();
        let mut depth = 0;
        let mut cur = String::new();
        for c in s.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(std::mem::take(&mut cur));
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        parts.push(cur);
        let mut terms = Vec::new();
        for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            terms.push(Self::term(p).with_context(|| format!("selector {s:?}"))?);
        }
        Ok(Selector(terms))
    }

    fn term(p: &str) -> Result<Term> {
        let set = |rest: &str| -> Result<Vec<String>> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| anyhow!("{p:?}: expected (a,b)"))?;
            Ok(inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect())
        };
        if let Some(k) = p.strip_prefix('!') {
            return Ok(Term::Absent(k.trim().to_string()));
        }
        if let Some((k, v)) = p.split_once("!=") {
            return Ok(Term::Ne(k.trim().into(), v.trim().into()));
        }
        if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            return Ok(Term::Eq(k.trim().into(), v.trim().into()));
        }
        let words: Vec<&str> = p.splitn(2, char::is_whitespace).collect();
        if let [k, rest] = words.as_slice() {
            let rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix("notin") {
                return Ok(Term::NotIn(k.to_string(), set(r)?));
            }
            if let Some(r) = rest.strip_prefix("in") {
                return Ok(Term::In(k.to_string(), set(r)?));
            }
            bail!("{p:?}: unknown operator");
        }
        Ok(Term::Exists(p.to_string()))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
            Term::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
        })
    }
}

/// How a container ends when a rule says so.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Terminated Error with this exit code and termination message, without a process.
    Fail { code: i32, message: Option<String> },
    /// Terminated OOMKilled, exit code 137 (a real process is SIGKILLed in run mode).
    OomKill,
}

/// What to do with one start of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Run a real process (run mode) or none (simulate mode).
    pub process: bool,
    /// When the container ends by itself (simulated) or is ended (fault).
    pub after: Duration,
    /// The exit code of a simulated container that ends by itself.
    pub exit_code: i32,
    pub fault: Option<Fault>,
}

/// The parsed rules (a bad document is an error; the caller logs it and runs without).
pub fn parse(yaml: &str) -> Result<Vec<Rule>> {
    if yaml.trim().is_empty() {
        return Ok(Vec::new());
    }
    let rules: Option<Vec<Rule>> = serde_yaml::from_str(yaml).context("rules.yaml")?;
    let rules = rules.unwrap_or_default();
    for r in &rules {
        if let Some(s) = &r.selector {
            Selector::parse(s)?;
        }
        if let Some(a) = &r.after {
            parse_duration(a)?;
        }
    }
    Ok(rules)
}

/// Who is starting.
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub container: &'a str,
    /// The pod's first (app) container: rules without `container` apply to it only.
    pub main: bool,
}

/// The first matching rule, applied to the agent's default mode (`process`: run mode).
pub fn plan(rules: &[Rule], who: &Subject, process: bool, simulate_for: Duration) -> Plan {
    let mut plan = Plan {
        process,
        after: simulate_for,
        exit_code: 0,
        fault: None,
    };
    let rule = rules.iter().find(|r| {
        r.namespace.as_deref().is_none_or(|n| n == who.namespace)
            && match &r.container {
                Some(c) => c == who.container,
                None => who.main,
            }
            && r.selector.as_deref().is_none_or(|s| {
                Selector::parse(s)
                    .map(|sel| sel.matches(who.labels))
                    .unwrap_or(false)
            })
    });
    let Some(rule) = rule else { return plan };
    let after = rule.after.as_deref().and_then(|a| parse_duration(a).ok());
    match rule.action {
        Action::Run => plan.process = true,
        Action::Simulate => {
            plan.process = false;
            plan.after = after.unwrap_or(simulate_for);
            plan.exit_code = rule.exit_code.unwrap_or(0);
        }
        Action::Fail => {
            plan.process = false;
            plan.after = after.unwrap_or_default();
            plan.fault = Some(Fault::Fail {
                code: rule.exit_code.unwrap_or(1),
                message: rule.message.clone(),
            });
        }
        Action::Oomkill => {
            plan.after = after.unwrap_or_default();
            plan.fault = Some(Fault::OomKill);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3x").is_err());
    }

    #[test]
    fn selectors() {
        let l = labels(&[("rlt.dev/run", "oom"), ("rlt.dev/role", "learner")]);
        let m = |s: &str| Selector::parse(s).unwrap().matches(&l);
        assert!(m("rlt.dev/run=oom,rlt.dev/role=learner"));
        assert!(m("rlt.dev/run==oom"));
        assert!(!m("rlt.dev/run=oom,rlt.dev/role=warmup"));
        assert!(m("rlt.dev/run"));
        assert!(!m("!rlt.dev/run"));
        assert!(m("!other"));
        assert!(m("rlt.dev/role!=warmup"));
        assert!(m("other!=x"));
        assert!(m("rlt.dev/role in (warmup, learner),rlt.dev/run"));
        assert!(!m("rlt.dev/role notin (learner)"));
        assert!(m(""));
        assert!(Selector::parse("a b").is_err());
    }

    #[test]
    fn first_match_wins_and_defaults_apply() {
        let rules = parse(
            r#"
- selector: "rlt.dev/run=oom-run,rlt.dev/role=learner"
  namespace: e2e-faults
  action: oomkill
  after: 2s
- selector: "rlt.dev/run=oom-run"
  action: fail
  exitCode: 3
  message: boom
- selector: "sim"
  action: simulate
  after: 1s
- selector: "real"
  action: run
"#,
        )
        .unwrap();
        let l = labels(&[("rlt.dev/run", "oom-run"), ("rlt.dev/role", "learner")]);
        let who = |ns, labels, main| Subject {
            namespace: ns,
            labels,
            container: "trainer",
            main,
        };
        let five = Duration::from_secs(5);
        let p = plan(&rules, &who("e2e-faults", &l, true), true, five);
        assert_eq!(p.fault, Some(Fault::OomKill));
        assert!(p.process);
        assert_eq!(p.after, Duration::from_secs(2));
        let p = plan(&rules, &who("e2e-faults", &l, true), false, five);
        assert!(!p.process);
        assert_eq!(p.fault, Some(Fault::OomKill));
        // Other namespace: the oomkill rule does not apply, the fail rule does.
        let p = plan(&rules, &who("default", &l, true), true, five);
        assert_eq!(
            p.fault,
            Some(Fault::Fail {
                code: 3,
                message: Some("boom".into())
            })
        );
        assert!(!p.process);
        // Init containers are not matched by rules without `container`.
        let p = plan(&rules, &who("e2e-faults", &l, false), true, five);
        assert_eq!(p.fault, None);
        let sim = labels(&[("sim", "")]);
        let p = plan(&rules, &who("x", &sim, true), true, five);
        assert!(!p.process);
        assert_eq!(p.after, Duration::from_secs(1));
        let real = labels(&[("real", "1")]);
        assert!(plan(&rules, &who("x", &real, true), false, five).process);
        let none = labels(&[]);
        let p = plan(&rules, &who("x", &none, true), false, five);
        assert_eq!((p.process, p.after, p.fault), (false, five, None));
        assert!(parse("- action: explode").is_err());
        assert!(parse("").unwrap().is_empty());
    }
}
