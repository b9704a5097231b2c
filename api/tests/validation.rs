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
    // The test samples, and every RltRun the repository ships as an example.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let samples = std::fs::read_dir(dir("good"))
        .unwrap()
        .chain(std::fs::read_dir(shipped).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"));
    for path in samples {
        let run = parse_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| {
            panic!(
                "{} rejected:\n{}",
                path.display(),
                rlt_api::validate::render(&e)
            )
        });
        rlt_api::validate(&run).unwrap();
        if path == dir("good").join("tiny-cpu.yaml") {
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

/// Every `x-kubernetes-validations` rule in the CRD but the transition rules (`oldSelf`: a
/// bad edit, not a bad run, violates them; `tests/edits.rs` covers each).
fn cel_rules(schema: &Value, out: &mut BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(rules) = map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
            {
                for r in rules {
                    let rule = r["rule"].as_str().unwrap();
                    if !rule.contains("oldSelf") {
                        out.insert(rule.to_string());
                    }
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
            // An input is a Kubernetes Volume (upstream bounds) and our own mountPath.
            if EMBEDDED.contains(&k.as_str()) || (path.ends_with("inputs[0]") && k != "mountPath") {
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
fn an_explicit_null_means_the_field_is_left_out_as_on_the_api_server() {
    // The API server prunes nulls of non-nullable fields before defaulting; so does the
    // client, so `rl: null` is RL with its defaults in both places.
    let mut value = good_value();
    value["spec"]["rl"] = Value::Null;
    value["spec"]["warmup"]["epochs"] = Value::Null;
    let run = validate_value(&value).unwrap_or_else(|e| panic!("{e:?}"));
    let defaults = rlt_api::spec::defaults::rl();
    assert_eq!(run.spec.rl.steps, defaults.steps);
    assert_eq!(
        run.spec.warmup.epochs,
        rlt_api::spec::defaults::warmup().epochs
    );
    // A null where a value is required is still refused, naming the field.
    let mut value = good_value();
    value["spec"]["image"] = Value::Null;
    let errors = validate_value(&value).unwrap_err();
    assert!(errors.iter().any(|e| e.field == "spec.image"), "{errors:?}");
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let errors = parse_yaml("apiVersion: rlt.dev/v1alpha1\nkind: [\n").unwrap_err();
    assert!(errors[0].field.starts_with("line "), "{errors:?}");
}

/// Resolves a CEL rule's `fieldPath` (`.a.b`, `.a['k']`) from the schema node carrying the
/// rule, the way the API server's `cel.ValidFieldPath` does: through declared `properties`
/// (and `additionalProperties` for a map key). `None` when it names nothing declared.
fn resolve_field_path<'a>(mut node: &'a Value, path: &str) -> Option<&'a Value> {
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            node = node.get("properties")?.get(&r[..end])?;
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("['") {
            let end = r.find("']")?;
            node = node.get("additionalProperties")?;
            rest = &r[end + 2..];
        } else {
            return None;
        }
    }
    Some(node)
}

fn field_paths(schema: &Value, at: &str, out: &mut Vec<(String, String, bool)>) {
    let Value::Object(map) = schema else { return };
    for rule in map
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(fp) = rule.get("fieldPath").and_then(Value::as_str) {
            out.push((
                at.to_string(),
                fp.to_string(),
                resolve_field_path(schema, fp).is_some(),
            ));
        }
    }
    for (k, v) in map
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        field_paths(v, &format!("{at}.{k}"), out);
    }
    if let Some(items) = map.get("items") {
        field_paths(items, &format!("{at}[*]"), out);
    }
    if let Some(v) = map.get("additionalProperties").filter(|v| v.is_object()) {
        field_paths(v, &format!("{at}[*]"), out);
    }
}

#[test]
fn every_rule_field_path_resolves_to_a_declared_property() {
    let mut paths = Vec::new();
    field_paths(crd_schema(), "", &mut paths);
    assert!(paths.len() >= 4, "{paths:?}");
    let broken: Vec<_> = paths.iter().filter(|(_, _, ok)| !ok).collect();
    assert!(
        broken.is_empty(),
        "the API server refuses a CRD whose fieldPath names no declared property \
         (\"fieldPath must be a valid path\"): {broken:?}"
    );
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    fn walk(node: &Value, path: &str, missing: &mut Vec<String>) {
        for (k, v) in node
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let at = format!("{path}.{k}");
            if v.get("description").is_none() {
                missing.push(at.clone());
            }
            walk(v, &at, missing);
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
    }
    let mut missing = Vec::new();
    for root in ["spec", "status"] {
        let schema = &crd_schema()["properties"][root];
        assert!(schema.get("description").is_some(), "{root}");
        walk(schema, root, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}

#[test]
fn the_root_declares_only_what_the_api_server_allows() {
    // At the root, `metadata` may only restrict `name` and `generateName` (anything else:
    // "must not specify anything other than name and generateName").
    let metadata = &crd_schema()["properties"]["metadata"];
    let keys: BTreeSet<&str> = metadata
        .as_object()
        .expect("metadata is declared")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["type", "properties"]));
    assert_eq!(metadata["type"], "object");
    let props: BTreeSet<&str> = metadata["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(props, BTreeSet::from(["name", "generateName"]));
    for k in ["kind", "apiVersion"] {
        assert_eq!(crd_schema()["properties"][k]["type"], "string");
    }
}

/// Every integer's largest value for its Rust type, from the schema's `format`: only the
/// formats the API server knows (an unsigned Rust integer is an `int64` bounded to its type,
/// see `spec::known_integer_formats`; `kubectl apply` warns about any other).
fn type_max(format: Option<&str>) -> Option<f64> {
    match format {
        Some("int32") => Some(i32::MAX as f64),
        // Any integer the API server stores is an int64: nothing to bound.
        Some("int64") => None,
        other => panic!("integer format {other:?}: not one the API server knows"),
    }
}

fn integers(schema: &Value, at: &str, out: &mut Vec<(String, Value)>) {
    let Value::Object(map) = schema else { return };
    if map.get("type").and_then(Value::as_str) == Some("integer") {
        out.push((at.to_string(), schema.clone()));
    }
    for (k, v) in map
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        integers(v, &format!("{at}.{k}"), out);
    }
    if let Some(items) = map.get("items") {
        integers(items, &format!("{at}[0]"), out);
    }
    if let Some(v) = map.get("additionalProperties").filter(|v| v.is_object()) {
        integers(v, &format!("{at}[*]"), out);
    }
}

#[test]
fn every_integer_is_bounded_to_fit_its_type() {
    // A value the Rust type cannot hold would be stored, then break every typed read (the
    // operator's LIST of all runs), not just this run.
    let mut all = Vec::new();
    integers(crd_schema(), "", &mut all);
    assert!(all.len() >= 40, "found only {} integers", all.len());
    let mut unbounded = Vec::new();
    for (path, schema) in all {
        let format = schema.get("format").and_then(Value::as_str);
        let Some(max) = type_max(format) else {
            continue;
        };
        let fits_above = schema["maximum"].as_f64().is_some_and(|m| m <= max);
        let fits_below = !format.unwrap_or_default().starts_with('u')
            || schema["minimum"].as_f64().is_some_and(|m| m >= 0.0);
        if !(fits_above && fits_below) {
            unbounded.push(format!("{path} ({format:?}): {schema}"));
        }
    }
    assert!(
        unbounded.is_empty(),
        "integers without bounds that fit their type:\n{}",
        unbounded.join("\n")
    );
}

#[test]
fn every_unsigned_integer_is_bounded_to_its_type() {
    // Unsigned Rust integers are `int64` to the API server, with a minimum of 0: their
    // maximum is what keeps a value the Rust type cannot hold from being stored (a u32 field
    // at most u32::MAX, a u64 within a JSON number's exact integers).
    let mut all = Vec::new();
    integers(crd_schema(), "", &mut all);
    let exact = 9007199254740991.0;
    let unsigned: Vec<_> = all
        .iter()
        .filter(|(_, s)| s["minimum"].as_f64().is_some_and(|m| m >= 0.0))
        .collect();
    assert!(
        unsigned.len() >= 40,
        "found only {} unsigned integers",
        unsigned.len()
    );
    let loose: Vec<String> = unsigned
        .iter()
        .filter(|(_, s)| !s["maximum"].as_f64().is_some_and(|m| m <= exact))
        .map(|(path, s)| format!("{path}: {s}"))
        .collect();
    assert!(
        loose.is_empty(),
        "unbounded integers:\n{}",
        loose.join("\n")
    );
    let steps = &crd_schema()["properties"]["spec"]["properties"]["rl"]["properties"]["steps"];
    assert_eq!(
        (
            steps["format"].as_str(),
            steps["minimum"].as_f64(),
            steps["maximum"].as_f64()
        ),
        (Some("int64"), Some(1.0), Some(1e6)),
        "a u32 with its own range keeps it"
    );
    let seed = &crd_schema()["properties"]["spec"]["properties"]["dataset"]["properties"]
        ["synthetic"]["properties"]["seed"];
    assert!(
        seed["maximum"].as_f64().unwrap() <= u32::MAX as f64,
        "{seed}"
    );
}

#[test]
fn run_names_child_names_cannot_carry_are_refused_by_the_crd_itself() {
    // The API server only asks for a DNS subdomain; the CRD's own rules must refuse the rest,
    // or the run is accepted and its children are refused later.
    for name in ["7b-run", "my.run", "a-run-name-longer-than-24", "run-"] {
        let mut run = good_value();
        set_path(&mut run, "metadata.name", json!(name));
        let errors = validate_value(&run).expect_err(name);
        assert!(
            errors
                .iter()
                .any(|e| e.field == "metadata.name" && e.check.starts_with("cel: ")),
            "{name}: {errors:?}"
        );
    }
}
