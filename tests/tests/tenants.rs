//! The Tenant controller against the real control plane, local kubelet and inference binary.

mod common;

use std::time::Duration;

use atelier_crds::Tenant;
use atelier_tests::{TestCluster, unique_name, wait_for};
use common::{
    Operator, create_ready_tenant, create_tenant, metric, tenant_objects, wait_tenant_ready,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, Pod, ResourceQuota, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(180);

/// One operator for the tests of this binary that do not restart it.
async fn operator() -> &'static TestCluster {
    started_operator().await.0
}

async fn started_operator() -> (&'static TestCluster, &'static Operator) {
    static OPERATOR: OnceCell<Operator> = OnceCell::const_new();
    let cluster = TestCluster::shared().await;
    let operator = OPERATOR
        .get_or_init(|| async {
            common::apply_chart_template(cluster, "templates/tenant-clusterroles.yaml")
                .expect("tenant ClusterRoles");
            Operator::start(cluster, &[]).expect("operator")
        })
        .await;
    (cluster, operator)
}

#[tokio::test]
async fn a_tenant_gets_every_object_owned_and_a_ready_inference_pod() {
    let (cluster, operator) = started_operator().await;
    let client = cluster.client().await;
    let tenant = create_tenant(cluster, json!({ "inference": { "minReplicas": 1 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    let tenant = wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    let uid = tenant.uid().unwrap();

    let namespace = Api::<Namespace>::all(client.clone())
        .get(&ns)
        .await
        .unwrap();
    assert_eq!(
        namespace.labels()["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let owned_by_tenant =
        |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
            refs.iter()
                .any(|r| r.uid == uid && r.controller == Some(true))
        };
    assert!(owned_by_tenant(namespace.owner_references()));
    for name in ["inference", "outputs"] {
        let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
            .get(name)
            .await
            .unwrap();
        assert!(
            owned_by_tenant(deployment.owner_references()),
            "deployment {name} not owned"
        );
        let service = Api::<Service>::namespaced(client.clone(), &ns)
            .get(name)
            .await
            .unwrap();
        assert!(
            owned_by_tenant(service.owner_references()),
            "service {name} not owned"
        );
    }
    let quota = Api::<ResourceQuota>::namespaced(client.clone(), &ns)
        .get("atelier-quota")
        .await
        .unwrap();
    assert_eq!(
        quota.spec.unwrap().hard.unwrap()["requests.nvidia.com/gpu"].0,
        "2"
    );
    assert_eq!(
        Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    assert_eq!(
        Api::<RoleBinding>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    // The inference pod is the real binary with the tiny model, Ready on its own loopback IP.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let ready_inference = wait_for("a Ready inference pod", TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=inference"))
            .await?;
        Ok(list.items.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        }))
    })
    .await
    .unwrap();
    let ip = ready_inference.status.unwrap().pod_ip.unwrap();
    assert!(ip.starts_with("198.18.1."), "pod IP {ip}");
    let token = common::pod_token(cluster, &ns).await.unwrap();
    let model: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{ip}:8080/v1/model"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        model["state"], "host",
        "the model is loaded and waits in host memory: {model}"
    );
    // The status follows the Deployment's, a moment after the pod's readiness.
    let tenants = Api::<Tenant>::all(client);
    wait_for("status.readyReplicas 1", TIMEOUT, || async {
        let status = tenants.get(&tenant.name_any()).await?.status;
        Ok((status.is_some_and(|s| s.ready_replicas == 1)).then_some(()))
    })
    .await
    .unwrap();

    // Metrics: reconciles counted, the tenant's conditions published.
    let metrics = operator.metrics().await.unwrap();
    let tenant_label = format!("tenant=\"{}\"", tenant.name_any());
    assert_eq!(
        metric(
            &metrics,
            "atelier_tenant_condition",
            &[&tenant_label, "condition=\"Ready\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "atelier_tenant_condition",
            &[&tenant_label, "condition=\"Degraded\""]
        ),
        Some(0.0)
    );
    let reconciles = metric(
        &metrics,
        "atelier_reconcile_total",
        &["controller=\"tenant\"", "result=\"success\""],
    );
    assert!(reconciles >= Some(1.0), "{metrics}");
    let histogram = metric(
        &metrics,
        "atelier_reconcile_duration_seconds_count",
        &["controller=\"tenant\""],
    );
    assert!(histogram >= Some(1.0), "{metrics}");
}

#[tokio::test]
async fn the_quota_refuses_pods_beyond_the_gpu_budget() {
    let cluster = operator().await;
    let tenant = create_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    let client = cluster.client().await;
    wait_for("the tenant quota", TIMEOUT, || async {
        Ok(Api::<ResourceQuota>::namespaced(client.clone(), &ns)
            .get_opt("atelier-quota")
            .await?
            .and_then(|q| q.status?.hard))
    })
    .await
    .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "greedy" },
        "spec": {
            "securityContext": { "runAsNonRoot": true, "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{
                "name": "c", "image": "example/atelier-inference:x",
                "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } },
                "resources": { "limits": { "nvidia.com/gpu": "3", "cpu": "100m", "memory": "64Mi" } },
            }],
        },
    }))
    .unwrap();
    let error = Api::<Pod>::namespaced(client, &ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("exceeded quota") && message.contains("nvidia.com/gpu"),
        "{message}"
    );
}

