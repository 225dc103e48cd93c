# syntax=docker/dockerfile:1.7
# atelier-inference with CUDA (candle's cuda feature): the image tenants' inference pods run on
# GPU nodes. No GPU is needed to build it, but the kernels are compiled for one compute
# capability, given by CUDA_COMPUTE_CAP: 80 (A100), 86 (A10/RTX 30), 89 (L4/L40S/RTX 40),
# 90 (H100/H200). Build from the repository root:
#
#   docker build -f docker/inference-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 \
#     -t ghcr.io/atelier-dev/atelier-inference:0.1.0 .

ARG CUDA_VERSION=12.6.3
ARG UBUNTU_VERSION=22.04

FROM docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
ARG RUST_VERSION=1.95
ARG CUDA_COMPUTE_CAP=80
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:${PATH}
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
# Read by candle's kernel build (there is no GPU to ask at build time).
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p atelier-inference --features cuda \
 && cp target/release/atelier-inference /atelier-inference

# The runtime image carries cuBLAS, cuRAND and NVRTC; the driver comes from the node.
FROM docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
ARG CUDA_COMPUTE_CAP=80
LABEL org.opencontainers.image.title="atelier-inference" \
      org.opencontainers.image.description="Atelier Flux inference server (CUDA, compute capability ${CUDA_COMPUTE_CAP})" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /atelier-inference /usr/local/bin/atelier-inference
ENV HOME=/tmp NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/atelier-inference"]
