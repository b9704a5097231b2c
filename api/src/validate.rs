//! Client-side validation of an `RltRun`, so a run the cluster would reject is rejected
//! locally (by `rlt-trainer pipeline`) with the same field and message, and so the operator
//! reports what the schema cannot express as an `InvalidSpec` condition instead of crashing.
//!
//! Three layers, in the order the API server applies them:
//! 1. the structural schema of the generated CRD: types, unknown fields (kubectl's strict
//!    field validation), bounds, patterns, enums, list-map key uniqueness;
//! 2. the CRD's CEL rules (`x-kubernetes-validations`), evaluated with kube's client-side CEL;
//! 3. [`semantic_errors`]: what neither can say (contract env vars, path sanity, quantities
//!    and the API server's pod rules for them, which it only applies when a Job is created).
//!
//! The schema is the generated CRD's, never a copy, so the layers cannot drift from the CRD.
use crate::contract;
use crate::quantity::{self, Quantity};
use crate::spec::{ModelRef, RltRun};
use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::CustomResourceExt;
use regex::Regex;
use serde_json::Value;
use std::sync::OnceLock;

/// One problem with a run, naming the field as `kubectl` would (`spec.rl.steps`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
    /// Which check found it: a schema keyword (`minimum`, `unknown`, ...), `cel: <rule>`,
    /// or `semantic`. Tests use it to prove every rule and bound is exercised.
    pub check: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All errors of a run, one per line (`field: message`).
pub fn render(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The generated CRD's `openAPIV3Schema` as JSON (computed once).
pub fn crd_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = RltRun::crd();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref());
        serde_json::to_value(schema.expect("derived CRD has a schema")).expect("schema is JSON")
    })
}

fn compiled_schema() -> &'static kube::core::cel::CompiledSchema {
    static COMPILED: OnceLock<kube::core::cel::CompiledSchema> = OnceLock::new();
    COMPILED.get_or_init(|| kube::core::cel::compile_schema(crd_schema()))
}

/// Validates a run: schema, CEL rules, then [`semantic_errors`]. Use [`parse_yaml`] for a file
/// a user wrote (it also catches unknown fields, which a typed `RltRun` has already dropped).
pub fn validate(run: &RltRun) -> Result<(), Vec<FieldError>> {
    let value = serde_json::to_value(run).expect("RltRun serializes");
    validate_value(&value).map(|_| ())
}

/// The CRD's rules on an update from `old` to `new` (both valid runs): what the API server's
/// transition rules ([`crate::edits`]) refuse, as they word it. Runs as JSON, as the API
/// server sees them.
pub fn validate_update(old: &Value, new: &Value) -> Result<(), Vec<FieldError>> {
    kube::core::cel::Validator::new()
        .validate_compiled(compiled_schema(), new, Some(old))
        .map_err(|errors| errors.iter().map(cel_error).collect())
}

/// Parses and validates an RltRun YAML document; on success returns the run with every
/// default filled in.
pub fn parse_yaml(text: &str) -> Result<RltRun, Vec<FieldError>> {
    let value: Value = serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("line {}, column {}", l.line(), l.column()));
        vec![FieldError {
            field: at.unwrap_or_else(|| "(document)".into()),
            message: format!("not valid YAML: {e}"),
            check: "yaml".into(),
        }]
    })?;
    validate_value(&value)
}

