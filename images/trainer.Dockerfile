# syntax=docker/dockerfile:1.7
# The trainer, on libtorch from the PyTorch wheel tch 0.26 is built against (torch 2.13.0).
#   CPU:  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   (2.13.0+cpu)
#   CUDA: --build-arg TORCH_INDEX_URL=https://pypi.org/simple   (PyPI's torch is the CUDA build:
#         2.13.0+cu130, i.e. libtorch with CUDA 13.0 and cuDNN 9.20 from the nvidia-* wheels,
#         which needs an NVIDIA driver of the 580 series or newer on the nodes)
# The image carries those libraries itself; nothing from the host but the driver is used.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM rust:1.95-bookworm AS build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
      --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"
ENV LIBTORCH_USE_PYTORCH=1 PATH=/opt/torch/bin:$PATH
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p rlt-trainer --bin rlt-trainer \
 && install -D target/release/rlt-trainer /out/rlt-trainer \
 # A CUDA libtorch must be loaded by the binary (see trainer/build.rs), or no GPU works.
 && lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")') \
 && if [ -e "$lib/libtorch_cuda.so" ]; then \
      readelf -d /out/rlt-trainer | grep -q 'NEEDED.*\[libtorch_cuda.so\]' \
      || { echo "rlt-trainer does not load libtorch_cuda.so" >&2; exit 1; }; \
    fi \
 # Keep torch/lib and the nvidia wheels' libraries in their site-packages layout: libtorch's
 # RPATH finds the CUDA libraries relative to itself.
 && site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && mkdir -p /out/site-packages \
 && cp -a "$site/torch" /out/site-packages/torch \
 && if [ -d "$site/nvidia" ]; then cp -a "$site/nvidia" /out/site-packages/nvidia; fi \
 && find /out/site-packages/torch -mindepth 1 -maxdepth 1 ! -name lib -exec rm -rf {} +

FROM debian:bookworm-slim
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
LABEL org.opencontainers.image.title="rlt-trainer" \
      dev.rlt.libtorch.version="${TORCH_VERSION}" \
      dev.rlt.libtorch.index="${TORCH_INDEX_URL}"
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --create-home --shell /usr/sbin/nologin rlt
COPY --from=build /out/site-packages /opt/torch/site-packages
COPY --from=build /out/rlt-trainer /usr/local/bin/rlt-trainer
ENV LD_LIBRARY_PATH=/opt/torch/site-packages/torch/lib
# The CUDA caching allocator grows segments instead of carving fixed blocks: far less
# fragmentation for the learners' changing shapes (the memory preflight's margin assumes it).
ENV PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/rlt-trainer"]
