#!/usr/bin/env bash
# What `make test` needs before it builds anything, one line per item:
#
#   tools       go, cargo, node, npm on PATH (the README's prerequisites; never installed here)
#   root        the local kubelet makes mount and network namespaces, veth pairs and routes
#   packages    Debian's chromium (browser test), iproute2 (pod networks), iptables and ipset
#               (the NetworkPolicy engine): installed with apt-get when missing and run as root
#   npm         tests/oidc and tests/browser from their lock files (`npm ci`, again only when a
#               package-lock.json changed)
#
# Exits 1 after listing everything that is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=0
ok() { printf 'ok       %s\n' "$*"; }
missing() { printf 'MISSING  %s\n' "$*" >&2; failed=1; }

# tool COMMAND VERSION-ARGS HOW-TO-INSTALL
tool() {
  if command -v "$1" >/dev/null; then
    ok "$1: $("$1" "$2" 2>&1 | head -n1)"
  else
    missing "$1: not on PATH; $3"
  fi
}
tool go version "install Go >= 1.26 (https://go.dev/dl/)"
tool cargo --version "install Rust >= 1.89 (https://rustup.rs/)"
tool node --version "install Node 20 (Debian: apt-get install nodejs)"
tool npm --version "install npm (Debian: apt-get install npm)"

if [ "$(id -u)" = 0 ]; then
  ok "root: the local kubelet can make namespaces, veth pairs and routes"
else
  missing "root: run make test as root (the local kubelet makes mount and network namespaces, veth pairs and routes)"
fi

# Debian package per command the tests run.
declare -A package_of=([chromium]=chromium [ip]=iproute2 [iptables]=iptables [ipset]=ipset)
absent=()
for command in chromium ip iptables ipset; do
  if command -v "$command" >/dev/null || [ -x "/usr/sbin/$command" ]; then
    ok "$command (Debian package ${package_of[$command]})"
  else
    absent+=("${package_of[$command]}")
  fi
done
if [ ${#absent[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${absent[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${absent[@]}"
    for package in "${absent[@]}"; do ok "$package: installed"; done
  else
    for package in "${absent[@]}"; do
      missing "Debian package $package: not installed; as root: apt-get install $package"
    done
  fi
fi

# npm ci removes node_modules first, so it runs only when the lock file differs from the one
# the installed packages came from (kept next to them).
if command -v npm >/dev/null; then
  for dir in tests/oidc tests/browser; do
    stamp="$dir/node_modules/.atelier-package-lock.json"
    if cmp -s "$dir/package-lock.json" "$stamp"; then
      ok "npm packages of $dir: up to date"
    elif (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error); then
      cp "$dir/package-lock.json" "$stamp"
      ok "npm packages of $dir: installed from package-lock.json"
    else
      missing "npm packages of $dir: npm ci failed (see above)"
    fi
  done
fi

exit "$failed"