/// Validates a run given as JSON/YAML value (as written: unknown fields are errors).
pub fn validate_value(value: &Value) -> Result<RltRun, Vec<FieldError>> {
    let mut pruned = value.clone();
    prune_nulls(crd_schema(), &mut pruned);
    let value = &pruned;
    let mut errors = Vec::new();
    let crd = RltRun::crd();
    let expected_api = format!("{}/{}", crd.spec.group, crd.spec.versions[0].name);
    for (field, want) in [("apiVersion", expected_api.as_str()), ("kind", "RltRun")] {
        if value.get(field).and_then(Value::as_str) != Some(want) {
            errors.push(err(field, format!("must be {want}"), "semantic"));
        }
    }
    // The name's length and form are CEL rules of the CRD (checked below, like the server does).
    if value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none()
    {
        errors.push(err("metadata.name", "is required".into(), "semantic"));
    }
    schema_errors(crd_schema(), value, "", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    if let Err(cel) =
        kube::core::cel::Validator::new().validate_compiled(compiled_schema(), value, None)
    {
        return Err(cel.iter().map(cel_error).collect());
    }
    // The schema passed, so this only fails on what serde checks beyond it.
    let run: RltRun = serde_json::from_value(value.clone()).map_err(|e| {
        vec![err(
            "(document)",
            format!("does not match the RltRun type: {e}"),
            "type",
        )]
    })?;
    let semantic = semantic_errors(&run);
    if semantic.is_empty() {
        Ok(run)
    } else {
        Err(semantic)
    }
}

/// Drops every explicit `null` of a field whose schema is not `nullable`, as the API server
/// does before defaulting: `rl: null` then means what leaving `rl` out means (its defaults),
/// on the cluster and in `rlt-trainer pipeline` alike.
fn prune_nulls(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|s| s.is_object());
            map.retain(|k, v| {
                let nullable = props
                    .and_then(|p| p.get(k))
                    .or(extra)
                    .is_some_and(|s| s.get("nullable") == Some(&Value::Bool(true)));
                !v.is_null() || nullable
            });
            for (k, v) in map.iter_mut() {
                if let Some(s) = props.and_then(|p| p.get(k)).or(extra) {
                    prune_nulls(s, v);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                items.iter_mut().for_each(|v| prune_nulls(s, v));
            }
        }
        _ => {}
    }
}

fn cel_error(e: &kube::core::cel::ValidationError) -> FieldError {
    FieldError {
        field: cel_field(&e.field_path),
        message: e.message.clone(),
        check: format!("cel: {}", e.rule),
    }
}

/// kube-cel reports the path of the object carrying the rule, or the rule's own `fieldPath`
/// (`spec.distillation.students`), as the API server does.
fn cel_field(path: &str) -> String {
    let path = path.trim_start_matches('.');
    if path.is_empty() {
        "(root)".to_string()
    } else {
        path.to_string()
    }
}

