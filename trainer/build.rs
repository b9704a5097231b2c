// Generates the parameter-server gRPC code from proto/param_server.proto, using the protoc
// binary vendored as a crate so no system protoc is needed; and makes the binaries load
// libtorch's CUDA backend.
use std::path::{Path, PathBuf};

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
    c10d();
    Ok(())
}

/// Where the installed libtorch is: (its `lib/`, its `include/`, the site-packages around it).
fn libtorch() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?);
    let torch = lib.parent()?.to_path_buf();
    let site = torch.parent()?.to_path_buf();
    Some((lib, torch.join("include"), site))
}

/// The CUDA runtime's headers beside torch (PyPI's `nvidia-cuda-runtime` and
/// `nvidia-cuda-crt` wheels), where libtorch has its CUDA backend.
fn cuda_include(lib: &Path, site: &Path) -> Option<PathBuf> {
    if !lib.join("libc10_cuda.so").exists() {
        return None;
    }
    std::fs::read_dir(site.join("nvidia"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("include"))
        .find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_config.h").exists())
}

/// `csrc/c10d.cpp`, the C face of libtorch's c10d process groups (`src/c10d.rs`), compiled
/// against the installed libtorch's headers and Gloo's (ProcessGroupGloo.hpp includes them and
/// the PyPI wheel leaves them out: Debian's `libgloo-dev`, or `RLT_GLOO_INCLUDE`). Gloo only:
/// ProcessGroupNCCL lives in libtorch_cuda.so, which the CPU image's binary must not need
/// (images/stage.sh drops it), so NCCL waits for a library of its own loaded at run time.
fn c10d() {
    println!("cargo:rerun-if-changed=csrc/c10d.cpp");
    println!("cargo:rerun-if-env-changed=RLT_GLOO_INCLUDE");
    let Some((lib, include, _)) = libtorch() else {
        panic!("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB)");
    };
    let gloo = std::env::var_os("RLT_GLOO_INCLUDE").map(PathBuf::from);
    let gloo_dir = gloo
        .clone()
        .unwrap_or_else(|| PathBuf::from("/usr/include"));
    if !gloo_dir.join("gloo/context.h").exists() {
        panic!(
            "no Gloo headers ({}/gloo/context.h): libtorch's ProcessGroupGloo.hpp needs them. \
             Install Debian's libgloo-dev (scripts/dev setup does) or set RLT_GLOO_INCLUDE",
            gloo_dir.display()
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None);
    if let Some(g) = gloo {
        build.include(g);
    }
    build.file("csrc/c10d.cpp").compile("rlt_c10d");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}

/// `csrc/cuda_stats.cpp` (the caching allocator's peak, which tch does not expose), built
/// where libtorch has its CUDA backend and the CUDA runtime headers are installed (PyPI's
/// `nvidia-cuda-runtime` and `nvidia-cuda-crt` wheels beside torch); `cfg(rlt_cuda_stats)`
/// tells the crate it is there.
fn cuda_stats() {
    println!("cargo:rustc-check-cfg=cfg(rlt_cuda_stats)");
    println!("cargo:rerun-if-changed=csrc/cuda_stats.cpp");
    let Some((lib, include, site)) = libtorch() else {
        return;
    };
    let Some(cuda) = cuda_include(&lib, &site) else {
        println!("cargo:warning=no CUDA libtorch or CUDA headers: the GPU check reports no allocator peak");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
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
