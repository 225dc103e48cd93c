#!/usr/bin/env bash
# Runs a command (the tests) with a TMPDIR of its own, then removes the machine-global state
# tests leave, however the command ends:
#
#   - that TMPDIR: cluster directories, kept temp dirs of the API and browser tests, the tiny
#     model, screenshots;
#   - the kubelet's routes of the pod range 198.18.1.0/24 (the host's address 198.18.1.1 and
#     the unreachable rest), unless another kubelet on the machine still holds pod addresses
#     (each lease is an abstract unix socket `@atelier-pod-ip-ADDRESS`);
#   - kube-router's iptables chains and ipsets (tests/cluster/kube-router-cleanup.sh), unless
#     a kube-router still runs: a test binary's shared cluster is never dropped, so its engine
#     dies with the process without cleaning up.
#
# Pod network namespaces, veth pairs and their routes need no cleanup: they live as long as
# the kubelet's file descriptors (see tests/src/kubelet/network.rs).
#
# Usage: tests/with-cleanup.sh COMMAND [ARG...]; exits with the command's status.
# ATELIER_KEEP_TMP=1 keeps the TMPDIR (operator and container logs) and prints where it is.
set -euo pipefail

run_tmp="$(mktemp -d "${TMPDIR:-/tmp}/atelier-test.XXXXXX")"
cleanup() {
  if [ "${ATELIER_KEEP_TMP:-0}" = 1 ]; then
    echo "with-cleanup.sh: kept the tests' TMPDIR $run_tmp" >&2
  else
    rm -rf "$run_tmp"
  fi
  if ! grep -q '@atelier-pod-ip-' /proc/net/unix 2>/dev/null; then
    ip route del local 198.18.1.1/32 dev lo table local 2>/dev/null || true
    ip route del unreachable 198.18.1.0/24 2>/dev/null || true
  fi
  if command -v iptables >/dev/null && ! pgrep -x kube-router >/dev/null; then
    "$(dirname "${BASH_SOURCE[0]}")/cluster/kube-router-cleanup.sh" ||
      echo "with-cleanup.sh: removing kube-router's rules failed" >&2
  fi
}
trap cleanup EXIT
TMPDIR="$run_tmp" "$@"
