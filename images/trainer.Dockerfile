# The trainer: its binary and the libtorch libraries of the PyTorch wheel it was built against
# (torch 2.13.0, the version tch 0.26 binds), staged by images/stage.sh as trainer-cpu (only
# what the CPU backend loads) or trainer-cuda (CUDA 13.0, cuDNN 9 and NCCL from the nvidia
# wheels; the GPU nodes need an NVIDIA driver of the 580 series or newer). The image carries
# those libraries itself: nothing from the host but the driver is used. Non-root, the user
# the operator's pods run as (operator/src/children/mod.rs RUN_AS). Built by images/build.sh.
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE}
ARG TORCH_VERSION=unknown
ARG FLAVOR=cpu
LABEL org.opencontainers.image.title="rlt-trainer" \
      dev.rlt.libtorch.version="${TORCH_VERSION}" \
      dev.rlt.libtorch.backends="${FLAVOR}"
# The libraries first: they change only with torch, so rebuilds reuse that layer.
COPY rootfs/opt/ /opt/
COPY rootfs/usr/ /usr/
ENV LD_LIBRARY_PATH=/opt/torch/site-packages/torch/lib
# The CUDA caching allocator grows segments instead of carving fixed blocks: far less
# fragmentation for the learners' changing shapes (the memory preflight's margin assumes it).
ENV PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
USER 65532:65532
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/rlt-trainer"]
