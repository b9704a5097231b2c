//! The spec edits a run accepts once it exists (the CRD's transition rules, evaluated
//! client-side with the CRD's own schema as the API server does): every field of the sample,
//! and every field it leaves out, is changed once, and the edit must be accepted or refused as
//! [`rlt_api::edits::EDITABLE`] says, the refusal naming the field. Every transition rule
//! must refuse at least one edit.
use rlt_api::edits::{Edit, EDITABLE};
use rlt_api::validate::{crd_schema, parse_yaml, validate_update, FieldError};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn sample() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/good/tiny-cpu.yaml");
    let run = parse_yaml(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_value(run).unwrap()
}

/// Values for the optional fields the sample leaves out (paths below `spec`).
fn additions() -> Vec<(&'static str, Value)> {
    let resources = json!({"limits": {"cpu": "3"}});
    let scheduling = json!({"nodeSelector": {"pool": "b"}});
    let template = json!({"labels": {"team": "b"}});
    vec![
        ("imagePullSecrets", json!([{"name": "regcred"}])),
        (
            "inputs",
            json!([{"name": "data", "mountPath": "/data", "volume": {"name": "data", "emptyDir": {}}}]),
        ),
        ("prompts", json!({"teacher": "explain"})),
        ("scheduling", scheduling.clone()),
        ("podTemplate", template.clone()),
        ("serviceAccountName", json!("trainer")),
        ("env", json!([{"name": "A", "value": "1"}])),
        ("ttlSecondsAfterFinished", json!(60)),
        ("warmup.resources", resources.clone()),
        ("warmup.scheduling", scheduling.clone()),
        ("warmup.podTemplate", template.clone()),
        ("rl.paramServerResources", resources.clone()),
        ("rl.learnerResources", resources.clone()),
        ("rl.scheduling", scheduling.clone()),
        ("rl.paramServerScheduling", scheduling.clone()),
        ("rl.paramServerPodTemplate", template.clone()),
        ("rl.learnerPodTemplate", template.clone()),
        ("rl.student", json!({"tiny": {"seed": 3}})),
        ("distillation.scheduling", scheduling),
        ("distillation.podTemplate", template),
        ("distillation.students[].resources", resources),
    ]
}

/// A different value of the same type.
fn changed(v: &Value) -> Value {
    match v {
        Value::Bool(b) => json!(!b),
        Value::Number(n) if n.is_u64() => json!(n.as_u64().unwrap() + 1),
        Value::Number(n) => json!(n.as_f64().unwrap() * 0.5 + 0.25),
        Value::String(s) => json!(format!("{s}-edited")),
        Value::Array(items) => json!(items.iter().map(changed).collect::<Vec<_>>()),
        Value::Object(map) => {
            let mut map = map.clone();
            let (k, first) = map
                .iter()
                .next()
                .map(|(k, v)| (k.clone(), v.clone()))
                .unwrap();
            map.insert(k, changed(&first));
            Value::Object(map)
        }
        Value::Null => panic!("no null in a defaulted run"),
    }
}

/// Every field path of the sample down to the stages' fields (`list[].field` for the students).
fn sample_paths(spec: &Value) -> Vec<String> {
    let mut paths = Vec::new();
    for (k, v) in spec.as_object().unwrap() {
        paths.push(k.clone());
        if ["warmup", "rl", "distillation"].contains(&k.as_str()) {
            for (sub, sv) in v.as_object().unwrap() {
                paths.push(format!("{k}.{sub}"));
                if sub == "students" {
                    for f in sv[0].as_object().unwrap().keys() {
                        paths.push(format!("{k}.students[].{f}"));
                    }
                }
            }
        }
    }
    paths
}

/// The spec with `path` set to `value` (`f(old)` for a present field).
fn edit(spec: &Value, path: &str, value: impl Fn(Option<&Value>) -> Value) -> Value {
    let mut spec = spec.clone();
    let mut node = &mut spec;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        node = match part.strip_suffix("[]") {
            Some(list) => &mut node[list][0],
            None => &mut node[*part],
        };
    }
    let last = parts[parts.len() - 1];
    let new = value(node.get(last));
    node[last] = new;
    spec
}

/// Which rule governs a path: the exact entry, else the one its stage lists for it.
fn rule_for(path: &str) -> Option<Edit> {
    EDITABLE.iter().find(|(p, _)| *p == path).map(|e| e.1)
}

fn update(old: &Value, new_spec: Value, suspended_before: bool) -> Result<(), Vec<FieldError>> {
    let mut old = old.clone();
    old["spec"]["suspend"] = json!(suspended_before);
    let mut new = old.clone();
    new["spec"] = new_spec;
    validate_update(&old, &new)
}

#[test]
fn each_field_changes_only_when_its_rule_allows() {
    let run = sample();
    let spec = run["spec"].clone();
    let mut cases: Vec<(String, Value)> = sample_paths(&spec)
        .into_iter()
        .filter(|p| p != "suspend")
        .map(|p| {
            let new = edit(&spec, &p, |old| changed(old.unwrap()));
            (p, new)
        })
        .collect();
    for (path, value) in additions() {
        cases.push((path.to_string(), edit(&spec, path, |_| value.clone())));
    }
    let mut refused_by = BTreeSet::new();
    for (path, new) in cases {
        let top = path.split(['.', '[']).next().unwrap();
        let running = update(&run, new.clone(), false);
        let suspended = update(&run, new, true);
        match rule_for(&path) {
            Some(Edit::Always) => {
                assert!(
                    running.is_ok(),
                    "{path}: refused while running: {running:?}"
                );
            }
            Some(Edit::WhileSuspended) => {
                let errors = running.expect_err(&format!("{path}: accepted while running"));
                assert!(
                    errors
                        .iter()
                        .any(|e| e.message.contains("only while the run is suspended")
                            && e.field == format!("spec.{top}")),
                    "{path}: {errors:?}"
                );
                assert!(
                    suspended.is_ok(),
                    "{path}: refused while suspended: {suspended:?}"
                );
                refused_by.extend(errors.into_iter().map(|e| e.check));
            }
            None => {
                let errors = running.expect_err(&format!("{path}: accepted while running"));
                assert!(
                    errors.iter().any(
                        |e| e.message.contains("immutable") && e.field == format!("spec.{top}")
                    ),
                    "{path}: {errors:?}"
                );
                let errors = suspended.expect_err(&format!("{path}: accepted while suspended"));
                refused_by.extend(errors.into_iter().map(|e| e.check));
            }
        }
    }
    let rules: BTreeSet<String> = crd_schema()["properties"]["spec"]["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .filter(|r| r.contains("oldSelf"))
        .map(|r| format!("cel: {r}"))
        .collect();
    let missing: Vec<_> = rules.difference(&refused_by).collect();
    assert!(
        missing.is_empty(),
        "transition rules no edit violated: {missing:#?}"
    );
}

#[test]
fn suspend_and_resume_with_an_edit_in_one_write() {
    let run = sample();
    let mut spec = run["spec"].clone();
    spec["image"] = json!("rlt-trainer:cuda");
    spec["suspend"] = json!(false);
    // Resuming and changing the image together: the run was suspended before the write.
    assert!(update(&run, spec.clone(), true).is_ok());
    // Suspending and changing the image together: its pods were running with the old one.
    spec["suspend"] = json!(true);
    assert!(update(&run, spec, false).is_err());
}
