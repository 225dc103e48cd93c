//! The test cluster itself: control plane, CRDs, local kubelet, provisioner and faults, all
//! real. Every test but the fault one shares one cluster and works in its own namespaces.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use atelier_tests::{
    ClusterOptions, DEFAULT_TIMEOUT, NodeConfig, TestCluster, unique_name, wait_for,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, ResourceQuota,
    Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const TEST_SERVER_IMAGE: &str = "ghcr.io/atelier/test-http-server:dev";

fn from_json<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// A container of the test server listening on its pod IP, ready when `/readyz` answers.
fn test_server_container() -> Value {
    json!({
        "name": "server",
        "image": TEST_SERVER_IMAGE,
        "args": ["--listen", "$(POD_IP):8080"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|status| status.pod_ip.clone())
        .unwrap_or_default()
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .and_then(|statuses| statuses.first())
        .map_or(0, |status| status.restart_count)
}

/// The process of the pod's first container, from its `atelier://<pid>` container ID.
fn container_pid(pod: &Pod) -> Option<u32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let id = statuses.first()?.container_id.as_deref()?;
    id.strip_prefix("atelier://")?.parse().ok()
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until the pod satisfies `check`; on timeout the error carries the pod's status and
/// container logs.
async fn wait_for_pod(
    cluster: &TestCluster,
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> anyhow::Result<Pod> {
    let waited = wait_for(&format!("pod {name} {what}"), DEFAULT_TIMEOUT, || async {
        Ok(pods.get_opt(name).await?.filter(|pod| check(pod)))
    })
    .await;
    waited.map_err(|error| {
        let namespace = pods.namespace().unwrap_or_default();
        error.context(format!("logs:\n{}", cluster.pod_logs(namespace, name)))
    })
}

/// The single ready pod matching `selector`.
async fn ready_pod(pods: &Api<Pod>, selector: &str) -> anyhow::Result<Pod> {
    wait_for(
        &format!("a ready pod with {selector}"),
        DEFAULT_TIMEOUT,
        || async {
            let list = pods.list(&ListParams::default().labels(selector)).await?;
            Ok(list
                .items
                .into_iter()
                .find(|pod| is_ready(pod) && pod.metadata.deletion_timestamp.is_none()))
        },
    )
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

async fn get_text(url: &str) -> anyhow::Result<(u16, String)> {
    let response = http().get(url).send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

async fn put_text(url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let response = http().put(url).body(body.to_string()).send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

async fn create_test_server_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    spec_extra: Value,
) -> anyhow::Result<Pod> {
    let mut spec = json!({"containers": [test_server_container()]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        spec.extend(extra.clone());
    }
    let pod: Pod =
        from_json(json!({"metadata": {"name": name, "labels": {"app": name}}, "spec": spec}));
    Ok(Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await?)
}

/// A Deployment of the test server and a Service selecting it, in a fresh namespace.
async fn deploy_web(
    cluster: &TestCluster,
    client: &Client,
    prefix: &str,
) -> anyhow::Result<String> {
    let namespace = cluster.create_namespace(prefix).await?;
    let deployment = from_json(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [test_server_container()], "terminationGracePeriodSeconds": 5},
            },
        },
    }));
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &deployment)
        .await?;
    let service = from_json(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]},
    }));
    Api::<Service>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &service)
        .await?;
    Ok(namespace)
}

