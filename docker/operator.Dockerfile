# syntax=docker/dockerfile:1.7
# atelier-operator: the controllers (`controller`) and the API + web page (`api`) in one static
# binary on a distroless base. Build from the repository root:
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/atelier-dev/atelier-operator:0.1.0 .
#
# Multi-arch with buildx (each platform builds natively, e.g. under QEMU):
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/operator.Dockerfile ...

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
# musl-gcc for ring (TLS), so that the binary is fully static.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
ARG TARGETARCH
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p atelier-operator --target "$(cat /rust-target)" \
 && cp "target/$(cat /rust-target)/release/atelier-operator" /atelier-operator

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="atelier-operator" \
      org.opencontainers.image.description="Atelier controllers and API" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /atelier-operator /usr/local/bin/atelier-operator
# The nonroot user of distroless (the chart runs it with runAsUser 65532 too).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/atelier-operator"]
