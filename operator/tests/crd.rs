//! The committed CRD files are exactly what the types generate (CI fails otherwise), and the
//! CRD has the shape a platform team relies on.
use kube::CustomResourceExt;
use rlt_api::RltRun;
use rlt_operator::crdgen::generated_files;
use std::path::PathBuf;

#[test]
fn committed_crd_files_are_current() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for (rel, want) in generated_files() {
        let have = std::fs::read_to_string(root.join(rel)).unwrap_or_default();
        assert!(
            have == want,
            "{rel} is out of date: run `cargo run -p rlt-operator --bin crdgen`"
        );
    }
}

#[test]
fn crd_names_columns_and_subresources() {
    let crd = RltRun::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("rltruns.rlt.dev"));
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["rlt".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<String> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(
        columns,
        [
            "PHASE",
            "REASON",
            "STAGE PROGRESS",
            "REWARD",
            "ATTEMPT",
            "GPU-HOURS",
            "AGE"
        ]
    );
    // The cost only under `kubectl get rltruns -o wide`.
    let wide: Vec<&str> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority == Some(1))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(wide, ["GPU-Hours"]);
    // Conditions are a list-map keyed by type, as the API conventions ask.
    let schema = serde_json::to_value(
        v.schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
}

#[test]
fn chart_template_is_gated_and_kept_on_uninstall() {
    let (_, chart) = &generated_files()[1];
    assert!(chart.contains("{{- if .Values.crds.install }}\n"));
    assert!(chart.trim_end().ends_with("{{- end }}"));
    assert!(chart.contains("helm.sh/resource-policy: keep"));
}