/// Each pod has a network namespace of its own: another pod reaches it at its address with
/// that pod's address as the source (routed by the host, not translated), the pod's loopback is
/// its own, the API server (on the host's 127.0.0.1) is reachable, and the address stops
/// answering when the pod goes.
#[tokio::test]
async fn pods_have_network_namespaces_of_their_own_routed_through_the_host() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("netns").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    // Pod "inner": one server on the pod's loopback only, one on its address to relay to it.
    let mut loopback = test_server_container();
    loopback["name"] = json!("loopback");
    loopback["args"] = json!(["--listen", "127.0.0.1:8080"]);
    loopback["ports"] = json!([]);
    loopback["readinessProbe"] = Value::Null;
    let mut relay = test_server_container();
    relay["name"] = json!("relay");
    relay["args"] = json!(["--listen", "$(POD_IP):8081"]);
    relay["ports"] = json!([{"name": "http", "containerPort": 8081}]);
    for (name, containers) in [
        ("a", json!([test_server_container()])),
        ("b", json!([test_server_container()])),
        ("inner", json!([loopback, relay])),
    ] {
        create_test_server_pod(&client, &namespace, name, json!({"containers": containers}))
            .await?;
    }
    let a = pod_ip(&wait_for_pod(cluster, &pods, "a", "ready", is_ready).await?);
    let b = pod_ip(&wait_for_pod(cluster, &pods, "b", "ready", is_ready).await?);
    let inner = pod_ip(&wait_for_pod(cluster, &pods, "inner", "ready", is_ready).await?);
    assert_ne!(a, b);

    let (status, body) = get_text(&format!("http://{a}:8080/relay/{b}:8080/peer")).await?;
    assert_eq!(
        (status, body.trim()),
        (200, a.as_str()),
        "a reaches b from its own address"
    );
    let (status, body) = get_text(&format!("http://{a}:8080/peer")).await?;
    assert_eq!(
        (status, body.trim()),
        (200, "198.18.1.1"),
        "the host comes from its pod-range address"
    );
    let (status, body) = get_text(&format!("http://{a}:8080/whoami")).await?;
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            format!("system:serviceaccount:{namespace}:default").as_str()
        ),
        "the pod reaches the API server on the host's loopback"
    );
    // The loopback server of "inner" serves its own pod, and nobody at the pod's address.
    let (status, body) = get_text(&format!("http://{inner}:8081/relay/127.0.0.1:8080/")).await?;
    assert_eq!((status, body.trim()), (200, "hello from inner"));
    let (status, body) = get_text(&format!("http://{a}:8080/relay/{inner}:8080/")).await?;
    assert_eq!(status, 502, "{body}");

    Api::<Pod>::namespaced(client.clone(), &namespace)
        .delete("b", &DeleteParams::default())
        .await?;
    wait_for("pod b to be gone", DEFAULT_TIMEOUT, || async {
        Ok(pods.get_opt("b").await?.is_none().then_some(()))
    })
    .await?;
    let (status, body) = get_text(&format!("http://{a}:8080/relay/{b}:8080/peer")).await?;
    assert_eq!(status, 502, "b's address is gone with it: {body}");
    assert!(get_text(&format!("http://{b}:8080/")).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_deployment_pod_serves_on_its_own_address_restarts_and_goes_away() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = deploy_web(cluster, &client, "web").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);

    let pod = ready_pod(&pods, "app=web").await?;
    let ip = pod_ip(&pod);
    let last_octet: u8 = ip
        .strip_prefix("198.18.1.")
        .context("a pod IP of 198.18.1.0/24")?
        .parse()?;
    assert!(last_octet >= 2, "pod IP {ip}");
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    let (status, body) = get_text(&format!("http://{ip}:8080/")).await?;
    assert_eq!(
        (status, body.trim()),
        (200, format!("hello from {}", pod.name_any()).as_str())
    );

    // A crash: the kubelet restarts the container in the same pod.
    let name = pod.name_any();
    cluster.kill_pod_process(&namespace, &name)?;
    let restarted = wait_for_pod(cluster, &pods, &name, "restarted and ready", |pod| {
        restart_count(pod) == 1 && is_ready(pod)
    })
    .await?;
    let last_state = restarted
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .last_state
        .clone();
    let exit_code = last_state
        .and_then(|state| state.terminated)
        .map(|terminated| terminated.exit_code);
    assert_eq!(exit_code, Some(137), "SIGKILL shows as 128 + 9");
    assert_eq!(pod_ip(&restarted), ip, "a restart keeps the pod's address");
    let server_pid = container_pid(&restarted).context("a running container")?;
    wait_for(
        "the restarted server to answer",
        DEFAULT_TIMEOUT,
        || async {
            Ok(get_text(&format!("http://{ip}:8080/readyz"))
                .await
                .ok()
                .filter(|(status, _)| *status == 200))
        },
    )
    .await?;

    // Deleting the Deployment removes its pods (garbage collection) and their processes.
    Api::<Deployment>::namespaced(client.clone(), &namespace)
        .delete("web", &DeleteParams::foreground())
        .await?;
    wait_for(
        "the Deployment's pods to be gone",
        DEFAULT_TIMEOUT,
        || async {
            Ok(pods
                .list(&ListParams::default().labels("app=web"))
                .await?
                .items
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    assert!(
        !process_exists(server_pid),
        "the server process must be gone"
    );
    Ok(())
}

/// The real endpointslice controller lists the pod's address, which answers.
#[tokio::test]
async fn a_service_endpoint_slice_lists_the_ready_pod_address() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = deploy_web(cluster, &client, "slices").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let ip = pod_ip(&ready_pod(&pods, "app=web").await?);

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
    let listed = wait_for(
        "the EndpointSlice of web to list the pod as ready",
        DEFAULT_TIMEOUT,
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await?;
            let endpoint = list
                .items
                .iter()
                .flat_map(|slice| slice.endpoints.iter().flatten())
                .find(|endpoint| {
                    endpoint
                        .conditions
                        .as_ref()
                        .and_then(|conditions| conditions.ready)
                        == Some(true)
                })
                .and_then(|endpoint| endpoint.addresses.first().cloned());
            Ok(endpoint)
        },
    )
    .await;
    let listed = match listed {
        Ok(listed) => listed,
        Err(error) => {
            let events = service_events(&client, &namespace).await;
            return Err(error.context(format!("warnings about Service web: {events:?}")));
        }
    };
    assert_eq!(listed, ip);
    let (status, _) = get_text(&format!("http://{listed}:8080/readyz")).await?;
    assert_eq!(status, 200);
    Ok(())
}

