# syntax=docker/dockerfile:1.7
# atelier-inference with CUDA (candle's cuda feature): the image tenants' inference pods run on
# GPU nodes. Built exactly as `make cuda` builds it (scripts/cuda-build.sh): nvcc and the CUDA
# libraries from the same pinned CUDA 13.0 wheels of PyPI, a link-only libcuda stub, no GPU.
# The kernels are compiled for one compute capability, CUDA_COMPUTE_CAP: 80 (A100),
# 86 (A10/RTX 30), 89 (L4/L40S/RTX 40), 90 (H100/H200). Nodes need a driver for CUDA 13.0 or
# newer (R580+). Build from the repository root:
#
#   docker build -f docker/inference-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 \
#     -t ghcr.io/atelier-dev/atelier-inference:0.1.0 .

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The wheels' venv and the target dir live in build caches; what the image needs is copied
# out: the binary and the CUDA libraries it loads (its NEEDED cudart, cublas, curand, and
# cublasLt, which cublas needs).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cache \
    ATELIER_CACHE=/cache CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} scripts/cuda-build.sh \
 && cp /cache/target-cuda/release/atelier-inference /atelier-inference \
 && mkdir /cuda-lib \
 && for lib in cudart curand cublas cublasLt; do \
      cp "$(readlink -f /cache/cuda-13.0/link/lib/lib$lib.so)" /cuda-lib/; \
    done

# The driver (libcuda.so.1) is mounted from the node by the NVIDIA container toolkit; the
# CUDA 13.0 libraries come from the wheels above, found through LD_LIBRARY_PATH.
FROM docker.io/library/debian:bookworm-slim
ARG CUDA_COMPUTE_CAP=90
LABEL org.opencontainers.image.title="atelier-inference" \
      org.opencontainers.image.description="Atelier Flux inference server (CUDA 13.0, compute capability ${CUDA_COMPUTE_CAP})" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /cuda-lib/ /usr/local/lib/atelier-cuda/
COPY --from=build /atelier-inference /usr/local/bin/atelier-inference
ENV HOME=/tmp LD_LIBRARY_PATH=/usr/local/lib/atelier-cuda \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/atelier-inference"]
