#!/usr/bin/env bash
# Assembles the build context of one image from binaries already built on this machine, so
# every image builder (Docker's `images/build.sh`, the e2e's daemonless buildah) runs the same
# recipe on the same files:
#
#   images/stage.sh operator|trainer-cpu|trainer-cuda OUT
#
# OUT/rootfs/ is what the recipe copies to `/`:
# - operator: usr/local/bin/rlt-operator (it never links libtorch);
# - trainer-*: usr/local/bin/rlt-trainer and, under opt/torch/site-packages/, the libtorch
#   libraries from the PyTorch wheel the binary was built against, in the wheel's layout (its
#   RPATH finds the nvidia wheels' libraries relative to torch/lib).
#   - trainer-cpu: only what the binary loads once its CUDA backend is dropped. PyPI's torch is
#     the CUDA build and trainer/build.rs force-links libtorch_cuda.so (and libtorch.so, which
#     needs it); the CPU image's binary is that same binary with those two NEEDED entries
#     removed (patchelf): exactly what the linker produced before the force-link, since the
#     binary uses no symbol of either. What stays is the NEEDED closure inside the wheels:
#     libtorch_cpu, libc10, libgomp and, because the CUDA wheel's libtorch_cpu.so names them,
#     libcudart and libcupti (5 MB; they load without a GPU).
#   - trainer-cuda: torch/lib whole (libtorch_cuda_linalg, cuDNN's engines and NVRTC's builtins
#     are dlopen()ed, not NEEDED) and the nvidia wheels' libraries (CUDA 13, cuDNN 9, NCCL).
# The binaries come from ${RLT_RELEASE_DIR:-target/release}; the wheel from the Python that
# torch-sys used (${RLT_PYTHON:-python3}). Prints the staged size.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REL="${RLT_RELEASE_DIR:-$ROOT/target/release}"
what="${1:?usage: images/stage.sh operator|trainer-cpu|trainer-cuda OUT}"
out="${2:?usage: images/stage.sh IMAGE OUT}"
rm -rf "$out"
mkdir -p "$out/rootfs/usr/local/bin"

needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }

case "$what" in
  operator)
    install -m 0755 "$REL/rlt-operator" "$out/rootfs/usr/local/bin/rlt-operator"
    ;;
  trainer-cpu | trainer-cuda)
    site="$("${RLT_PYTHON:-python3}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    [ -d "$site/torch/lib" ] || { echo "no torch/lib under $site (set RLT_PYTHON)" >&2; exit 1; }
    dest="$out/rootfs/opt/torch/site-packages"
    bin="$out/rootfs/usr/local/bin/rlt-trainer"
    install -m 0755 "$REL/rlt-trainer" "$bin"
    if [ "$what" = trainer-cuda ]; then
      [ -e "$site/torch/lib/libtorch_cuda.so" ] || { echo "$site/torch is not a CUDA build" >&2; exit 1; }
      needed "$bin" | grep -qx libtorch_cuda.so || { echo "rlt-trainer does not load libtorch_cuda.so" >&2; exit 1; }
      mkdir -p "$dest/torch"
      cp -a "$site/torch/lib" "$dest/torch/lib"
      rm -f "$dest/torch/lib/libtorch_python.so"
      [ -d "$site/nvidia" ] && cp -a "$site/nvidia" "$dest/nvidia"
      find "$dest/nvidia" \( -name '*.a' -o -name '*.h' -o -name '__pycache__' -o -name '*.py' \) -prune -exec rm -rf {} + 2>/dev/null || true
    else
      drop=()
      for lib in libtorch_cuda.so libtorch.so; do
        if needed "$bin" | grep -qx "$lib"; then drop+=(--remove-needed "$lib"); fi
      done
      if [ "${#drop[@]}" -gt 0 ]; then
        command -v patchelf >/dev/null || { echo "patchelf missing (apt-get install patchelf)" >&2; exit 1; }
        patchelf "${drop[@]}" "$bin"
      fi
      # The NEEDED closure within the wheels (glibc, libstdc++ and libgcc_s come from the base).
      dirs=("$site/torch/lib")
      for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && dirs+=("$d"); done
      queue=("$bin")
      declare -A seen=()
      while [ "${#queue[@]}" -gt 0 ]; do
        f="${queue[0]}"
        queue=("${queue[@]:1}")
        for name in $(needed "$f"); do
          [ -z "${seen[$name]:-}" ] || continue
          seen[$name]=1
          for d in "${dirs[@]}"; do
            if [ -e "$d/$name" ]; then
              rel="${d#"$site"/}"
              mkdir -p "$dest/$rel"
              cp -a "$d/$name" "$dest/$rel/"
              queue+=("$d/$name")
              break
            fi
          done
        done
      done
    fi
    ;;
  *) echo "unknown image '$what' (operator, trainer-cpu, trainer-cuda)" >&2; exit 2 ;;
esac
echo "staged $what: $(du -sh --apparent-size "$out/rootfs" | cut -f1) in $out/rootfs" >&2
