# reaper-operator container image.
#
#   docker build -t reaper-operator:dev .
#   docker run --rm reaper-operator:dev --help
#
# Builder: `cargo build --locked --release` (the Makefile's `build` target, with the
# committed Cargo.lock) on Rust 1.95, the toolchain CI runs today (override with
# --build-arg RUST_VERSION=...). Final stage: distroless cc (glibc, libgcc, CA
# certificates; no shell, no package manager), as uid/gid 65532 ("nonroot"), which the
# Helm chart's securityContext also sets. The TLS stack is rustls: no OpenSSL needed.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src

# 1. Dependencies only: this layer is rebuilt when Cargo.toml or Cargo.lock change, not
#    when the sources do. Stub targets satisfy the manifest (the lib, the binary and the
#    declared bench); the stub crate's own artefacts are removed afterwards so that the
#    real build below cannot reuse them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' >src/main.rs \
 && : >src/lib.rs \
 && echo 'fn main() {}' >benches/lease.rs \
 && cargo build --locked --release \
 && rm -rf src benches \
      target/release/reaper-operator* \
      target/release/deps/reaper_operator-* \
      target/release/deps/libreaper_operator-* \
      target/release/.fingerprint/reaper-operator-*

# 2. The crate itself (src/, migrations/ embedded by sqlx::migrate!, benches/ for the
#    manifest). `touch` makes cargo rebuild even if COPY kept older timestamps; the
#    --version check fails the build if the stub binary were ever shipped (it prints
#    nothing).
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN touch src/main.rs src/lib.rs \
 && cargo build --locked --release \
 && install -D -m 0755 target/release/reaper-operator /out/reaper-operator \
 && /out/reaper-operator --version | grep -q '^reaper-operator '

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="reaper-operator" \
      org.opencontainers.image.description="Runs exactly one instance of a singleton workload across replicas and clusters, arbitrated by a PostgreSQL lease" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/reaper-operator /reaper-operator
USER 65532:65532
# /metrics, /healthz, /readyz (REAPER_HTTP_ADDR, default 0.0.0.0:8080).
EXPOSE 8080
ENTRYPOINT ["/reaper-operator"]
CMD ["run"]