/// Warnings recorded about the Service `web` (by the endpointslice controller).
async fn service_events(client: &Client, namespace: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields("involvedObject.name=web,type=Warning");
    let list = events
        .list(&params)
        .await
        .map(|list| list.items)
        .unwrap_or_default();
    list.into_iter().filter_map(|event| event.message).collect()
}

#[tokio::test]
async fn unknown_images_and_exiting_containers_are_reported() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("status").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = |name: &str, image: &str, command: Value| -> Pod {
        from_json(json!({
            "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": image, "command": command}]},
        }))
    };
    pods.create(
        &PostParams::default(),
        &pod("missing", "ghcr.io/nobody/no-such-binary:1", Value::Null),
    )
    .await?;
    pods.create(
        &PostParams::default(),
        &pod(
            "fails",
            TEST_SERVER_IMAGE,
            json!(["/bin/sh", "-c", "echo bye; exit 3"]),
        ),
    )
    .await?;
    pods.create(
        &PostParams::default(),
        &pod(
            "succeeds",
            TEST_SERVER_IMAGE,
            json!(["/bin/sh", "-c", "exit 0"]),
        ),
    )
    .await?;

    let missing = wait_for_pod(
        cluster,
        &pods,
        "missing",
        "waiting on ErrImagePull",
        |pod| {
            let statuses = pod
                .status
                .as_ref()
                .and_then(|status| status.container_statuses.clone())
                .unwrap_or_default();
            statuses
                .first()
                .and_then(|status| status.state.clone())
                .and_then(|state| state.waiting)
                .and_then(|w| w.reason)
                == Some("ErrImagePull".into())
        },
    )
    .await?;
    assert!(!is_ready(&missing));
    let status = missing.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let waiting = status.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap();
    assert!(waiting.message.unwrap().contains("no-such-binary"));

    let failed = wait_for_pod(cluster, &pods, "fails", "Failed", |pod| {
        pod.status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            == Some("Failed")
    })
    .await?;
    let terminated = failed.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(terminated.exit_code, 3);
    let log = std::fs::read_to_string(cluster.container_log_path(&namespace, "fails", "main"))?;
    assert_eq!(log.trim(), "bye");

    wait_for_pod(cluster, &pods, "succeeds", "Succeeded", |pod| {
        pod.status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            == Some("Succeeded")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn gpus_are_scheduled_by_capacity_and_limited_by_quota() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let gpu_pod = |name: &str, gpus: u32| -> Pod {
        let mut container = test_server_container();
        container["resources"] = json!({"limits": {"nvidia.com/gpu": gpus.to_string()}});
        from_json(json!({"metadata": {"name": name}, "spec": {"containers": [container]}}))
    };

    let namespace = cluster.create_namespace("gpu-capacity").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    pods.create(&PostParams::default(), &gpu_pod("too-big", 16))
        .await?;
    let pending = wait_for_pod(cluster, &pods, "too-big", "unschedulable", |pod| {
        pod.status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions.iter().any(|c| {
                    c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    })
    .await?;
    let status = pending.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let scheduled = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "PodScheduled")
        .unwrap();
    let message = scheduled.message.unwrap_or_default();
    assert!(message.contains("Insufficient nvidia.com/gpu"), "{message}");

    let namespace = cluster.create_namespace("gpu-quota").await?;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &namespace);
    let quota = from_json(
        json!({"metadata": {"name": "gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}}),
    );
    quotas.create(&PostParams::default(), &quota).await?;
    // Admission enforces a quota once the quota controller has computed its usage.
    wait_for("the quota's usage", DEFAULT_TIMEOUT, || async {
        let quota = quotas.get("gpus").await?;
        Ok(quota
            .status
            .and_then(|status| status.used)
            .filter(|used| !used.is_empty())
            .map(|_| ()))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let refused = pods
        .create(&PostParams::default(), &gpu_pod("over-quota", 2))
        .await;
    match refused {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status.message.contains("exceeded quota: gpus"),
                "{}",
                status.message
            );
            assert!(
                status.message.contains("requests.nvidia.com/gpu"),
                "{}",
                status.message
            );
        }
        other => panic!("a pod over the GPU quota must be refused, got {other:?}"),
    }
    pods.create(&PostParams::default(), &gpu_pod("within-quota", 1))
        .await?;
    Ok(())
}

#[tokio::test]
async fn owners_and_namespaces_take_their_objects_with_them() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("gc").await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let owner = config_maps
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "owner"}})),
        )
        .await?;
    let owned = json!({"metadata": {"name": "owned", "ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap(),
    }]}});
    config_maps
        .create(&PostParams::default(), &from_json(owned))
        .await?;
    config_maps
        .delete("owner", &DeleteParams::default())
        .await?;
    wait_for(
        "the owned ConfigMap to be collected",
        DEFAULT_TIMEOUT,
        || async { Ok(config_maps.get_opt("owned").await?.is_none().then_some(())) },
    )
    .await?;

    // A namespace with a running pod: the namespace controller deletes the pod, the kubelet
    // stops it and removes the object, then the namespace goes.
    let pod = create_test_server_pod(&client, &namespace, "resident", json!({})).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let running = wait_for_pod(cluster, &pods, &pod.name_any(), "ready", is_ready).await?;
    let server_pid = container_pid(&running).context("a running container")?;
    Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::default())
        .await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_for(
        &format!("namespace {namespace} to be gone"),
        Duration::from_secs(90),
        || async {
            Ok(namespaces
                .get_opt(&namespace)
                .await?
                .is_none()
                .then_some(()))
        },
    )
    .await?;
    assert!(
        !process_exists(server_pid),
        "the pod's process must be gone"
    );
    Ok(())
}

