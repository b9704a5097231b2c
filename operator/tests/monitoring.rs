//! The chart's Grafana dashboard and alert rules query only metrics the project exports: the
//! operator's (its registry) and the parameter servers' (`rlt_api::contract`).
use rlt_api::contract::param_server_metrics;
use rlt_operator::metrics::Metrics;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn chart(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/rlt-operator")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Metric names in a PromQL expression: the project's prefixes (label names and PromQL's own
/// words never carry them).
fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| ["rlt_", "rl_", "ps_"].iter().any(|p| t.starts_with(p)))
        .map(String::from)
        .collect()
}

fn exported() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = Metrics::default().names().into_iter().collect();
    names.extend(param_server_metrics::ALL.iter().map(|n| n.to_string()));
    names
}

/// A histogram's series are `<name>_bucket`, `_sum` and `_count`.
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|b| exported.contains(b)))
}

#[test]
fn every_dashboard_panel_queries_metrics_the_project_exports() {
    let dashboard: Value = serde_json::from_str(&chart("files/rlt-dashboard.json"))
        .expect("the dashboard is valid JSON");
    let exported = exported();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut unknown = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        let exprs: Vec<&str> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        let names: Vec<String> = exprs.iter().flat_map(|e| metrics_in(e)).collect();
        assert!(
            !names.is_empty(),
            "panel {title:?} queries no metric of ours"
        );
        unknown.extend(
            names
                .into_iter()
                .filter(|n| !is_exported(n, &exported))
                .map(|n| format!("{title}: {n}")),
        );
    }
    assert!(
        unknown.is_empty(),
        "not exported: {unknown:?} (exported: {exported:?})"
    );
    // What the issue asks a platform team to see at a glance.
    for want in [
        "rlt_operator_runs",
        "rl_mean_reward",
        "rl_step",
        "rlt_operator_stage_duration_seconds",
        "rlt_operator_reconcile_duration_seconds",
    ] {
        assert!(
            panels.iter().any(|p| p.to_string().contains(want)),
            "no panel shows {want}"
        );
    }
}

#[test]
fn every_alert_queries_metrics_the_project_exports() {
    let rules = chart("templates/prometheusrule.yaml");
    let exported = exported();
    let exprs: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert_eq!(exprs.len(), 3, "{exprs:?}");
    for e in exprs {
        let names = metrics_in(e);
        assert!(!names.is_empty(), "{e}");
        for n in names {
            assert!(is_exported(&n, &exported), "{e}: {n} is not exported");
        }
    }
}
