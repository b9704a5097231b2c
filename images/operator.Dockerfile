# The operator: its binary (staged by images/stage.sh from a release build) on a distroless
# base: glibc and libgcc, no shell, no package manager. It never links libtorch. Non-root, the
# user the chart's securityContext names. Built by images/build.sh, with Docker or buildah.
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE}
COPY rootfs/ /
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/rlt-operator"]
