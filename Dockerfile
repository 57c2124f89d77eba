# reaper-operator container image.
#
#   podman build -t reaper-operator:dev .        (or docker build; BuildKit/buildah)
#   podman run --rm reaper-operator:dev --help
#
# Both base images are build arguments whose defaults are the public images, pinned by
# digest so that a rebuild uses the bytes that were reviewed:
#   BUILDER_IMAGE  the Rust toolchain (cargo on PATH, CARGO_HOME=/usr/local/cargo)
#   RUNTIME_IMAGE  glibc, libgcc and CA certificates, no shell, user 65532 ("nonroot")
# tests/image/build.sh builds this file with locally made stand-ins for both (no
# registry needed) and checks the result.
#
# Only the binary is built (`--bin reaper-operator`), so the image never depends on the
# list of tests or benches; it is static, and doubles as the workload's guard
# (docs/guard.md). The cargo registry and target directory are cache mounts:
# a rebuild after a source change recompiles the crate, not its dependencies. The TLS
# stack is rustls: no OpenSSL in the image.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
# Cargo reads every target the manifest names, the tests with their own harness too.
COPY tests ./tests
# Statically linked (glibc, crt-static; an explicit --target keeps build scripts and
# proc macros dynamic), so that `reaper-operator install-guard` can copy it into any
# workload image. The checks fail the build if the binary does not run or is dynamic.
RUN --mount=type=cache,id=reaper-operator-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=reaper-operator-target,target=/src/target \
    target="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --release --target "$target" --bin reaper-operator \
 && install -D -m 0755 "target/$target/release/reaper-operator" /out/reaper-operator \
 && /out/reaper-operator --version | grep -q '^reaper-operator ' \
 && ! readelf --program-headers /out/reaper-operator | grep -q INTERP

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="reaper-operator" \
      org.opencontainers.image.description="Runs exactly one instance of a singleton workload across replicas and clusters, arbitrated by a PostgreSQL lease" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/reaper-operator /reaper-operator
USER 65532:65532
# /metrics, /healthz, /readyz (REAPER_HTTP_ADDR, default 0.0.0.0:8080).
EXPOSE 8080
ENTRYPOINT ["/reaper-operator"]
CMD ["run"]