#[tokio::test]
async fn a_tenant_admin_cannot_read_another_tenants_jobs() {
    let cluster = operator().await;
    let a = create_tenant(
        cluster,
        json!({ "members": [{ "group": "a-admins", "role": "admin" }] }),
    )
    .await
    .unwrap();
    let b = create_tenant(
        cluster,
        json!({ "members": [{ "group": "b-admins", "role": "admin" }] }),
    )
    .await
    .unwrap();
    let admin_client = cluster.client().await;
    for tenant in [&a, &b] {
        let bindings =
            Api::<RoleBinding>::namespaced(admin_client.clone(), &tenant.namespace_name());
        wait_for("the admins RoleBinding", TIMEOUT, || async {
            Ok(bindings.get_opt("atelier-admins").await?)
        })
        .await
        .unwrap();
    }
    let mut config = cluster.kube_config();
    config.auth_info.impersonate = Some("oidc:alice@example.com".into());
    config.auth_info.impersonate_groups = Some(vec!["oidc:a-admins".into()]);
    let alice = kube::Client::try_from(config).unwrap();
    let own = Api::<atelier_crds::GenerationJob>::namespaced(alice.clone(), &a.namespace_name());
    own.list(&ListParams::default())
        .await
        .expect("an admin reads the jobs of their own tenant");
    let other = Api::<atelier_crds::GenerationJob>::namespaced(alice, &b.namespace_name());
    match other.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403),
        other => panic!("expected 403, got {other:?}"),
    }
}

