# Atelier — build, test and demo entry points. See README.md.
SHELL := /bin/bash
export ATELIER_CACHE ?= $(HOME)/.cache/atelier
# One target dir outside the clone, so that fresh clones (CI) reuse compiled dependencies.
export CARGO_TARGET_DIR ?= $(ATELIER_CACHE)/target
export PATH := $(ATELIER_CACHE)/bin:$(PATH)

.PHONY: all build test test-prerequisites lint unit e2e crds check-crds cluster demo parity bench bench-inference cuda clean

all: build

build:
	cargo build --workspace --locked --bins

## Every test: formatting, lints, unit tests and the end-to-end tests against the real control plane.
## Installs what the tests need first (tests/prerequisites.sh); cleans up the machine after.
test: test-prerequisites lint cluster build
	# End-to-end binaries share one control plane each; a few tests at a time keep timeouts honest on 2 cores.
	tests/with-cleanup.sh cargo test --workspace --locked --no-fail-fast -- --test-threads=3

test-prerequisites:
	tests/prerequisites.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## The test control plane, kubectl, helm and kube-router (the tests' NetworkPolicy engine), built from Go modules into $(ATELIER_CACHE)/bin.
cluster:
	tests/cluster/build.sh

## Regenerate the CRD YAML shipped with the chart from the Rust types.
crds:
	cargo run --locked -q -p atelier-crds --bin crdgen -- --out-dir charts/atelier/crds

## Run the whole platform locally: control plane, kubelet, operator, API, OIDC provider, tiny model.
demo: cluster build
	scripts/demo.sh

parity:
	inference/parity/run.sh

bench-inference:
	inference/bench/bench.sh

## atelier-inference and model_tool with CUDA, in release, without a GPU or a container engine:
## nvcc and the libraries from pinned CUDA 13.0 wheels (docs/install.md; about 30 min on 2 cores
## the first time). Not part of `make test`. CUDA_COMPUTE_CAP=90 (H100/H200) unless given.
cuda:
	scripts/cuda-build.sh

## Control-plane, API and fault benchmarks against the test control plane (about 25 min on 2
## cores, 10 000 jobs): rewrites the generated part of docs/benchmarks.md and docs/benchmarks.json.
## Fewer jobs: make bench BENCH_ARGS='--closed-jobs 300,400,800 --paced-jobs 150,200,300' (see atelier-bench --help).
bench: cluster build
	[ -d tests/oidc/node_modules ] || npm ci --prefix tests/oidc
	$(CARGO_TARGET_DIR)/debug/atelier-bench $(BENCH_ARGS)

clean:
	cargo clean