/// Checks the schema cannot express. The operator runs these on every reconcile (the API
/// server already enforced the schema and CEL rules) and reports them as `InvalidSpec`.
pub fn semantic_errors(run: &RltRun) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let spec = &run.spec;
    for (i, e) in spec.env.iter().enumerate() {
        // The API server's rule for a container's env names (relaxed since 1.30).
        if e.name.is_empty()
            || e.name.contains('=')
            || !e.name.chars().all(|c| (' '..='~').contains(&c))
        {
            errors.push(err(
                &format!("spec.env[{i}].name"),
                "must consist of printable ASCII characters other than '='".into(),
                "semantic",
            ));
        }
        if e.name.starts_with("RLT_") {
            errors.push(err(
                &format!("spec.env[{i}].name"),
                format!(
                    "{} is set by the operator (the stage contract) and cannot be overridden",
                    e.name
                ),
                "semantic",
            ));
        }
    }
    input_errors(&spec.inputs, &mut errors);
    let mut models: Vec<(String, &ModelRef)> = vec![("spec.teacher".into(), &spec.teacher)];
    if let Some(s) = &spec.rl.student {
        models.push(("spec.rl.student".into(), s));
    }
    for (i, s) in spec.distillation.students.iter().enumerate() {
        models.push((format!("spec.distillation.students[{i}].model"), &s.model));
    }
    for (field, m) in models {
        if let Some(p) = &m.path {
            path_errors(&format!("{field}.path"), p, &mut errors);
        }
    }
    if let Some(p) = &spec.dataset.path {
        path_errors("spec.dataset.path", p, &mut errors);
    }
    let mut resources: Vec<(String, &ResourceRequirements)> = Vec::new();
    let stage_res = [
        ("spec.warmup.resources", spec.warmup.resources.as_ref()),
        (
            "spec.rl.paramServerResources",
            spec.rl.param_server_resources.as_ref(),
        ),
        (
            "spec.rl.learnerResources",
            spec.rl.learner_resources.as_ref(),
        ),
    ];
    for (f, r) in stage_res {
        if let Some(r) = r {
            resources.push((f.into(), r));
        }
    }
    for (i, s) in spec.distillation.students.iter().enumerate() {
        if let Some(r) = &s.resources {
            resources.push((format!("spec.distillation.students[{i}].resources"), r));
        }
    }
    for (field, r) in &resources {
        resource_errors(field, r, &mut errors);
    }
    device_errors(spec, &resources, &mut errors);
    let templates = [
        ("spec.podTemplate", &spec.pod_template),
        ("spec.warmup.podTemplate", &spec.warmup.pod_template),
        (
            "spec.rl.paramServerPodTemplate",
            &spec.rl.param_server_pod_template,
        ),
        ("spec.rl.learnerPodTemplate", &spec.rl.learner_pod_template),
        (
            "spec.distillation.podTemplate",
            &spec.distillation.pod_template,
        ),
    ];
    for (field, t) in templates {
        for (f, message) in crate::pod_template::errors(field, t) {
            errors.push(err(&f, message, "semantic"));
        }
    }
    if let Some(size) = &spec.workspace.size {
        if !quantity::is_quantity(size) {
            errors.push(err(
                "spec.workspace.size",
                format!("{size:?} is not a Kubernetes quantity (e.g. 10Gi)"),
                "semantic",
            ));
        }
    }
    errors
}

/// `device: auto` picks CUDA for pods that ask for a GPU it knows
/// ([`contract::is_gpu_resource`]); a pod asking only for another extended resource (an
/// accelerator the operator cannot tell from a NIC) needs the run to say which device.
fn device_errors(
    spec: &crate::spec::RltRunSpec,
    resources: &[(String, &ResourceRequirements)],
    errors: &mut Vec<FieldError>,
) {
    if spec.device != crate::spec::Device::Auto {
        return;
    }
    for (field, r) in resources {
        if contract::gpus(Some(r)) > 0 {
            continue;
        }
        let unknown = r
            .limits
            .iter()
            .chain(r.requests.iter())
            .flat_map(|m| m.keys())
            .find(|name| contract::is_extended_resource(name));
        if let Some(name) = unknown {
            errors.push(err(
                "spec.device",
                format!(
                    "must be cpu or cuda: {field} asks for {name}, which is not a GPU resource \
                     auto knows (nvidia.com/gpu, nvidia.com/mig-*, amd.com/gpu)"
                ),
                "semantic",
            ));
            return;
        }
    }
}

/// Paths are absolute or relative to the workspace root; `..` would escape the workspace.
fn path_errors(field: &str, path: &str, errors: &mut Vec<FieldError>) {
    if path.split('/').any(|c| c == "..") {
        errors.push(err(
            field,
            format!("{path:?} must not contain '..' (relative paths are inside the workspace)"),
            "semantic",
        ));
    }
    if path.contains('\0') || path.contains('\n') {
        errors.push(err(
            field,
            "must not contain control characters".into(),
            "semantic",
        ));
    }
}

