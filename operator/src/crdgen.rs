//! Renders the CustomResourceDefinition generated from the `rlt-api` types, for `crds/` and
//! for the Helm chart. Both files are generated, never hand-edited; `crdgen --check` (and the
//! `crd_files_are_current` test) fail when a committed file differs from what the types give.
use kube::CustomResourceExt;
use rlt_api::RltRun;

/// Where the plain CRD lives, relative to the repository root.
pub const CRD_PATH: &str = "crds/rltruns.rlt.dev.yaml";
/// Where the chart's CRD template lives, relative to the repository root.
pub const CHART_CRD_PATH: &str = "charts/rlt-operator/templates/crd.yaml";

const HEADER: &str = "# Generated from the rlt-api types by `cargo run -p rlt-operator --bin crdgen`. Do not edit.\n";

/// The CRD as YAML.
pub fn crd_yaml() -> String {
    let yaml = serde_yaml::to_string(&RltRun::crd()).expect("CRD serializes");
    format!("{HEADER}{yaml}")
}

/// The chart's template: the same CRD, installed only when `crds.install` (default true), and
/// kept on `helm uninstall` (deleting a CRD deletes every run in the cluster). Shipped as a
/// template rather than in `crds/` so that `helm upgrade` upgrades it.
pub fn chart_crd_yaml() -> String {
    let mut crd = RltRun::crd();
    crd.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("helm.sh/resource-policy".into(), "keep".into());
    let yaml = serde_yaml::to_string(&crd).expect("CRD serializes");
    // Helm would try to expand `{{` in a description; none may appear.
    assert!(
        !yaml.contains("{{"),
        "CRD text contains '{{{{', which Helm would template"
    );
    format!("{HEADER}{{{{- if .Values.crds.install }}}}\n{yaml}{{{{- end }}}}\n")
}

/// (path, expected contents) of every generated file.
pub fn generated_files() -> [(&'static str, String); 2] {
    [(CRD_PATH, crd_yaml()), (CHART_CRD_PATH, chart_crd_yaml())]
}
