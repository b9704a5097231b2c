//! Every CEL rule and every bound of the generated CRD is exercised by a bad run:
//! - hand-written `tests/bad/*.yaml`, each with `# expect: <field>: <message>` lines;
//! - for every bound (minimum, maxLength, pattern, enum, ...) a run mutated from the good
//!   sample to violate exactly that bound, which must be rejected naming that field.
//!
//! A coverage check fails when a rule or bound is added to the types without a bad sample.
use rlt_api::validate::{crd_schema, parse_yaml, validate_value, FieldError};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

fn good_value() -> Value {
    let text = std::fs::read_to_string(dir("good").join("tiny-cpu.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn good_samples_pass_and_get_defaults() {
    for entry in std::fs::read_dir(dir("good")).unwrap() {
        let path = entry.unwrap().path();
        let run = parse_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| {
            panic!(
                "{} rejected:\n{}",
                path.display(),
                rlt_api::validate::render(&e)
            )
        });
        rlt_api::validate(&run).unwrap();
        if path.ends_with("tiny-cpu.yaml") {
            // Defaults from the paper's recipe where the sample does not say otherwise.
            assert_eq!(run.spec.rl.reward.kl_mean_weight, 3.0);
            assert_eq!(run.spec.rl.beta, 0.04);
            assert_eq!(run.spec.rl.reference_sync.interval, 32);
            assert_eq!(run.spec.warmup.learning_rate, 1e-5);
            assert_eq!(run.spec.failure_policy.retries, 2);
            assert!(run.spec.warmup.enabled && run.spec.distillation.enabled);
            assert_eq!(run.spec.distillation.students[0].name, "student");
        }
    }
}

/// Parses the `# expect: field: message` header of a bad sample.
fn expectations(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|e| {
            let (f, m) = e.split_once(": ").expect("expect line is `field: message`");
            (f.to_string(), m.to_string())
        })
        .collect()
}

fn bad_samples() -> Vec<(PathBuf, String, Vec<FieldError>)> {
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir("bad"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        let errors = parse_yaml(&text)
            .err()
            .unwrap_or_else(|| panic!("{} was accepted", path.display()));
        out.push((path, text, errors));
    }
    out
}

#[test]
fn bad_samples_are_rejected_naming_the_field() {
    let samples = bad_samples();
    assert!(samples.len() >= 10);
    for (path, text, errors) in samples {
        let expected = expectations(&text);
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        for (field, message) in expected {
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == field && e.message.contains(&message)),
                "{}: expected `{field}: {message}`, got:\n{}",
                path.display(),
                rlt_api::validate::render(&errors)
            );
        }
    }
}

/// Every `x-kubernetes-validations` rule in the CRD.
fn cel_rules(schema: &Value, out: &mut BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(rules) = map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
            {
                for r in rules {
                    out.insert(r["rule"].as_str().unwrap().to_string());
                }
            }
            map.values().for_each(|v| cel_rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| cel_rules(v, out)),
        _ => {}
    }
}

#[test]
fn every_cel_rule_has_a_bad_sample() {
    let mut rules = BTreeSet::new();
    cel_rules(crd_schema(), &mut rules);
    assert!(rules.len() >= 10, "{rules:?}");
    let hit: BTreeSet<String> = bad_samples()
        .into_iter()
        .flat_map(|(_, _, errors)| errors)
        .filter_map(|e| e.check.strip_prefix("cel: ").map(str::to_string))
        .collect();
    let missing: Vec<_> = rules.difference(&hit).collect();
    assert!(
        missing.is_empty(),
        "CEL rules without a bad sample in tests/bad: {missing:#?}"
    );
}

/// Embedded Kubernetes types (their own upstream bounds) are not ours to test.
const EMBEDDED: &[&str] = &[
    "affinity",
    "tolerations",
    "env",
    "resources",
    "paramServerResources",
    "learnerResources",
    "imagePullSecrets",
];