/// The API server's rules for a container's `resources` (`ValidateResourceRequirements`),
/// which it applies only when the operator creates a Job; here they make the run InvalidSpec
/// before anything is created. Fields are named as the API server names them
/// (`requests[nvidia.com/gpu]`).
fn resource_errors(field: &str, r: &ResourceRequirements, errors: &mut Vec<FieldError>) {
    let limits: Vec<(&String, Option<Quantity>)> = r
        .limits
        .iter()
        .flatten()
        .map(|(name, q)| (name, resource_quantity(field, "limits", name, &q.0, errors)))
        .collect();
    for (name, q) in r.requests.iter().flatten() {
        let request = resource_quantity(field, "requests", name, &q.0, errors);
        let at = format!("{field}.requests[{name}]");
        match limits.iter().find(|(n, _)| *n == name) {
            Some((_, limit)) => {
                let (Some(request), Some(limit)) = (request, *limit) else {
                    continue;
                };
                let shown = &r.limits.as_ref().expect("a limit was found")[name].0;
                if request != limit && !quantity::overcommit_allowed(name) {
                    errors.push(err(
                        &at,
                        format!("must be equal to {name} limit of {shown}"),
                        "semantic",
                    ));
                } else if request > limit {
                    errors.push(err(
                        &at,
                        format!("must be less than or equal to {name} limit of {shown}"),
                        "semantic",
                    ));
                }
            }
            None if !quantity::overcommit_allowed(name) => errors.push(err(
                &format!("{field}.limits[{name}]"),
                "Limit must be set for non overcommitable resources".into(),
                "semantic",
            )),
            None => {}
        }
    }
    if r.claims.as_ref().is_some_and(|c| !c.is_empty()) {
        errors.push(err(
            &format!("{field}.claims"),
            "is not supported: the stage pods declare no resourceClaims for it to name".into(),
            "semantic",
        ));
    }
}

