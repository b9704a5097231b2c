//! The trainer's layers: every `crate::` path in `src/` leads to the module's own layer or a
//! lower one, so the folders read bottom-up (model, engine, data, train, stage, then the
//! stages and tools on top) and none of them needs one above it.
use std::collections::BTreeSet;
use std::path::Path;

/// Bottom first; modules in one entry may use each other.
const LAYERS: &[&[&str]] = &[
    &["exit", "device", "metrics"],
    &["model"],
    &["engine"],
    &["data"],
    &["train"],
    &["stage"],
    &["rl", "eval"],
    &["distill"],
    &["pipeline"],
    &["bench"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of tests/layout.rs"))
}

/// The top-level modules named by `crate::` paths in `text`, comments left out (a doc link
/// is not a dependency).
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_module_uses_only_its_own_layer_and_those_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut wrong = Vec::new();
    let mut seen = 0;
    for path in all {
        let rel = path.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs");
        if matches!(module, "lib" | "main") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for used in uses(&text) {
            seen += 1;
            if layer(&used) > layer(module) {
                wrong.push(format!("{} uses crate::{used}", rel.display()));
            }
        }
    }
    assert!(
        seen > 100,
        "only {seen} crate:: paths found: is src/ where it was?"
    );
    assert!(
        wrong.is_empty(),
        "imports going up a layer:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn a_path_up_a_layer_is_caught() {
    assert!(uses("use crate::rl::learner; // crate::bench").contains("rl"));
    assert!(!uses("/// see [`crate::bench`]").contains("bench"));
    assert!(layer("rl") > layer("train"));
}