#[tokio::test]
async fn rbac_limits_service_accounts_to_their_roles() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let admin = cluster.client().await;
    let namespace = cluster.create_namespace("rbac").await?;
    Api::<ServiceAccount>::namespaced(admin.clone(), &namespace)
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "reader"}})),
        )
        .await?;
    let mut config = cluster.kube_config();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{namespace}:reader"));
    let as_reader: Api<Pod> = Api::namespaced(Client::try_from(config)?, &namespace);

    match as_reader.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("a ServiceAccount without a Role must be forbidden, got {other:?}"),
    }

    let role = from_json(json!({
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
    }));
    Api::<Role>::namespaced(admin.clone(), &namespace)
        .create(&PostParams::default(), &role)
        .await?;
    let binding = from_json(json!({
        "metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }));
    Api::<RoleBinding>::namespaced(admin.clone(), &namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    wait_for("the Role to take effect", DEFAULT_TIMEOUT, || async {
        Ok(as_reader
            .list(&ListParams::default())
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    let other_namespace: Api<Pod> = Api::namespaced(as_reader.clone().into_client(), "default");
    assert!(
        other_namespace.list(&ListParams::default()).await.is_err(),
        "the Role is namespaced"
    );
    Ok(())
}

#[tokio::test]
async fn local_volumes_bind_and_mount_with_their_access_mode() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("volumes").await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let claim = from_json(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }));
    claims.create(&PostParams::default(), &claim).await?;
    let bound = wait_for("the claim to be Bound", DEFAULT_TIMEOUT, || async {
        let claim = claims.get("data").await?;
        let bound = claim
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            == Some("Bound");
        Ok(bound.then_some(claim))
    })
    .await?;
    let spec = bound.spec.unwrap();
    assert_eq!(
        spec.storage_class_name.as_deref(),
        Some("local"),
        "the default class"
    );
    let volume_name = spec.volume_name.unwrap();
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let volume = volumes.get(&volume_name).await?;
    let volume_dir = std::path::PathBuf::from(volume.spec.unwrap().host_path.unwrap().path);

    Api::<ConfigMap>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "settings"}, "data": {"mode": "fast"}})),
        )
        .await?;
    let mut container = test_server_container();
    container["volumeMounts"] = json!([
        {"name": "data", "mountPath": "/atelier-test/data"},
        {"name": "data", "mountPath": "/atelier-test/data-ro", "readOnly": true},
        {"name": "settings", "mountPath": "/atelier-test/settings"},
        {"name": "scratch", "mountPath": "/atelier-test/scratch"},
    ]);
    let pod = from_json(json!({
        "metadata": {"name": "writer"},
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "scratch", "emptyDir": {}},
            ],
        },
    }));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    pods.create(&PostParams::default(), &pod).await?;
    let ip = pod_ip(&wait_for_pod(cluster, &pods, "writer", "ready", is_ready).await?);
    let files = format!("http://{ip}:8080/files/atelier-test");

    assert_eq!(
        put_text(&format!("{files}/data/hello.txt"), "from the pod")
            .await?
            .0,
        200
    );
    assert_eq!(
        std::fs::read_to_string(volume_dir.join("hello.txt"))?,
        "from the pod"
    );
    assert_eq!(
        get_text(&format!("{files}/data-ro/hello.txt")).await?,
        (200, "from the pod".into())
    );
    let (status, error) = put_text(&format!("{files}/data-ro/refused.txt"), "x").await?;
    assert_eq!(status, 500);
    assert!(error.contains("Read-only file system"), "{error}");
    assert_eq!(
        get_text(&format!("{files}/settings/mode")).await?,
        (200, "fast".into())
    );
    assert_eq!(put_text(&format!("{files}/scratch/tmp"), "x").await?.0, 200);
    assert!(
        !std::path::Path::new("/atelier-test/data/hello.txt").exists(),
        "mounts stay inside the pod's mount namespace"
    );

    // Reclaim policy Delete: releasing the claim removes the volume and its directory.
    pods.delete("writer", &DeleteParams::default()).await?;
    claims.delete("data", &DeleteParams::default()).await?;
    wait_for(
        "the released volume to be deleted",
        DEFAULT_TIMEOUT,
        || async { Ok(volumes.get_opt(&volume_name).await?.is_none().then_some(())) },
    )
    .await?;
    assert!(!volume_dir.exists());
    Ok(())
}

