#!/usr/bin/env bash
# Regenerates the `replace` directives of tests/cluster/go.mod.
#
# k8s.io/kubernetes's own go.mod points its staging modules (k8s.io/api,
# k8s.io/apiserver, ...) at ./staging/src/k8s.io/<name>, which does not exist
# in the published module zip. Each of those modules is published separately
# as k8s.io/<name> v0.<minor>.<patch>; this script reads the replace block of
# the downloaded k8s.io/kubernetes go.mod and replaces every staging module
# that k8s.io/kubernetes requires with its published counterpart.
#
# Usage: tests/cluster/gen-replaces.sh [kubernetes-version]   (default v1.36.3)
set -euo pipefail
cd "$(dirname "$0")"

K8S_VERSION="${1:-v1.36.3}"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"

gomod="$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[ -f "$gomod" ] || { echo "cannot find go.mod of k8s.io/kubernetes@${K8S_VERSION}" >&2; exit 1; }

# Modules that k8s.io/kubernetes requires at the placeholder version v0.0.0.
required="$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u)"

# Modules it replaces with a ./staging path.
staged="$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod" | sort -u)"

# Drop replacements left over from a previous version, then add the current ones.
go mod edit -json | sed -n 's/^[[:space:]]*"Path": "\(k8s\.io\/[^"]*\)",\{0,1\}$/\1/p' | sort -u |
while read -r old; do
  [ "$old" = "k8s.io/kubernetes" ] && continue
  go mod edit -dropreplace="$old" 2>/dev/null || true
done

n=0
for m in $(comm -12 <(echo "$required") <(echo "$staged")); do
  go mod edit -replace="${m}=${m}@${STAGING_VERSION}"
  n=$((n + 1))
done
go mod edit -require="k8s.io/kubernetes@${K8S_VERSION}"
echo "gen-replaces: ${n} staging modules of k8s.io/kubernetes@${K8S_VERSION} replaced with ${STAGING_VERSION}" >&2
