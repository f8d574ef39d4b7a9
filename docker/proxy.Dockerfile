# syntax=docker/dockerfile:1
# The capstan-proxy image: the sidecar proxy.
#
#   docker build -f docker/proxy.Dockerfile -t capstan-proxy .     # from the repository root
#
# Multi-stage: the workspace is built with the locked dependency versions in a Debian 12
# (bookworm) Rust image, and only the binary is copied into distroless/cc-debian12 (glibc,
# libgcc, CA certificates; no shell, no package manager), running as the "nonroot" user
# (uid/gid 65532). The BuildKit cache mounts keep the cargo registry and target directory
# between builds; the binary is copied out of the cache mount before the stage ends.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,id=capstan-target \
    cargo build --release --locked -p capstan-proxy \
    && install -D -m 0755 target/release/capstan-proxy /out/capstan-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="capstan-proxy" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/capstan-proxy /usr/local/bin/capstan-proxy
USER 65532:65532
EXPOSE 15000 15001 15006 15021
ENTRYPOINT ["/usr/local/bin/capstan-proxy"]