#[tokio::test]
async fn drift_is_repaired_and_the_steady_state_writes_nothing() {
    let cluster = operator().await;
    let tenant = create_tenant(cluster, json!({})).await.unwrap();
    let name = tenant.name_any();
    let ns = tenant.namespace_name();
    let client = cluster.client().await;
    wait_tenant_ready(cluster, &name, TIMEOUT).await.unwrap();

    // Someone raises the GPU quota and deletes a Service: both come back.
    let quotas = Api::<ResourceQuota>::namespaced(client.clone(), &ns);
    let raise = json!({ "spec": { "hard": { "requests.nvidia.com/gpu": "100" } } });
    quotas
        .patch(
            "atelier-quota",
            &PatchParams::default(),
            &Patch::Merge(&raise),
        )
        .await
        .unwrap();
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    services
        .delete("outputs", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the quota restored", TIMEOUT, || async {
        let quota = quotas.get("atelier-quota").await?;
        Ok((quota
            .spec
            .and_then(|s| s.hard)
            .is_some_and(|h| h["requests.nvidia.com/gpu"].0 == "2"))
        .then_some(()))
    })
    .await
    .unwrap();
    wait_for("the outputs Service restored", TIMEOUT, || async {
        Ok(services.get_opt("outputs").await?)
    })
    .await
    .unwrap();
    // Provisioning is one Event naming every object; each later repair is an Event of its own:
    // the edited quota as repaired, the deleted Service as created.
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    wait_for("events of the repairs", TIMEOUT, || async {
        // The recorder folds a repeated event into one object with a series count.
        let notes: Vec<(String, String, i32)> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(&name))
            .map(|e| {
                let times = e.series.as_ref().map_or(1, |s| s.count.max(1));
                (
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                    times,
                )
            })
            .collect();
        let count = |reason: &str, note: String| -> i32 {
            notes
                .iter()
                .filter(|(r, n, _)| r == reason && *n == note)
                .map(|(_, _, times)| times)
                .sum()
        };
        let quota_repaired = count(
            "Repaired",
            format!("restored the desired state of ResourceQuota {ns}/atelier-quota"),
        );
        let service_created = count("Created", format!("created Service {ns}/outputs"));
        let provisioned = notes.iter().any(|(reason, note, _)| {
            reason == "Provisioned"
                && note.contains("Service outputs")
                && note.contains("ResourceQuota atelier-quota")
        });
        Ok((quota_repaired >= 1 && service_created == 1 && provisioned).then_some(()))
    })
    .await
    .unwrap();
    wait_tenant_ready(cluster, &name, TIMEOUT).await.unwrap();

    // Steady state: reconciles of a spec change that no owned object shows (the daily image
    // quota lives in the tenant's status) write to no owned object.
    let snapshot = tenant_objects(&client, &ns).await.unwrap();
    let tenants = Api::<Tenant>::all(client.clone());
    for round in 0..3 {
        let touch = json!({ "spec": { "quota": { "imagesPerUserPerDay": 60 + round } } });
        let generation = tenants
            .patch(&name, &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap()
            .metadata
            .generation;
        wait_for("the spec change reconciled", TIMEOUT, || async {
            let status = tenants.get(&name).await?.status.unwrap_or_default();
            Ok((status.observed_generation == generation).then_some(()))
        })
        .await
        .unwrap();
    }
    assert_eq!(
        tenant_objects(&client, &ns).await.unwrap(),
        snapshot,
        "a reconcile wrote to an object that was already as desired"
    );
}

#[tokio::test]
async fn what_is_removed_from_a_tenant_is_removed_from_the_cluster() {
    let cluster = operator().await;
    let client = cluster.client().await;
    let tenant = create_tenant(
        cluster,
        json!({ "inference": {
            "nodeSelector": { "atelier.dev/test-pool": "a" },
            "tolerations": [{ "key": "atelier.dev/test-pool", "operator": "Exists", "effect": "NoSchedule" }],
        }}),
    )
    .await
    .unwrap();
    let name = tenant.name_any();
    let ns = tenant.namespace_name();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let bindings = Api::<RoleBinding>::namespaced(client.clone(), &ns);
    let claims =
        Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let pod_spec = || async {
        let deployment = deployments.get_opt("inference").await?;
        anyhow::Ok(deployment.and_then(|d| d.spec?.template.spec))
    };
    let admins = || async {
        let binding = bindings.get_opt("atelier-admins").await?;
        anyhow::Ok(binding.map(|b| b.subjects.unwrap_or_default()))
    };
    wait_for(
        "the nodeSelector, toleration and admins applied",
        TIMEOUT,
        || async {
            let applied = pod_spec().await?.is_some_and(|pod| {
                pod.node_selector.is_some_and(|s| !s.is_empty())
                    && pod.tolerations.is_some_and(|t| !t.is_empty())
            }) && admins().await?.is_some_and(|s| !s.is_empty())
                && claims.get_opt("model").await?.is_some();
            Ok(applied.then_some(()))
        },
    )
    .await
    .unwrap();

    // The admins leave, the pool constraints go, and the model comes from a claim of the
    // tenant's own: the operator-made model claim is no longer wanted.
    let removal = json!({ "spec": {
        "members": [{ "group": "team-users", "role": "user" }],
        "inference": {
            "nodeSelector": null,
            "tolerations": null,
            "model": { "volumeName": null, "claimName": "models-of-our-own" },
        },
    }});
    Api::<Tenant>::all(client.clone())
        .patch(&name, &PatchParams::default(), &Patch::Merge(&removal))
        .await
        .unwrap();
    wait_for("the removals reach the cluster", TIMEOUT, || async {
        let pod = pod_spec().await?.unwrap_or_default();
        let cleared = pod.node_selector.unwrap_or_default().is_empty()
            && pod.tolerations.unwrap_or_default().is_empty()
            && admins().await?.unwrap_or_default().is_empty()
            && claims
                .get_opt("model")
                .await?
                .is_none_or(|c| c.metadata.deletion_timestamp.is_some());
        Ok(cleared.then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_spec_change_rolls_out_new_inference_pods() {
    let cluster = operator().await;
    let client = cluster.client().await;
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let name = tenant.name_any();
    let ns = tenant.namespace_name();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let inference = ListParams::default().labels("app.kubernetes.io/component=inference");
    let ready_inference_pods = || async {
        let list = pods.list(&inference).await?;
        anyhow::Ok(
            list.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .collect::<Vec<Pod>>(),
        )
    };
    let before: Vec<String> = wait_for("a Ready inference pod", TIMEOUT, || async {
        let ready = ready_inference_pods().await?;
        Ok((!ready.is_empty()).then(|| ready.iter().map(|p| p.name_any()).collect()))
    })
    .await
    .unwrap();

    Api::<Tenant>::all(client.clone())
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "inference": { "model": { "precision": "fp8" } } } })),
        )
        .await
        .unwrap();
    let replaced = wait_for("a new inference pod with fp8", TIMEOUT, || async {
        let ready = ready_inference_pods().await?;
        Ok(ready.into_iter().find(|p| !before.contains(&p.name_any())))
    })
    .await
    .unwrap();
    let args = replaced.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(args.iter().any(|a| a == "--precision=fp8"), "{args:?}");
    wait_tenant_ready(cluster, &name, TIMEOUT).await.unwrap();
}

