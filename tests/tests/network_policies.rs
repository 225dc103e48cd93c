//! The tenant's network isolation under a real NetworkPolicy engine: kube-router's
//! network-policy controller filters the traffic of pods that the local kubelet runs in network
//! namespaces of their own, routed through the host. Every probe runs inside a pod
//! (`test-http-server`'s `/relay`), and every refused probe has an allowed twin from the same
//! pod, so a probe that cannot connect at all would fail the test.
//!
//! Needs root, iptables, ipset and `tests/cluster/build.sh kube-router`.

mod common;

use std::time::Duration;

use atelier_crds::names::{INFERENCE, OUTPUTS};
use atelier_tests::{ClusterOptions, TestCluster, wait_for};
use common::{Operator, create_ready_tenant, create_tenant};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(180);
/// The operator's `--platform-namespace` in [`Operator::start`].
const PLATFORM_NAMESPACE: &str = "atelier-system";
const PROBE_IMAGE: &str = "ghcr.io/atelier/test-http-server:dev";

/// A cluster of its own: the engine's rules are the machine's, one engine at a time.
async fn platform() -> (&'static TestCluster, &'static Operator) {
    static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();
    static OPERATOR: OnceCell<Operator> = OnceCell::const_new();
    let cluster = CLUSTER
        .get_or_init(|| async {
            TestCluster::start_with(ClusterOptions {
                network_policies: true,
                ..ClusterOptions::default()
            })
            .await
            .unwrap_or_else(|error| panic!("a cluster with kube-router: {error:#}"))
        })
        .await;
    let operator = OPERATOR
        .get_or_init(|| async {
            common::apply_chart_template(cluster, "templates/tenant-clusterroles.yaml")
                .expect("tenant ClusterRoles");
            Operator::start(cluster, &[]).expect("operator")
        })
        .await;
    (cluster, operator)
}

/// A probe pod (restricted Pod Security, as tenant namespaces enforce) and its address.
async fn probe_pod(client: &Client, namespace: &str) -> anyhow::Result<String> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe", "labels": {"app": "probe"}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe",
                "image": PROBE_IMAGE,
                "args": ["--listen", "$(POD_IP):8080"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create(&PostParams::default(), &pod).await?;
    ready_pod_ip(&pods, "app=probe").await
}

async fn ready_pod_ip(pods: &Api<Pod>, selector: &str) -> anyhow::Result<String> {
    wait_for(&format!("a ready pod with {selector}"), TIMEOUT, || async {
        let list = pods.list(&ListParams::default().labels(selector)).await?;
        Ok(list.items.into_iter().find_map(|pod| {
            let status = pod.status?;
            let ready = status
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(status.pod_ip).flatten()
        }))
    })
    .await
}

/// The HTTP status of `GET http://target/` made from inside the pod at `probe` (502: the
/// connection failed).
async fn from_pod(probe: &str, target: &str) -> anyhow::Result<u16> {
    let response = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(format!("http://{probe}:8080/relay/{target}/"))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// Waits until the probe from `probe` to `target` is refused (the engine applies policies a
/// moment after pods and policies appear), then checks it stays so.
async fn refused(probe: &str, target: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("{probe} refused at {target}"),
        Duration::from_secs(60),
        || async { Ok((from_pod(probe, target).await? == 502).then_some(())) },
    )
    .await?;
    assert_eq!(from_pod(probe, target).await?, 502, "{probe} -> {target}");
    Ok(())
}

async fn create_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        created => created.map(drop).map_err(Into::into),
    }
}

#[tokio::test]
async fn only_the_platform_reaches_a_tenants_pods_and_tenant_egress_is_open() {
    let (cluster, _operator) = platform().await;
    let client = cluster.client().await;
    // One inference pod from the start: a tenant without jobs otherwise runs none.
    let tenant_a = create_ready_tenant(cluster, json!({ "inference": { "minReplicas": 1 } }))
        .await
        .unwrap();
    let tenant_b = create_tenant(cluster, json!({})).await.unwrap();
    let a = tenant_a.namespace_name();
    let a_pods: Api<Pod> = Api::namespaced(client.clone(), &a);
    let inference = ready_pod_ip(&a_pods, &format!("app.kubernetes.io/component={INFERENCE}"))
        .await
        .unwrap();
    let outputs = ready_pod_ip(&a_pods, &format!("app.kubernetes.io/component={OUTPUTS}"))
        .await
        .unwrap();
    let tenant_ports = [format!("{inference}:8080"), format!("{outputs}:8080")];

    create_namespace(&client, PLATFORM_NAMESPACE).await.unwrap();
    let other = cluster.create_namespace("random").await.unwrap();
    let platform_probe = probe_pod(&client, PLATFORM_NAMESPACE).await.unwrap();
    let b_probe = probe_pod(&client, &tenant_b.namespace_name())
        .await
        .unwrap();
    let other_probe = probe_pod(&client, &other).await.unwrap();

    // The operator's and the API's namespace reaches the tenant's inference and outputs.
    for target in &tenant_ports {
        assert_eq!(
            from_pod(&platform_probe, target).await.unwrap(),
            200,
            "{target}"
        );
    }
    // Tenant B and a random namespace do not, though their probes reach other pods: tenant
    // pods have no egress policy (the chart's tenant policies are ingress only).
    for probe in [&b_probe, &other_probe] {
        for target in &tenant_ports {
            refused(probe, target).await.unwrap();
        }
    }
    for (probe, target) in [(&b_probe, &other_probe), (&other_probe, &platform_probe)] {
        let target = format!("{target}:8080");
        assert_eq!(
            from_pod(probe, &target).await.unwrap(),
            200,
            "{probe} -> {target}"
        );
    }

    // The fake GPUs and addresses are shared: leave nothing running.
    let tenants = Api::<atelier_crds::Tenant>::all(client.clone());
    for tenant in [&tenant_a, &tenant_b] {
        tenants
            .delete(&tenant.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
    Api::<Namespace>::all(client.clone())
        .delete(&other, &DeleteParams::default())
        .await
        .unwrap();
    Api::<Pod>::namespaced(client, PLATFORM_NAMESPACE)
        .delete("probe", &DeleteParams::default())
        .await
        .unwrap();
}
