#!/usr/bin/env bash
# Builds the test control plane and its client tools from Go modules:
#
#   atelier-testcluster  etcd + kube-apiserver + kube-controller-manager + kube-scheduler, one process
#   kubectl              k8s.io/kubernetes/cmd/kubectl, same Kubernetes version
#   helm                 helm.sh/helm/v3/cmd/helm
#   kube-router          github.com/cloudnativelabs/kube-router/v2/cmd/kube-router, the
#                        NetworkPolicy engine of the tests (--run-firewall only; tests only)
#
# into ${ATELIER_CACHE:-$HOME/.cache/atelier}/bin. A binary is rebuilt only when
# its key changes: sha256 over the module's go.mod, go.sum and .go sources, this
# script and the Go version. The key is stored next to the binary (NAME.key).
#
# Works from a fresh clone with an empty Go cache (modules come from the Go
# proxy). Cold builds of the Kubernetes parts take a long time on few cores.
#
# Usage: tests/cluster/build.sh [--force] [atelier-testcluster|kubectl|helm|kube-router ...]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${ATELIER_CACHE:-$HOME/.cache/atelier}/bin"
mkdir -p "$bin"

force=0
targets=()
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    atelier-testcluster|kubectl|helm|kube-router) targets+=("$a") ;;
    *) echo "build.sh: unknown argument: $a" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(atelier-testcluster kubectl helm kube-router)

export CGO_ENABLED=0          # static binaries, no C toolchain needed
# readonly: a go.sum that lacks a hash fails the build instead of being rewritten.
export GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

sha() { sha256sum | cut -d' ' -f1; }

# key MODDIR [sources]: hash of the module's go.mod and go.sum (plus its own
# top-level .go files when the second argument is "sources"), this script and
# the Go version. Binaries built from packages in the module cache (kubectl,
# helm) are fully determined by go.sum.
key() {
  local moddir="$1" pattern='go\.(mod|sum)$'
  [ "${2:-}" = sources ] && pattern='(go\.(mod|sum)|\.go)$'
  {
    go version
    cat "$here/build.sh"
    # Top-level files only: tools/ holds other modules.
    (cd "$moddir" && find . -maxdepth 1 -type f | grep -E "$pattern" | LC_ALL=C sort |
      while read -r f; do echo "== $f"; cat "$f"; done)
  } | sha
}

# modversion MODDIR MODULE: the version of MODULE selected in MODDIR's go.mod.
modversion() {
  (cd "$1" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$2")
}

k8s_ldflags() {
  local v="$1" major minor
  major="${v#v}"; major="${major%%.*}"
  minor="${v#v*.}"; minor="${minor%%.*}"
  local out=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
  done
  echo "$out"
}

# build NAME MODDIR PACKAGE LDFLAGS
build() {
  local name="$1" moddir="$2" pkg="$3" ldflags="$4"
  local k
  if [ "$pkg" = . ]; then k="$(key "$moddir" sources)"; else k="$(key "$moddir")"; fi
  if [ "$force" = 0 ] && [ -x "$bin/$name" ] && [ "$(cat "$bin/$name.key" 2>/dev/null)" = "$k" ]; then
    echo "$name: up to date ($bin/$name)"
    return
  fi
  echo "$name: building ..."
  local t0=$SECONDS
  (cd "$moddir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.tmp" "$pkg")
  mv -f "$bin/$name.tmp" "$bin/$name"
  echo "$k" > "$bin/$name.key"
  printf '%s: built in %ds (%s)\n' "$name" $((SECONDS - t0)) "$(du -h "$bin/$name" | cut -f1)"
}

for t in "${targets[@]}"; do
  case "$t" in
    atelier-testcluster)
      v="$(modversion "$here" k8s.io/kubernetes)"
      build atelier-testcluster "$here" . "$(k8s_ldflags "$v")"
      ;;
    kubectl)
      v="$(modversion "$here" k8s.io/kubernetes)"
      build kubectl "$here" k8s.io/kubernetes/cmd/kubectl "$(k8s_ldflags "$v")"
      ;;
    helm)
      hdir="$here/tools/helm"
      hv="$(modversion "$hdir" helm.sh/helm/v3)"
      cg="$(modversion "$hdir" k8s.io/client-go)"   # v0.MINOR.PATCH -> Kubernetes 1.MINOR
      kminor="${cg#v0.}"; kminor="${kminor%%.*}"
      hflags="-X helm.sh/helm/v3/internal/version.version=$hv -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
      for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        hflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kminor"
      done
      build helm "$hdir" helm.sh/helm/v3/cmd/helm "$hflags"
      ;;
    kube-router)
      kdir="$here/tools/kube-router"
      kv="$(modversion "$kdir" github.com/cloudnativelabs/kube-router/v2)"
      build kube-router "$kdir" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router \
        "-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$kv"
      ;;
  esac
done