#[tokio::test]
async fn pods_that_cannot_run_degrade_the_tenant_with_their_own_reason() {
    let cluster = operator().await;
    let tenants = Api::<Tenant>::all(cluster.client().await);
    for (overrides, reason, words) in [
        (
            json!({ "inference": { "minReplicas": 1 }, "gpus": { "resourceName": "example.com/no-such-gpu" } }),
            "Unschedulable",
            "Insufficient example.com/no-such-gpu",
        ),
        (
            json!({ "inference": { "minReplicas": 1, "image": "ghcr.io/atelier-dev/no-such-binary:1" } }),
            "ImagePullFailed",
            "no-such-binary",
        ),
    ] {
        let tenant = create_tenant(cluster, overrides).await.unwrap();
        let degraded = wait_for(&format!("{reason} on the tenant"), TIMEOUT, || async {
            let status = tenants.get(&tenant.name_any()).await?.status;
            Ok(status.and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == reason)
            }))
        })
        .await
        .unwrap();
        assert!(degraded.message.contains(words), "{}", degraded.message);
    }
}

#[tokio::test]
async fn a_namespace_that_is_not_ours_degrades_the_tenant_and_outlives_its_deletion() {
    let cluster = operator().await;
    let client = cluster.client().await;
    let name = unique_name("tn");
    let taken: Namespace = serde_json::from_value(
        json!({ "metadata": { "name": atelier_crds::tenant::namespace_for(&name) } }),
    )
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &taken)
        .await
        .unwrap();
    let volume = common::model_volume(cluster).await.unwrap();
    let tenant = common::tenant_manifest(&name, &volume, json!({}));
    let tenants = Api::<Tenant>::all(client.clone());
    tenants
        .create(&PostParams::default(), &tenant)
        .await
        .unwrap();
    let degraded = wait_for("tenant Degraded", TIMEOUT, || async {
        let tenant = tenants.get(&name).await?;
        let condition = tenant.status.and_then(|s| {
            s.conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")
        });
        Ok(condition)
    })
    .await
    .unwrap();
    assert_eq!(degraded.reason, "NamespaceConflict");
    let ns = atelier_crds::tenant::namespace_for(&name);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    assert!(
        deployments
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "nothing is applied into a foreign namespace"
    );

    // Deleting the tenant touches neither the foreign namespace nor the jobs in it.
    let foreign_job = common::create_job(cluster, &ns, "someone-else", json!({}))
        .await
        .unwrap();
    tenants
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the tenant gone", TIMEOUT, || async {
        Ok(tenants.get_opt(&name).await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    let namespace = Api::<Namespace>::all(client.clone())
        .get(&ns)
        .await
        .expect("the foreign namespace is still there");
    assert!(
        namespace.metadata.deletion_timestamp.is_none(),
        "the operator deleted a namespace it does not own"
    );
    let job = Api::<atelier_crds::GenerationJob>::namespaced(client, &ns)
        .get(&foreign_job.name_any())
        .await
        .unwrap();
    assert!(
        !job.spec.cancel,
        "the operator cancelled a job in a namespace it does not own"
    );
}