#[tokio::test]
async fn a_retain_class_keeps_released_volumes() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("retain").await?;
    let class_name = unique_name("retain");
    let class = from_json(json!({
        "metadata": {"name": class_name},
        "provisioner": "atelier.dev/local",
        "reclaimPolicy": "Retain",
    }));
    let classes: Api<StorageClass> = Api::all(client.clone());
    classes.create(&PostParams::default(), &class).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let claim = from_json(json!({
        "metadata": {"name": "kept"},
        "spec": {
            "storageClassName": class_name,
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }));
    claims.create(&PostParams::default(), &claim).await?;
    let volume_name = wait_for("the claim to be Bound", DEFAULT_TIMEOUT, || async {
        let claim = claims.get("kept").await?;
        let bound = claim.status.and_then(|status| status.phase).as_deref() == Some("Bound");
        Ok(claim
            .spec
            .and_then(|spec| spec.volume_name)
            .filter(|_| bound))
    })
    .await?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let volume = volumes.get(&volume_name).await?;
    let spec = volume.spec.unwrap_or_default();
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Retain")
    );
    let volume_dir = std::path::PathBuf::from(spec.host_path.context("a hostPath volume")?.path);
    std::fs::write(volume_dir.join("keep.txt"), "history")?;

    claims.delete("kept", &DeleteParams::default()).await?;
    wait_for("the volume to be Released", DEFAULT_TIMEOUT, || async {
        let volume = volumes.get(&volume_name).await?;
        let phase = volume.status.and_then(|status| status.phase);
        Ok((phase.as_deref() == Some("Released")).then_some(()))
    })
    .await?;
    assert_eq!(
        std::fs::read_to_string(volume_dir.join("keep.txt"))?,
        "history"
    );
    volumes
        .delete(&volume_name, &DeleteParams::default())
        .await?;
    classes
        .delete(&class_name, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_failing_liveness_probe_restarts_the_container() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("liveness").await?;
    let mut container = test_server_container();
    container["livenessProbe"] = json!({
        "httpGet": {"path": "/no-such-page", "port": "http"},
        "initialDelaySeconds": 1,
        "periodSeconds": 1,
        "failureThreshold": 2,
    });
    let pod =
        from_json(json!({"metadata": {"name": "unhealthy"}, "spec": {"containers": [container]}}));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    pods.create(&PostParams::default(), &pod).await?;
    let restarted = wait_for_pod(cluster, &pods, "unhealthy", "restarted", |pod| {
        restart_count(pod) >= 1
    })
    .await?;
    let statuses = restarted
        .status
        .and_then(|status| status.container_statuses)
        .unwrap_or_default();
    let last_exit = statuses[0]
        .last_state
        .clone()
        .and_then(|state| state.terminated)
        .map(|terminated| terminated.exit_code);
    assert_eq!(
        last_exit,
        Some(137),
        "killed for failing its liveness probe"
    );
    Ok(())
}