/// One quantity of `requests` or `limits`, checked as the API server checks it.
fn resource_quantity(
    field: &str,
    kind: &str,
    name: &str,
    q: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Quantity> {
    let at = format!("{field}.{kind}[{name}]");
    if !name.contains('/') && !quantity::is_standard_container_resource(name) {
        errors.push(err(
            &at,
            "must be a standard resource for containers".into(),
            "semantic",
        ));
    }
    let Some(value) = Quantity::parse(q) else {
        errors.push(err(
            &at,
            format!("{q:?} is not a Kubernetes quantity (e.g. 500m, 2Gi, 1)"),
            "semantic",
        ));
        return None;
    };
    if value.is_negative() {
        errors.push(err(
            &at,
            "must be greater than or equal to 0".into(),
            "semantic",
        ));
    } else if !quantity::is_native(name) && !value.is_integer() {
        errors.push(err(&at, "must be an integer".into(), "semantic"));
    }
    Some(value)
}

/// Longest input name: its pod volume is `in-<name>`, a 63-character DNS label.
pub const MAX_INPUT_NAME: usize = 60;

/// Input volumes: a DNS-label name the pods' volume name can carry, exactly one source (the
/// API server would refuse the stage Jobs otherwise, after the run started), distinct mounts.
fn input_errors(inputs: &[crate::spec::InputVolume], errors: &mut Vec<FieldError>) {
    for (i, input) in inputs.iter().enumerate() {
        let name = &input.volume.name;
        let label = name.len() <= MAX_INPUT_NAME
            && !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !label {
            errors.push(err(
                &format!("spec.inputs[{i}].name"),
                format!("must be a DNS label of at most {MAX_INPUT_NAME} characters (lower case letters, digits, '-')"),
                "semantic",
            ));
        }
        let sources = serde_json::to_value(&input.volume)
            .ok()
            .and_then(|v| {
                v.as_object()
                    .map(|o| o.keys().filter(|k| *k != "name").count())
            })
            .unwrap_or(0);
        if sources != 1 {
            errors.push(err(
                &format!("spec.inputs[{i}]"),
                format!("must have exactly one volume source (persistentVolumeClaim, nfs, csi, hostPath, ...), has {sources}"),
                "semantic",
            ));
        }
        let path = input.mount_path.trim_end_matches('/');
        if inputs[..i]
            .iter()
            .any(|o| o.mount_path.trim_end_matches('/') == path)
        {
            errors.push(err(
                &format!("spec.inputs[{i}].mountPath"),
                format!("{path} is already the mountPath of another input"),
                "semantic",
            ));
        }
    }
}

fn err(field: &str, message: String, check: &str) -> FieldError {
    FieldError {
        field: field.to_string(),
        message,
        check: check.to_string(),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The structural-schema checks the API server applies before CEL, with its wording
/// ("should be greater than or equal to 1", "Unsupported value", "unknown field").
fn schema_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let field = if path.is_empty() { "(root)" } else { path };
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(err(field, "must not be null".into(), "nullable"));
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_string() || type_name(value) == "integer") {
            errors.push(err(
                field,
                format!("must be an integer or a string, not {}", type_name(value)),
                "type",
            ));
        }
        return;
    }
    if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let got = type_name(value);
        let ok = got == want || (want == "number" && got == "integer");
        if !ok {
            errors.push(err(
                field,
                format!("must be of type {want}, not {got}"),
                "type",
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
            errors.push(err(
                field,
                format!(
                    "Unsupported value: {value}: supported values: {}",
                    list.join(", ")
                ),
                "enum",
            ));
        }
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            let excl_min = schema.get("exclusiveMinimum") == Some(&Value::Bool(true));
            let excl_max = schema.get("exclusiveMaximum") == Some(&Value::Bool(true));
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if excl_min && x <= min {
                    errors.push(err(
                        field,
                        format!("should be greater than {min}"),
                        "exclusiveMinimum",
                    ));
                } else if x < min {
                    errors.push(err(
                        field,
                        format!("should be greater than or equal to {min}"),
                        "minimum",
                    ));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if excl_max && x >= max {
                    errors.push(err(
                        field,
                        format!("should be less than {max}"),
                        "exclusiveMaximum",
                    ));
                } else if x > max {
                    errors.push(err(
                        field,
                        format!("should be less than or equal to {max}"),
                        "maximum",
                    ));
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
                if len < min {
                    errors.push(err(
                        field,
                        format!("should be at least {min} chars long"),
                        "minLength",
                    ));
                }
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
                if len > max {
                    errors.push(err(
                        field,
                        format!("may not be more than {max} chars long"),
                        "maxLength",
                    ));
                }
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                if Regex::new(p).map(|re| !re.is_match(s)).unwrap_or(false) {
                    errors.push(err(field, format!("should match '{p}'"), "pattern"));
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    errors.push(err(
                        field,
                        format!("should have at least {min} items"),
                        "minItems",
                    ));
                }
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    errors.push(err(
                        field,
                        format!("must have at most {max} items"),
                        "maxItems",
                    ));
                }
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let keys: Vec<&str> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<&Value> = keys
                        .iter()
                        .map(|k| item.get(*k).unwrap_or(&Value::Null))
                        .collect();
                    if seen.contains(&key) {
                        let shown: Vec<String> = keys
                            .iter()
                            .zip(&key)
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        errors.push(err(
                            &format!("{field}[{i}]"),
                            format!("Duplicate value: {}", shown.join(", ")),
                            "x-kubernetes-list-map-keys",
                        ));
                    }
                    seen.push(key);
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    schema_errors(item_schema, item, &format!("{field}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(err(&join(path, r), "Required value".into(), "required"));
                    }
                }
            }
            let preserve =
                schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            // The API server validates metadata itself; the CRD schema only says "object".
            let is_metadata = path == "metadata";
            for (k, v) in map {
                if path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                    continue;
                }
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    schema_errors(s, v, &join(path, k), errors);
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object())
                {
                    schema_errors(s, v, &join(path, k), errors);
                } else if props.is_some() && !preserve && !is_metadata {
                    errors.push(err(&join(path, k), "unknown field".into(), "unknown"));
                }
            }
        }
        _ => {}
    }
}
