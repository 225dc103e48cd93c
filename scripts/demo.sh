#!/usr/bin/env bash
# Runs the whole Atelier platform on this machine, with nothing but the repository's own parts:
#
#   1. the test control plane (atelier-testcluster: etcd, kube-apiserver, controller-manager,
#      scheduler), the local kubelet + volume provisioner (atelier-kubelet), which runs pod
#      containers as local processes, each pod in a network namespace of its own, and
#      kube-router's network-policy controller, which enforces the chart's NetworkPolicies;
#   2. a tiny random-weight Flux model (atelier-inference make-tiny-model) on a PersistentVolume;
#   3. the test OpenID provider (tests/oidc) with a demo user;
#   4. the Helm chart (operator with leader election, API + web page) with examples/values-local.yaml;
#   5. the example tenant and job (examples/tenant.yaml, examples/generationjob.yaml),
#
# then waits for the image and prints where it is, the web page and its login, and what ran.
# Ctrl-C stops everything it started and removes its state directory.
#
# Usage: scripts/demo.sh [--no-wait] [--keep]
#   --no-wait  exit (and stop everything) right after printing the summary; also ATELIER_DEMO_EXIT=1
#   --keep     keep the state directory (cluster data, logs, the image) after stopping
#
# `make demo` builds what this needs first: the Rust binaries (cargo build --workspace --bins) and
# the control plane, kubectl and helm (tests/cluster/build.sh).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${ATELIER_CACHE:-$HOME/.cache/atelier}"
tools="$cache/bin"
target="${CARGO_TARGET_DIR:-$cache/target}/debug"
no_wait="${ATELIER_DEMO_EXIT:-0}"
keep="${ATELIER_DEMO_KEEP:-0}"
for arg in "$@"; do
  case "$arg" in
    --no-wait) no_wait=1 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

release=atelier
namespace=atelier-system
tenant=team-a
tenant_ns=atelier-team-a
job=lighthouse-at-dusk
demo_user=alice@example.com   # login "alice" or the email
demo_password="${ATELIER_DEMO_PASSWORD:-atelier-demo}"
client_id=atelier-demo
client_secret=atelier-demo-secret

if [ -t 2 ]; then say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }; else say() { printf '==> %s\n' "$*" >&2; }; fi
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

# --- What must be there -------------------------------------------------------------------------
for t in atelier-testcluster kubectl helm kube-router; do
  [ -x "$tools/$t" ] || die "$tools/$t is missing: run \`make cluster\` (tests/cluster/build.sh)"
done
for b in atelier-operator atelier-inference atelier-kubelet; do
  [ -x "$target/$b" ] || die "$target/$b is missing: run \`cargo build --workspace --bins\` (make demo does)"
done
command -v node >/dev/null || die "node is missing (the test OpenID provider runs on Node.js)"
if [ ! -d "$root/tests/oidc/node_modules" ]; then
  say "installing the OpenID provider's packages (npm ci in tests/oidc)"
  (cd "$root/tests/oidc" && npm ci --no-audit --no-fund >&2)
fi

# The state directory (cluster data, node, volumes, logs) goes under ATELIER_DEMO_TMP (default
# $TMPDIR).
state="$(mktemp -d "${ATELIER_DEMO_TMP:-${TMPDIR:-/tmp}}/atelier-demo.XXXXXX")"
logs="$state/logs"
mkdir -p "$logs"
export KUBECONFIG="$state/cluster/kubeconfig"
kubectl() { "$tools/kubectl" "$@"; }
helm() { "$tools/helm" "$@"; }

