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
    cuda_stats();
    Ok(())
}

/// `csrc/cuda_stats.cpp` (the caching allocator's peak, which tch does not expose), built
/// where libtorch has its CUDA backend and the CUDA runtime headers are installed (PyPI's
/// `nvidia-cuda-runtime` and `nvidia-cuda-crt` wheels beside torch); `cfg(rlt_cuda_stats)`
/// tells the crate it is there.
fn cuda_stats() {
    println!("cargo:rustc-check-cfg=cfg(rlt_cuda_stats)");
    println!("cargo:rerun-if-changed=csrc/cuda_stats.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = Path::new(&lib);
    let site = lib.parent().and_then(Path::parent);
    let (Some(torch), Some(site)) = (lib.parent(), site) else {
        return;
    };
    let cuda = std::fs::read_dir(site.join("nvidia"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("include"))
        .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_config.h").exists());
    let (true, Some(cuda)) = (lib.join("libc10_cuda.so").exists(), cuda) else {
        println!("cargo:warning=no CUDA libtorch or CUDA headers: the GPU check reports no allocator peak");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(cuda)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .file("csrc/cuda_stats.cpp")
        .compile("rlt_cuda_stats");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=c10_cuda");
    println!("cargo:rustc-cfg=rlt_cuda_stats");
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
