#!/usr/bin/env bash
# Smoke test of the built control plane: starts atelier-testcluster, exercises
# the controllers and the auth stack with kubectl and helm, stops it with
# SIGTERM and checks that nothing is left behind.
#
# Usage: tests/cluster/smoke.sh        (run tests/cluster/build.sh first)
set -euo pipefail

bin="${ATELIER_CACHE:-$HOME/.cache/atelier}/bin"
export PATH="$bin:$PATH"
dir="$(mktemp -d /tmp/atelier-smoke.XXXXXX)"
export KUBECONFIG="$dir/kubeconfig"
pid=""

cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; echo "--- last log lines:" >&2; tail -n 30 "$dir/cluster.log" >&2 || true; exit 1; }
ok() { echo "ok   $*"; }

# until SECONDS CMD...: retry CMD every 0.2 s until it succeeds.
until_ok() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

t0=$(date +%s.%N)
atelier-testcluster --dir "$dir" >"$dir/stdout" 2>"$dir/stderr" &
pid=$!
for _ in $(seq 1 600); do
  [ -f "$dir/ready" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$dir/stderr" >&2; fail "atelier-testcluster exited before ready"; }
  sleep 0.1
done
[ -f "$dir/ready" ] || fail "not ready after 60 s"
t1=$(date +%s.%N)
server="$(cat "$dir/ready")"
grep -qx "READY $server" "$dir/stdout" || fail "no READY line on stdout"
ok "ready in $(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s at $server"

[ "$(kubectl get --raw /readyz)" = ok ] || fail "/readyz"
ok "/readyz = ok"
kubectl version -o json | grep -q '"gitVersion": "v1.36.3"' || fail "server version"
ok "server version v1.36.3"
kubectl get ns default kube-system kube-public kube-node-lease >/dev/null || fail "namespaces"
ok "system namespaces exist"

kubectl create deployment web --image=registry.invalid/web:1 --replicas=2 >/dev/null
until_ok 30 sh -c '[ "$(kubectl get rs -l app=web -o name | wc -l)" = 1 ]' || fail "no ReplicaSet"
until_ok 30 sh -c '[ "$(kubectl get pods -l app=web -o name | wc -l)" = 2 ]' || fail "no Pods"
ok "deployment -> replicaset -> 2 pods (Pending, no node)"
until_ok 30 sh -c 'kubectl get events --field-selector reason=FailedScheduling -o name | grep -q .' || fail "scheduler did not report"
ok "scheduler reports FailedScheduling (no nodes)"
kubectl delete deployment web --wait=true >/dev/null
until_ok 30 sh -c '[ -z "$(kubectl get rs,pods -l app=web -o name)" ]' || fail "garbage collector"
ok "garbage collector removed replicaset and pods"

kubectl create serviceaccount x >/dev/null
token="$(kubectl create token x)"
[ -n "$token" ] || fail "TokenRequest"
ok "TokenRequest issued a token for default/x"
who="$(kubectl --token="$token" --kubeconfig=/dev/null --server="$server" --certificate-authority="$dir/pki/ca.crt" auth whoami -o jsonpath='{.status.userInfo.username}')"
[ "$who" = system:serviceaccount:default:x ] || fail "token authentication: got '$who'"
ok "token authenticates as $who"
[ "$(kubectl auth can-i --as=system:serviceaccount:default:x list pods || true)" = no ] || fail "RBAC"
ok "can-i --as=system:serviceaccount:default:x list pods = no (impersonation + RBAC)"

kubectl create namespace smoke-ns >/dev/null
until_ok 30 kubectl -n smoke-ns get serviceaccount default || fail "serviceaccount controller"
until_ok 30 kubectl -n smoke-ns get configmap kube-root-ca.crt || fail "root CA publisher"
ok "serviceaccount + root-ca publisher populate a new namespace"
kubectl -n smoke-ns create quota q --hard=pods=10,requests.cpu=2,count/configmaps=5 >/dev/null
until_ok 30 sh -c '[ -n "$(kubectl -n smoke-ns get quota q -o jsonpath="{.status.used.pods}")" ]' || fail "resourcequota controller"
ok "resourcequota status: $(kubectl -n smoke-ns get quota q -o jsonpath='{.status}')"
kubectl delete namespace smoke-ns --wait=false >/dev/null
until_ok 60 sh -c '! kubectl get namespace smoke-ns' || fail "namespace controller"
ok "namespace deleted and finalized"

kubectl label namespace default pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
if kubectl run priv --image=x --privileged >/dev/null 2>&1; then fail "PodSecurity admitted a privileged pod"; fi
kubectl label namespace default pod-security.kubernetes.io/enforce- >/dev/null
ok "PodSecurity rejects a privileged pod"

kubectl apply -f - >/dev/null <<'EOF'
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: smoke-no-foo}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [configmaps]}]
  validations: [{expression: "object.metadata.name != 'foo'", message: foo is forbidden}]
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: smoke-no-foo}
spec: {policyName: smoke-no-foo, validationActions: [Deny]}
EOF
until_ok 30 sh -c 'kubectl create configmap foo 2>&1 | grep -q "foo is forbidden"' || fail "ValidatingAdmissionPolicy"
ok "ValidatingAdmissionPolicy denies"

chart="$dir/chart"
helm create "$chart" >/dev/null
helm install smoke "$chart" -n smoke-helm --create-namespace >/dev/null || fail "helm install"
[ "$(helm status smoke -n smoke-helm -o json | grep -o '"status":"deployed"')" = '"status":"deployed"' ] || fail "helm status"
ok "helm install of a generated chart: deployed"

ports="$(ss -Htlnp 2>/dev/null | grep "pid=$pid," | awk '{print $4}' | tr '\n' ' ')"
t2=$(date +%s.%N)
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
t3=$(date +%s.%N)
p=$pid; pid=""
[ "$rc" = 0 ] || fail "exit code $rc after SIGTERM"
ok "SIGTERM -> exit 0 in $(printf '%.1f' "$(echo "$t3 - $t2" | bc)") s"
! kill -0 "$p" 2>/dev/null || fail "process still alive"
for port in $ports; do
  ! ss -Htln | awk '{print $4}' | grep -qx "$port" || fail "port $port still listening"
done
ok "no process left, ports closed ($ports)"
[ ! -e "$dir/ready" ] || fail "ready file left behind"
[ -z "$(ls -d "$dir"/etcd-* 2>/dev/null)" ] || fail "etcd data left behind"
ok "ready file and etcd data removed"
echo "stderr of the run: $(wc -l <"$dir/stderr") lines; full log: $(wc -l <"$dir/cluster.log") lines"
echo PASS
