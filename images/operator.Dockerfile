# syntax=docker/dockerfile:1.7
# The operator: a small, non-root, distroless image. It never links libtorch.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and compiled dependencies between builds, so a change to
# operator code rebuilds only the operator crates.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p rlt-operator --bin rlt-operator \
 && install -D target/release/rlt-operator /out/rlt-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/rlt-operator /usr/local/bin/rlt-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/rlt-operator"]
