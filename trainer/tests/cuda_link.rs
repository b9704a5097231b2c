//! The built `rlt-trainer` loads libtorch's CUDA backend. Rust links with `--as-needed` and
//! nothing in the binary references a symbol of `libtorch_cuda.so`, so without the build
//! script's forced link the library is dropped and every CUDA tensor fails on a GPU. PyPI's
//! torch (what the project installs) is the CUDA build, so this is checkable without a GPU.
use std::path::Path;
use std::process::Command;

fn needed_libraries(binary: &str) -> Vec<String> {
    let out = Command::new("readelf")
        .args(["-d", binary])
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf -d {binary} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect()
}

#[test]
fn the_trainer_binary_needs_libtorch_cuda_when_libtorch_has_it() {
    let lib = env!("RLT_LIBTORCH_LIB");
    let needed = needed_libraries(env!("CARGO_BIN_EXE_rlt-trainer"));
    assert!(
        needed.iter().any(|n| n == "libtorch.so"),
        "libtorch.so not needed: {needed:?}"
    );
    if Path::new(lib).join("libtorch_cuda.so").exists() {
        assert!(
            needed.iter().any(|n| n == "libtorch_cuda.so"),
            "{lib} has libtorch_cuda.so but the binary does not need it: {needed:?}"
        );
    }
}

/// Dynamic symbols of an ELF file: undefined ones (what it takes) or defined ones (what it
/// gives).
fn dynamic_symbols(file: &str, defined: bool) -> std::collections::BTreeSet<String> {
    let which = if defined {
        "--defined-only"
    } else {
        "--undefined-only"
    };
    let out = Command::new("nm")
        .args(["-D", which, file])
        .output()
        .expect("nm (binutils) runs");
    assert!(out.status.success(), "nm -D {which} {file} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

/// The CPU image's binary is this one with `libtorch_cuda.so` dropped from its NEEDED list
/// (images/stage.sh): it starts only while no symbol it takes comes from there (such as
/// ProcessGroupNCCL's, which made every CPU pod exit 127 with "undefined symbol").
#[test]
fn the_trainer_binary_takes_nothing_from_libtorch_cuda() {
    let cuda = Path::new(env!("RLT_LIBTORCH_LIB")).join("libtorch_cuda.so");
    if !cuda.exists() {
        return;
    }
    let given = dynamic_symbols(cuda.to_str().unwrap(), true);
    let taken = dynamic_symbols(env!("CARGO_BIN_EXE_rlt-trainer"), false);
    let from_cuda: Vec<_> = taken.intersection(&given).take(5).collect();
    assert!(
        from_cuda.is_empty(),
        "the binary takes symbols of libtorch_cuda.so: {from_cuda:?}"
    );
}