#[tokio::test]
async fn deletion_keeps_or_removes_the_images_as_the_spec_says() {
    let cluster = operator().await;
    let client = cluster.client().await;
    for retain in [true, false] {
        let tenant = create_tenant(cluster, json!({ "storage": { "retainOnDelete": retain } }))
            .await
            .unwrap();
        let name = tenant.name_any();
        wait_tenant_ready(cluster, &name, TIMEOUT).await.unwrap();
        let ns = tenant.namespace_name();
        let volume_name = wait_for("the outputs volume", TIMEOUT, || async {
            let claim = Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
                client.clone(),
                &ns,
            )
            .get("outputs")
            .await?;
            Ok(claim.spec.and_then(|s| s.volume_name))
        })
        .await
        .unwrap();
        Api::<Tenant>::all(client.clone())
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
        let namespaces = Api::<Namespace>::all(client.clone());
        wait_for("the tenant namespace gone", TIMEOUT, || async {
            Ok(namespaces.get_opt(&ns).await?.is_none().then_some(()))
        })
        .await
        .unwrap();
        let volumes = Api::<PersistentVolume>::all(client.clone());
        if retain {
            let volume = volumes
                .get(&volume_name)
                .await
                .expect("a retained volume outlives its tenant");
            assert_eq!(
                volume
                    .spec
                    .as_ref()
                    .unwrap()
                    .persistent_volume_reclaim_policy
                    .as_deref(),
                Some("Retain")
            );
            assert_eq!(volume.labels()["atelier.dev/tenant"], name);
        } else {
            wait_for("the volume deleted", TIMEOUT, || async {
                Ok(volumes.get_opt(&volume_name).await?.is_none().then_some(()))
            })
            .await
            .unwrap();
        }
    }
}

/// The tenant's inference and outputs pods answer their `/v1` APIs only with the tenant's token
/// (the Secret the operator created, owned by the Tenant); health stays open for the kubelet.
#[tokio::test]
async fn the_tenants_pods_answer_only_with_its_token() {
    let cluster = operator().await;
    let client = cluster.client().await;
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .get(atelier_crds::names::API_TOKEN_SECRET)
        .await
        .unwrap();
    assert!(
        secret
            .owner_references()
            .iter()
            .any(|r| Some(&r.uid) == tenant.uid().as_ref()),
        "the token's Secret goes with its tenant"
    );
    let token = common::pod_token(cluster, &ns).await.unwrap();
    assert!(token.len() >= 32, "{} characters", token.len());
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let http = reqwest::Client::new();
    for (component, path) in [
        ("inference", "/v1/model"),
        ("outputs", "/v1/outputs/ann%40example.com"),
    ] {
        let ip = wait_for(&format!("a ready {component} pod"), TIMEOUT, || async {
            let list = pods
                .list(
                    &ListParams::default()
                        .labels(&format!("app.kubernetes.io/component={component}")),
                )
                .await?;
            Ok(list.items.into_iter().find_map(|p| p.status?.pod_ip))
        })
        .await
        .unwrap();
        let url = format!("http://{ip}:{}{path}", atelier_crds::names::HTTP_PORT);
        let without = http.get(&url).send().await.unwrap().status();
        let wrong = http
            .get(&url)
            .bearer_auth("a-token-of-another-tenant-0123456789")
            .send()
            .await
            .unwrap()
            .status();
        let with = http
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            (without.as_u16(), wrong.as_u16(), with.as_u16()),
            (401, 401, 200),
            "{component} {path}"
        );
        let health = format!("http://{ip}:{}/healthz", atelier_crds::names::HTTP_PORT);
        assert_eq!(
            http.get(&health).send().await.unwrap().status().as_u16(),
            200
        );
    }
    Api::<Tenant>::all(client)
        .delete(&tenant.name_any(), &DeleteParams::default())
        .await
        .unwrap();
}
