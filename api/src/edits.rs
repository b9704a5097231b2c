//! Which edits a run accepts once it exists: the CRD's transition rules (CEL with `oldSelf`,
//! checked by the API server on every update, and by [`crate::validate::validate_update`]).
//!
//! A run trains what it was created with: a parameter server restarting mid-stage must not
//! read other hyperparameters than its peers, and learners' server lists must not change
//! under them. So the spec is immutable, except [`EDITABLE`]: `suspend`, `failurePolicy` and
//! `ttlSecondsAfterFinished` at any time, and where and how the pods run (image, env,
//! resources, scheduling, pod templates) while the run is suspended, as JobSet and Kubeflow's
//! TrainJob allow: a suspended stage has no pods, and resuming it is a new attempt built from
//! the edited spec. The rules are generated from the spec's own schema, so a field added later
//! is immutable unless it is listed here.
use serde_json::{json, Map, Value};

/// When a field may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Always,
    WhileSuspended,
}

/// The editable fields (paths below `spec`; `list[].field` is a field of every element of a
/// list keyed by `name`). Everything else is fixed when the run is created.
pub const EDITABLE: &[(&str, Edit)] = &[
    ("suspend", Edit::Always),
    ("failurePolicy", Edit::Always),
    ("ttlSecondsAfterFinished", Edit::Always),
    ("image", Edit::WhileSuspended),
    ("imagePullPolicy", Edit::WhileSuspended),
    ("imagePullSecrets", Edit::WhileSuspended),
    ("serviceAccountName", Edit::WhileSuspended),
    ("env", Edit::WhileSuspended),
    ("scheduling", Edit::WhileSuspended),
    ("podTemplate", Edit::WhileSuspended),
    ("warmup.resources", Edit::WhileSuspended),
    ("warmup.scheduling", Edit::WhileSuspended),
    ("warmup.podTemplate", Edit::WhileSuspended),
    ("rl.paramServerResources", Edit::WhileSuspended),
    ("rl.learnerResources", Edit::WhileSuspended),
    ("rl.scheduling", Edit::WhileSuspended),
    ("rl.paramServerScheduling", Edit::WhileSuspended),
    ("rl.paramServerPodTemplate", Edit::WhileSuspended),
    ("rl.learnerPodTemplate", Edit::WhileSuspended),
    ("distillation.scheduling", Edit::WhileSuspended),
    ("distillation.podTemplate", Edit::WhileSuspended),
    ("distillation.students[].resources", Edit::WhileSuspended),
];

/// The run was suspended before this edit (an edit may resume it in the same write).
const WAS_SUSPENDED: &str = "(has(oldSelf.suspend) && oldSelf.suspend)";

/// The transition rules of the spec, from its schema (the object with `properties`): one per
/// top-level field, and for a field with editable parts inside (a stage) one for its fixed
/// parts and one for its editable ones.
pub fn transition_rules(spec: &Value) -> Vec<Value> {
    let mut rules = Vec::new();
    for (field, schema) in properties(spec) {
        let inside: Vec<(&str, Edit)> = EDITABLE
            .iter()
            .filter_map(|(path, edit)| Some((path.strip_prefix(field.as_str())?, *edit)))
            .filter_map(|(rest, edit)| Some((rest.strip_prefix('.')?, edit)))
            .collect();
        match EDITABLE.iter().find(|(path, _)| path == field).map(|e| e.1) {
            Some(Edit::Always) => {}
            Some(Edit::WhileSuspended) => rules.push(rule(
                &format!("{WAS_SUSPENDED} || {}", same(field)),
                &format!("spec.{field} may change only while the run is suspended (set spec.suspend: true first; the stage resumes from its checkpoint with the new value)"),
                field,
            )),
            None if inside.is_empty() => rules.push(rule(
                &same(field),
                &format!("spec.{field} is immutable: a run trains what it was created with (create a new RltRun to change it)"),
                field,
            )),
            None => rules.extend(composite_rules(field, schema, &inside)),
        }
    }
    rules
}

/// The two rules of a field with editable parts (`inside`: their paths below it).
fn composite_rules(field: &str, schema: &Value, inside: &[(&str, Edit)]) -> Vec<Value> {
    let mut fixed = Vec::new();
    let mut suspended = Vec::new();
    for (sub, sub_schema) in properties(schema) {
        let path = format!("{field}.{sub}");
        let element_edits: Vec<&str> = inside
            .iter()
            .filter_map(|(p, _)| p.strip_prefix(sub.as_str())?.strip_prefix("[]."))
            .collect();
        match inside.iter().find(|(p, _)| p == sub).map(|e| e.1) {
            Some(Edit::Always) => continue,
            Some(Edit::WhileSuspended) => {
                suspended.push(same(&path));
                continue;
            }
            None => {}
        }
        if element_edits.is_empty() {
            fixed.push(same(&path));
        } else {
            // Elements keep their names and fixed fields; the editable ones change only
            // while suspended.
            let items = &sub_schema["items"];
            let fixed_fields: Vec<String> = properties(items)
                .filter(|(f, _)| !element_edits.contains(&f.as_str()))
                .map(|(f, _)| same_in("x", "o", f))
                .collect();
            fixed.push(format!(
                "size(self.{path}) == size(oldSelf.{path}) && self.{path}.all(x, oldSelf.{path}.exists(o, {}))",
                fixed_fields.join(" && ")
            ));
            suspended.push(format!("self.{path} == oldSelf.{path}"));
        }
    }
    let editable: Vec<String> = inside
        .iter()
        .map(|(p, _)| format!("spec.{field}.{p}"))
        .collect();
    vec![
        rule(
            &fixed.join(" && "),
            &format!(
                "spec.{field} is immutable but for {} (which may change while the run is suspended): a run trains what it was created with",
                editable.join(", ")
            ),
            field,
        ),
        rule(
            &format!("{WAS_SUSPENDED} || ({})", suspended.join(" && ")),
            &format!(
                "{} may change only while the run is suspended (set spec.suspend: true first; the stage resumes from its checkpoint with the new values)",
                editable.join(", ")
            ),
            field,
        ),
    ]
}

fn properties(schema: &Value) -> impl Iterator<Item = (&String, &Value)> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(Map::iter)
}

/// `self.<path>` equals `oldSelf.<path>`, an absent field equal only to an absent one.
fn same(path: &str) -> String {
    same_in("self", "oldSelf", path)
}

fn same_in(new: &str, old: &str, path: &str) -> String {
    format!("(has({new}.{path}) == has({old}.{path}) && (!has({new}.{path}) || {new}.{path} == {old}.{path}))")
}

fn rule(rule: &str, message: &str, field: &str) -> Value {
    json!({"rule": rule, "message": message, "fieldPath": format!(".{field}")})
}
