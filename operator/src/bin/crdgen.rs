//! `crdgen` writes the generated CRD files; `crdgen --check` exits 1 when a committed file
//! differs from what the types generate (CI runs it). Run from the repository root, or pass
//! `--root <dir>`.
use rlt_operator::crdgen::generated_files;
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    let root = args
        .iter()
        .position(|a| a == "--root")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let mut stale = Vec::new();
    for (rel, text) in generated_files() {
        let path = root.join(rel);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(rel);
            }
        } else {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            }
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        eprintln!(
            "out of date (run `cargo run -p rlt-operator --bin crdgen`): {}",
            stale.join(", ")
        );
        std::process::exit(1);
    }
}