#[tokio::test]
async fn pods_get_their_service_account_identity_and_environment() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("identity").await?;
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "app"}})),
        )
        .await?;
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}})),
        )
        .await?;
    Api::<ConfigMap>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "conf"}, "data": {"level": "debug"}})),
        )
        .await?;
    let mut container = test_server_container();
    container["env"].as_array_mut().unwrap().extend([
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}),
        json!({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}),
        json!({"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "level"}}}),
        json!({"name": "GREETING", "value": "$(POD_NAME) at $(POD_IP), $$(ESCAPED)"}),
    ]);
    let pod = from_json(json!({
        "metadata": {"name": "app"},
        "spec": {"serviceAccountName": "app", "containers": [container]},
    }));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    pods.create(&PostParams::default(), &pod).await?;
    let ip = pod_ip(&wait_for_pod(cluster, &pods, "app", "ready", is_ready).await?);

    let (status, user) = get_text(&format!("http://{ip}:8080/whoami")).await?;
    assert_eq!(
        (status, user.as_str()),
        (
            200,
            format!("system:serviceaccount:{namespace}:app").as_str()
        )
    );

    let env: BTreeMap<String, String> = http()
        .get(format!("http://{ip}:8080/env"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(env["POD_NAME"], "app");
    assert_eq!(env["SA"], "app");
    assert_eq!(env["TOKEN"], "s3cret");
    assert_eq!(env["LEVEL"], "debug");
    assert_eq!(env["GREETING"], format!("app at {ip}, $(ESCAPED)"));
    assert!(env.contains_key("KUBECONFIG"));

    // The projected token the ServiceAccount admission plugin mounts is the pod's identity too.
    let token_url =
        format!("http://{ip}:8080/files/var/run/secrets/kubernetes.io/serviceaccount/token");
    let (status, token) = get_text(&token_url).await?;
    assert_eq!(status, 200, "{token}");
    let review: TokenReview = from_json(json!({"spec": {"token": token}}));
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let reviewed = reviewed.status.unwrap();
    assert_eq!(reviewed.authenticated, Some(true), "{reviewed:?}");
    assert_eq!(
        reviewed.user.and_then(|user| user.username),
        Some(format!("system:serviceaccount:{namespace}:app"))
    );

    // Opting out of token automounting leaves the process without credentials.
    create_test_server_pod(
        &client,
        &namespace,
        "anonymous",
        json!({"automountServiceAccountToken": false}),
    )
    .await?;
    let ip = pod_ip(&wait_for_pod(cluster, &pods, "anonymous", "ready", is_ready).await?);
    let env: BTreeMap<String, String> = http()
        .get(format!("http://{ip}:8080/env"))
        .send()
        .await?
        .json()
        .await?;
    assert!(!env.contains_key("KUBECONFIG"));
    Ok(())
}

/// The CRDs of the chart install, fill in defaults and refuse invalid objects with their
/// schema or CEL message.
#[tokio::test]
async fn atelier_crds_default_and_validate_objects() -> anyhow::Result<()> {
    let cluster = TestCluster::shared().await;
    let mut installed = cluster.crds().to_vec();
    installed.sort();
    assert_eq!(
        installed,
        ["generationjobs.atelier.dev", "tenants.atelier.dev"],
        "the chart's CRDs are installed"
    );
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("crds").await?;
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "atelier.dev",
        "v1alpha1",
        "GenerationJob",
    ));
    let jobs: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let job = |name: &str, spec: Value| -> DynamicObject {
        from_json(json!({
            "apiVersion": "atelier.dev/v1alpha1",
            "kind": "GenerationJob",
            "metadata": {"name": name},
            "spec": spec,
        }))
    };

    let created = jobs
        .create(
            &PostParams::default(),
            &job("valid", json!({"prompt": "a red fox", "user": "alice"})),
        )
        .await?;
    let spec = &created.data["spec"];
    for defaulted in ["width", "height", "steps", "numImages"] {
        assert!(
            spec[defaulted].is_u64(),
            "{defaulted} has a default: {spec}"
        );
    }

    let refused = [
        (json!({"prompt": "x", "user": "alice", "steps": 0}), "steps"),
        (
            json!({"prompt": "x", "user": "alice", "steps": 101}),
            "steps",
        ),
        (
            json!({"prompt": "x", "user": "alice", "width": 1000}),
            "multiple of 16",
        ),
        (json!({"prompt": "", "user": "alice"}), "prompt"),
    ];
    for (spec, expected) in refused {
        let result = jobs
            .create(
                &PostParams::default(),
                &job(&unique_name("bad"), spec.clone()),
            )
            .await;
        match result {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{spec}: {status:?}");
                assert!(
                    status.message.contains(expected),
                    "{spec}: {}",
                    status.message
                );
            }
            other => panic!("{spec} must be refused, got {other:?}"),
        }
    }

    let mut changed = created.clone();
    changed.data["spec"]["user"] = json!("mallory");
    match jobs
        .replace("valid", &PostParams::default(), &changed)
        .await
    {
        Err(kube::Error::Api(status)) => assert!(
            status.message.contains("spec.user is immutable"),
            "{}",
            status.message
        ),
        other => panic!("changing spec.user must be refused, got {other:?}"),
    }

    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("atelier.dev", "v1alpha1", "Tenant"));
    let tenants: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let tenant = |name: &str, spec: Value| -> DynamicObject {
        from_json(
            json!({"apiVersion": "atelier.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": name}, "spec": spec}),
        )
    };
    let name = unique_name("team");
    let created = tenants
        .create(&PostParams::default(), &tenant(&name, json!({})))
        .await?;
    let spec = &created.data["spec"];
    assert_eq!(spec["gpus"]["resourceName"], "nvidia.com/gpu", "{spec}");
    assert_eq!(spec["gpus"]["max"], 1, "{spec}");
    assert_eq!(spec["storage"]["size"], "50Gi", "{spec}");
    tenants.delete(&name, &DeleteParams::default()).await?;
    let refused = [
        (
            json!({"gpus": {"perReplica": 4, "max": 2}}),
            "gpus.perReplica must not exceed gpus.max",
        ),
        (
            json!({"members": [{"group": "g", "user": "u", "role": "user"}]}),
            "exactly one of group or user",
        ),
    ];
    for (spec, expected) in refused {
        match tenants
            .create(
                &PostParams::default(),
                &tenant(&unique_name("bad"), spec.clone()),
            )
            .await
        {
            Err(kube::Error::Api(status)) => assert!(
                status.message.contains(expected),
                "{spec}: {}",
                status.message
            ),
            other => panic!("{spec} must be refused, got {other:?}"),
        }
    }
    Ok(())
}

