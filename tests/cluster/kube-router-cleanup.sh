#!/usr/bin/env bash
# Removes what kube-router's network-policy controller leaves on the machine when it stops:
# its iptables chains in the filter table (and the jumps to them) and its ipsets. kube-router
# v2.1.0 keeps them on SIGTERM, and its own `--cleanup-config` removes none of them (it saves
# no table before cleaning) and then crashes in the service proxy's cleanup.
#
# Run it only when no kube-router runs. Usage: tests/cluster/kube-router-cleanup.sh
set -euo pipefail

chains='KUBE-(ROUTER-(INPUT|FORWARD|OUTPUT)|NWPLCY-[A-Z0-9]+|POD-FW-[A-Z0-9]+)'
filter="$(iptables-save -t filter)"
if grep -qE "$chains" <<<"$filter"; then
  # The filter table without those chains' declarations, rules and jumps; iptables-restore
  # replaces the table with it.
  grep -vE "$chains" <<<"$filter" | iptables-restore
fi
# No sets left is fine: grep's status 1 must not become the script's.
{ ipset list -n | grep -E '^KUBE-(SRC|DST)-[A-Z0-9]+$' || true; } | while read -r set; do
  ipset destroy "$set"
done
