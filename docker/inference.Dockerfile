# syntax=docker/dockerfile:1.7
# atelier-inference, CPU build: the tenant's outputs server (`serve-outputs`) and CPU-only
# inference (tests, demos, tiny models). Real FLUX.1 inference needs the CUDA image
# (docker/inference-cuda.Dockerfile). Build from the repository root:
#
#   docker build -f docker/inference.Dockerfile -t ghcr.io/atelier-dev/atelier-inference:0.1.0-cpu .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# Portable by default; e.g. RUSTFLAGS="-C target-cpu=x86-64-v3" for AVX2 hosts only.
ARG RUSTFLAGS=""
ENV RUSTFLAGS=${RUSTFLAGS}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p atelier-inference \
 && cp target/release/atelier-inference /atelier-inference

# glibc (not musl): its allocator and threads matter for the numeric kernels.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="atelier-inference" \
      org.opencontainers.image.description="Atelier Flux inference server (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /atelier-inference /usr/local/bin/atelier-inference
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/atelier-inference"]