/// Faults disturb the whole cluster, so this test has a cluster of its own, with two nodes;
/// it also checks that dropping a cluster stops its processes.
#[tokio::test]
async fn faults_node_not_ready_and_api_server_pause() -> anyhow::Result<()> {
    let options = ClusterOptions {
        nodes: vec![NodeConfig::new("fault-1"), NodeConfig::new("fault-2")],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start_with(options).await?;
    let client = cluster.client().await;
    let namespace = cluster.create_namespace("faults").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);

    // With fault-1 NotReady, new pods land on fault-2.
    cluster.set_node_ready("fault-1", false).await?;
    for index in 0..3 {
        create_test_server_pod(&client, &namespace, &format!("spread-{index}"), json!({})).await?;
    }
    for index in 0..3 {
        let pod = wait_for_pod(
            &cluster,
            &pods,
            &format!("spread-{index}"),
            "ready",
            is_ready,
        )
        .await?;
        assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("fault-2"));
    }
    cluster.set_node_ready("fault-1", true).await?;

    // While the API server is unreachable, clients fail; afterwards everything catches up.
    cluster.pause_api_server();
    let during = tokio::time::timeout(
        Duration::from_secs(10),
        cluster.client().await.apiserver_version(),
    )
    .await;
    assert!(
        !matches!(during, Ok(Ok(_))),
        "the API server must be unreachable: {during:?}"
    );
    cluster.resume_api_server();
    create_test_server_pod(&client, &namespace, "after-pause", json!({})).await?;
    wait_for_pod(&cluster, &pods, "after-pause", "ready", is_ready).await?;

    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    let dir = cluster.dir().to_path_buf();
    drop(cluster);
    assert!(!dir.exists(), "the cluster's directory is removed");
    assert!(!kubeconfig.exists());
    let dir = dir.to_string_lossy().into_owned();
    wait_for(
        "the control plane process to be gone",
        Duration::from_secs(5),
        || async { Ok((!any_process_mentions(&dir)).then_some(())) },
    )
    .await
}

/// Whether a process's command line contains `text`.
fn any_process_mentions(text: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(text))
    })
}