/// (path with `[0]` for list items, keyword, schema node) of every bound under `spec`.
fn bounds(schema: &Value, path: &str, out: &mut Vec<(String, &'static str, Value)>) {
    const KEYWORDS: &[&str] = &[
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "enum",
        "x-kubernetes-list-map-keys",
    ];
    for kw in KEYWORDS {
        if schema.get(*kw).is_some() {
            out.push((path.to_string(), kw, schema.clone()));
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            if EMBEDDED.contains(&k.as_str()) {
                continue;
            }
            bounds(v, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        bounds(items, &format!("{path}[0]"), out);
    }
}

/// Sets `value` at a dotted path (`spec.distillation.students[0].name`), creating parents.
fn set_path(root: &mut Value, path: &str, value: Value) {
    let mut node = root;
    for seg in path.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, i)) => (k, Some(i.trim_end_matches(']').parse::<usize>().unwrap())),
            None => (seg, None),
        };
        if !node.is_object() {
            *node = json!({});
        }
        node = node
            .as_object_mut()
            .unwrap()
            .entry(key)
            .or_insert(Value::Null);
        if let Some(i) = index {
            if !node.is_array() {
                *node = json!([]);
            }
            let arr = node.as_array_mut().unwrap();
            while arr.len() <= i {
                arr.push(json!({}));
            }
            node = &mut arr[i];
        }
    }
    *node = value;
}

/// A value that violates `keyword` of `schema` and nothing about its type.
fn violation(keyword: &str, schema: &Value) -> Value {
    let integer = schema.get("type").and_then(Value::as_str) == Some("integer");
    let num = |k: &str| schema[k].as_f64().unwrap();
    let exclusive = |k: &str| schema.get(k) == Some(&Value::Bool(true));
    match keyword {
        "minimum" if exclusive("exclusiveMinimum") => json!(num("minimum")),
        "minimum" if integer => json!(num("minimum") as i64 - 1),
        "minimum" => json!(num("minimum") - 0.5),
        "maximum" if integer => json!(num("maximum") as i64 + 1),
        "maximum" => json!(num("maximum") + 0.5),
        "minLength" => json!("a".repeat(schema["minLength"].as_u64().unwrap() as usize - 1)),
        "maxLength" => json!("a".repeat(schema["maxLength"].as_u64().unwrap() as usize + 1)),
        "pattern" => json!("Not_A-Label!"),
        "enum" => json!("Bogus"),
        "maxItems" => Value::Array(vec![
            json!({"name": "x"});
            schema["maxItems"].as_u64().unwrap() as usize + 1
        ]),
        "x-kubernetes-list-map-keys" => {
            json!([{"name": "twin", "model": {"tiny": {}}}, {"name": "twin", "model": {"tiny": {}}}])
        }
        other => panic!("no violation for {other}: add one here"),
    }
}

#[test]
fn every_bound_rejects_a_violating_run_naming_the_field() {
    let spec_schema = &crd_schema()["properties"]["spec"];
    let mut all = Vec::new();
    bounds(spec_schema, "spec", &mut all);
    assert!(all.len() >= 40, "found only {} bounds", all.len());
    for (path, keyword, schema) in all {
        let mut run = good_value();
        set_path(&mut run, &path, violation(keyword, &schema));
        let errors = validate_value(&run)
            .err()
            .unwrap_or_else(|| panic!("{path} {keyword}: accepted"));
        let want_check = match keyword {
            "minimum" if schema.get("exclusiveMinimum") == Some(&Value::Bool(true)) => {
                "exclusiveMinimum"
            }
            k => k,
        };
        let (field, check) = match keyword {
            // A duplicate key is reported at the duplicate item.
            "x-kubernetes-list-map-keys" => (format!("{path}[1]"), want_check),
            _ => (path.clone(), want_check),
        };
        assert!(
            errors.iter().any(|e| e.field == field && e.check == check),
            "{path} {keyword}: expected an error on {field}, got:\n{}",
            rlt_api::validate::render(&errors)
        );
    }
}

#[test]
fn unknown_fields_and_wrong_types_are_named() {
    let mut run = good_value();
    set_path(&mut run, "spec.rl.stepz", json!(3));
    set_path(&mut run, "spec.warmup.epochs", json!("ten"));
    let errors = validate_value(&run).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.field == "spec.rl.stepz" && e.message == "unknown field"),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.field == "spec.warmup.epochs"
                && e.message.contains("must be of type integer")),
        "{errors:?}"
    );
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let errors = parse_yaml("apiVersion: rlt.dev/v1alpha1\nkind: [\n").unwrap_err();
    assert!(errors[0].field.starts_with("line "), "{errors:?}");
}