# --- Stopping: every process group we started, then the state directory ---------------------------
pids=()
stopping=0
stop() {
  local status=$?
  [ "$stopping" = 1 ] && return
  stopping=1
  trap - INT TERM EXIT
  say "stopping the demo"
  # Newest first: the kubelet stops its pods' processes before the control plane goes.
  local i pid
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    pid="${pids[$i]}"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # kube-router's iptables chains and ipsets are the machine's.
  "$root/tests/cluster/kube-router-cleanup.sh" || echo "could not remove kube-router's rules" >&2
  if [ "$keep" = 1 ]; then
    echo "kept $state (logs in $logs)" >&2
  else
    rm -rf "$state" 2>/dev/null || echo "could not remove all of $state" >&2
  fi
  exit "$status"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME COMMAND...: runs COMMAND in its own process group (setsid), output to logs/NAME.log.
start() {
  local name="$1"; shift
  setsid "$@" >"$logs/$name.log" 2>&1 < /dev/null &
  pids+=("$!")
}

# wait_until WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_until() {
  local what="$1" seconds="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "timed out after ${seconds}s waiting for $what; logs in $logs" >&2
      [ "$keep" = 1 ] || tail -n 30 "$logs"/*.log >&2 || true
      return 1
    fi
    sleep 1
  done
}

alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done; }

free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }

# --- 1. Control plane, kubelet, provisioner ----------------------------------------------------------
say "starting the control plane ($("$tools/atelier-testcluster" --version 2>/dev/null || echo atelier-testcluster))"
start testcluster "$tools/atelier-testcluster" --dir "$state/cluster"
wait_until "the control plane" 180 test -f "$state/cluster/ready"
say "starting the local kubelet and volume provisioner"
start kubelet "$target/atelier-kubelet" --kubeconfig "$KUBECONFIG" --root "$state/node" --bin-dir "$target" --gpus 4
wait_until "node local-1 Ready" 60 kubectl wait --for=condition=Ready node/local-1 --timeout=1s
say "starting the NetworkPolicy engine (kube-router --run-firewall)"
start kube-router "$tools/kube-router" --kubeconfig="$KUBECONFIG" --hostname-override=local-1 \
  --run-firewall=true --run-router=false --run-service-proxy=false --enable-cni=false \
  --service-cluster-ip-range=10.96.0.0/16 --health-port=0 --metrics-port=0
wait_until "kube-router's rules" 60 sh -c 'iptables -S FORWARD | grep -q KUBE-ROUTER-FORWARD'

# --- 2. The model --------------------------------------------------------------------------------
say "writing the tiny random-weight model"
model_dir="$state/models/flux-tiny"
"$target/atelier-inference" make-tiny-model --out "$model_dir" >"$logs/make-tiny-model.log" 2>&1
sed "s#MODEL_DIR#$model_dir#" "$root/examples/model-pv-local.yaml" | kubectl apply -f - >&2

# --- 3. OpenID provider and the address of the web page ----------------------------------------------
# The API pod gets its local address only once it runs, but its public URL (OIDC redirect)
# is needed at install: a small local proxy on a fixed port forwards to whichever API pod is ready.
web_port="${ATELIER_DEMO_PORT:-$(free_port)}"
public_url="http://127.0.0.1:$web_port"
oidc_port="$(free_port)"
say "starting the OpenID provider"
audience="$public_url/api"
cat >"$state/oidc-config.json" <<JSON
{
  "audience": "$audience",
  "clients": [{
    "client_id": "$client_id",
    "client_secret": "$client_secret",
    "redirect_uris": ["$public_url/auth/callback"],
    "post_logout_redirect_uris": ["$public_url/"],
    "grant_types": ["authorization_code"],
    "response_types": ["code"]
  }],
  "users": [
    {"id": "alice", "email": "$demo_user", "password": "$demo_password", "name": "Alice", "groups": ["team-a", "team-a-admins"]}
  ]
}
JSON
start oidc node "$root/tests/oidc/provider.mjs" --config "$state/oidc-config.json" --port "$oidc_port"
wait_until "the OpenID provider" 30 grep -q '^READY ' "$logs/oidc.log"
issuer="$(sed -n 's/^READY //p' "$logs/oidc.log" | head -n1)"
start proxy node "$root/scripts/demo/proxy.mjs" --listen "127.0.0.1:$web_port" \
  --kubectl "$tools/kubectl" --namespace "$namespace" --service "$release-api"

# --- 4. The chart --------------------------------------------------------------------------------
say "installing the Helm chart (release $release in $namespace)"
if ! helm install "$release" "$root/charts/atelier" --namespace "$namespace" --create-namespace \
    -f "$root/examples/values-local.yaml" \
    --set "api.oidc.issuerUrl=$issuer" --set "api.oidc.audience=$audience" --set "api.publicUrl=$public_url" \
    --wait --timeout 5m >"$logs/helm-install.log" 2>&1; then
  cat "$logs/helm-install.log" >&2
  kubectl -n "$namespace" get pods -o wide >&2 || true
  die "helm install failed; pod logs are in $state/node/kubelet/logs"
fi

# --- 5. Tenant and job ---------------------------------------------------------------------------
say "creating the example tenant $tenant"
kubectl apply -f "$root/examples/tenant.yaml" >&2
wait_until "tenant $tenant Ready" 180 kubectl wait --for=jsonpath='{.status.phase}'=Ready "tenant/$tenant" --timeout=1s
say "submitting the example job as $demo_user (kubectl, through the tenant's RoleBinding and the admission policy)"
kubectl create -f "$root/examples/generationjob.yaml" --as "oidc:$demo_user" --as-group oidc:team-a --as-group system:authenticated >&2
job_phase() { kubectl -n "$tenant_ns" get generationjob "$job" -o jsonpath='{.status.phase}' 2>/dev/null || true; }
job_finished() { case "$(job_phase)" in Succeeded|Failed|Rejected|Cancelled) return 0 ;; *) return 1 ;; esac; }
wait_until "the image" 600 job_finished
if [ "$(job_phase)" != Succeeded ]; then
  kubectl -n "$tenant_ns" get generationjob "$job" -o yaml >&2
  die "the job ended $(job_phase)"
fi

output="$(kubectl -n "$tenant_ns" get generationjob "$job" -o jsonpath='{.status.outputs[0].path}')"
volume="$(kubectl -n "$tenant_ns" get pvc outputs -o jsonpath='{.spec.volumeName}')"
volume_dir="$(kubectl get pv "$volume" -o jsonpath='{.spec.hostPath.path}{.spec.local.path}')"
png="$volume_dir/${output#/outputs/}"
[ -f "$png" ] || die "the job succeeded but $png is missing"

# --- Summary -------------------------------------------------------------------------------------
if [ -t 1 ]; then bold() { printf '\033[1m%s\033[0m\n' "$*"; }; else bold() { printf '%s\n' "$*"; }; fi
{
  echo
  bold "Atelier is running."
  echo
  echo "  Image:      $png"
  echo "  Web page:   $public_url"
  echo "  Login:      $demo_user / $demo_password (OpenID provider $issuer)"
  echo "  kubectl:    export KUBECONFIG=$KUBECONFIG; $tools/kubectl get tenants,gj -A"
  if [ "$keep" = 1 ]; then kept="keeps $state"; else kept="removes $state, the image with it; --keep keeps it"; fi
  if [ "$no_wait" = 1 ]; then
    echo "  Stopping:   now (--no-wait): stops every process the demo started and $kept"
  else
    echo "  Stop:       Ctrl-C: stops every process the demo started and $kept"
  fi
  echo
  bold "What ran"
  echo "  Kubernetes: $(kubectl version -o json 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | tail -n1) (atelier-testcluster), local kubelet atelier-kubelet"
  echo "  Helm:       $(helm version --short 2>/dev/null)"
  echo "  Chart:      $(helm list -n "$namespace" -o json | sed -n 's/.*"chart":"\([^"]*\)".*/\1/p'), release $release in $namespace"
  echo "  Operator:   $("$target/atelier-operator" --version 2>/dev/null)"
  echo "  Inference:  $("$target/atelier-inference" --version 2>/dev/null)"
  echo "  Node.js:    $(node --version) (tests/oidc OpenID provider)"
  echo
  kubectl get tenants,generationjobs -A
  echo
  bold "Objects the operator created for tenant $tenant"
  kubectl -n "$tenant_ns" get deployments,services,persistentvolumeclaims,resourcequotas,limitranges,networkpolicies,rolebindings,serviceaccounts
  echo
  bold "Pods"
  kubectl get pods -A -o wide
  echo
  echo "Logs: $logs, pod logs: $state/node/kubelet/logs"
} 2>&1

if [ "$no_wait" = 1 ]; then
  exit 0
fi
# Wait for Ctrl-C; a component that dies ends the demo.
while alive; do sleep 2; done
die "a component stopped unexpectedly; see $logs"
