// Generates the parameter-server gRPC code from proto/param_server.proto, using the protoc
// binary vendored as a crate so no system protoc is needed; and makes the binaries load
// libtorch's CUDA backend.
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/param_server.proto");
    // Chunk payloads as `Bytes`: slices of one buffer when sent, of the received frame when
    // decoded, instead of a copy per chunk each way.
    tonic_prost_build::configure()
        .bytes(".rlt.ps.v1.TensorChunk.data")
        .compile_protos(&["proto/param_server.proto"], &["proto"])?;
    link_cuda_backend();
    Ok(())
}

/// Rust links with `--as-needed`, and nothing in a tch binary references a symbol of
/// `libtorch_cuda.so`: the linker drops it, libtorch's CUDA backend is never registered, and
/// every CUDA tensor fails on any GPU. tch-rs's own binaries force the link the same way.
/// torch-sys tells its direct dependents where libtorch is (`DEP_TCH_LIBTORCH_LIB`).
fn link_cuda_backend() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not say where libtorch is: the CUDA backend is not force-linked");
        return;
    };
    // Where the tests look for the libraries the binary must need.
    println!("cargo:rustc-env=RLT_LIBTORCH_LIB={lib}");
    let mut args = vec![
        "-Wl,--no-as-needed".to_string(),
        format!("-L{lib}"),
        "-ltorch".into(),
    ];
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        args.push("-ltorch_cuda".into());
    }
    args.push("-Wl,--as-needed".into());
    for a in args {
        println!("cargo:rustc-link-arg-bins={a}");
    }
}
