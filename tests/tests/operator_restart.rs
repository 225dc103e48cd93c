//! The operator killed at the worst moments: in the middle of a tenant's first reconcile, while
//! a job runs, and while it leads a pair of replicas. A new operator process must finish the work without duplicating or
//! orphaning anything. Each test kills its own operator, so this binary has its cluster to
//! itself and runs its tests one at a time.

mod common;

use std::time::Duration;

use atelier_crds::{JobPhase, Tenant};
use atelier_tests::{TestCluster, unique_name, wait_for};
use common::{
    Operator, create_job, create_ready_tenant, create_tenant, model_volume, tenant_manifest,
    tenant_objects, user_pngs, wait_job_finished, wait_job_generating, wait_tenant_ready,
};
use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::Mutex;

const TIMEOUT: Duration = Duration::from_secs(180);

/// Every object the tenant controller applies in a tenant namespace, by `tenant_objects` key.
const EVERY_OBJECT: [&str; 13] = [
    "Deployment/inference",
    "Deployment/outputs",
    "LimitRange/atelier-defaults",
    "NetworkPolicy/allow-from-platform",
    "NetworkPolicy/default-deny-ingress",
    "PersistentVolumeClaim/model",
    "PersistentVolumeClaim/outputs",
    "ResourceQuota/atelier-quota",
    "RoleBinding/atelier-admins",
    "RoleBinding/atelier-members",
    "Secret/atelier-api-token",
    "Service/inference",
    "Service/outputs",
];

/// Two operators must never run at once here (one is killed, the next started).
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn cluster() -> &'static TestCluster {
    let cluster = TestCluster::shared().await;
    static ROLES: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ROLES
        .get_or_init(|| async {
            common::apply_chart_template(cluster, "templates/tenant-clusterroles.yaml")
                .expect("tenant ClusterRoles");
        })
        .await;
    cluster
}

#[tokio::test]
async fn an_operator_killed_mid_reconcile_leaves_nothing_duplicated_or_orphaned() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let client = cluster.client().await;
    // The namespace is the first object of the reconcile: kill the operator as soon as a watch
    // sees it. A reconcile quicker than the watch event leaves nothing to finish, so try again
    // with a new tenant until one is caught half done.
    let mut attempts = 0;
    let (tenant, partial) = loop {
        attempts += 1;
        let mut first = Operator::start(cluster, &[]).unwrap();
        let volume = model_volume(cluster).await.unwrap();
        let tenant = tenant_manifest(
            &unique_name("tn"),
            &volume,
            json!({ "inference": { "minReplicas": 1 } }),
        );
        let selector = format!("metadata.name={}", tenant.namespace_name());
        let mut namespace_events = std::pin::pin!(watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().fields(&selector),
        ));
        // The watch is established (its initial, empty list is done) before the tenant exists.
        while let Some(event) = namespace_events.try_next().await.unwrap() {
            if matches!(event, watcher::Event::InitDone) {
                break;
            }
        }
        let tenant = Api::<Tenant>::all(client.clone())
            .create(&PostParams::default(), &tenant)
            .await
            .unwrap();
        while let Some(event) = namespace_events.try_next().await.unwrap() {
            if matches!(event, watcher::Event::Apply(_)) {
                break;
            }
        }
        first.kill();
        let partial = tenant_objects(&client, &tenant.namespace_name())
            .await
            .unwrap();
        if partial.len() < EVERY_OBJECT.len() {
            break (tenant, partial);
        }
        assert!(
            attempts < 10,
            "no reconcile was ever caught half done: {partial:?}"
        );
    };
    let ns = tenant.namespace_name();

    let _second = Operator::start(cluster, &[]).unwrap();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    let objects = tenant_objects(&client, &ns).await.unwrap();
    let kinds: Vec<&str> = objects.keys().map(String::as_str).collect();
    assert_eq!(
        kinds, EVERY_OBJECT,
        "after the restart (before it: {partial:?})"
    );
    // One ReplicaSet per Deployment and exactly the pods asked for: nothing created twice.
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        replica_sets.items.len(),
        2,
        "{:?}",
        names(&replica_sets.items)
    );
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    wait_for("one inference and one outputs pod", TIMEOUT, || async {
        let list = pods.list(&ListParams::default()).await?;
        let live: Vec<&Pod> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        Ok((live.len() == 2).then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_operator_killed_mid_job_yields_one_image_and_the_job_completes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let mut first = Operator::start(cluster, &[]).unwrap();
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    // About ten seconds of work on the tiny model.
    let job = create_job(
        cluster,
        &ns,
        "joe@example.com",
        json!({ "steps": 30, "width": 512, "height": 512 }),
    )
    .await
    .unwrap();
    let name = job.name_any();
    wait_job_generating(cluster, &ns, &name, TIMEOUT)
        .await
        .unwrap();
    first.kill();

    let second = Operator::start(cluster, &[]).unwrap();
    let done = wait_job_finished(cluster, &ns, &name, TIMEOUT)
        .await
        .unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(done.phase(), JobPhase::Succeeded, "{status:?}");
    assert_eq!(
        status.attempts, 1,
        "the running generation was adopted, not redone"
    );
    assert_eq!(status.progress.unwrap().step, 30);
    let pngs = user_pngs(cluster, &ns, "joe@example.com").await.unwrap();
    assert_eq!(pngs.len(), 1, "exactly one image for one job: {pngs:?}");
    assert!(
        !second.logs().contains("dispatch failed"),
        "{}",
        second.logs()
    );
}

#[tokio::test]
async fn of_two_operators_one_leads_and_the_other_takes_over_when_it_dies() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = cluster().await;
    let client = cluster.client().await;
    let lease_namespace = unique_name("leases");
    let namespace: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": lease_namespace } })).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let elect = |identity: &str| {
        Operator::start(
            cluster,
            &[
                "--leader-elect",
                &format!("--leader-namespace={lease_namespace}"),
                &format!("--identity={identity}"),
            ],
        )
        .unwrap()
    };
    let mut first = elect("operator-a");
    wait_for("operator-a to lead", TIMEOUT, || async {
        Ok(first.logs().contains("became leader").then_some(()))
    })
    .await
    .unwrap();
    let second = elect("operator-b");
    let tenant = create_tenant(cluster, json!({})).await.unwrap();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    assert!(
        !second.logs().contains("became leader") && !second.logs().contains("tenant status"),
        "the standby reconciled:\n{}",
        second.logs()
    );

    first.kill();
    // The standby takes over once the dead leader's lease expires.
    let tenant = create_tenant(cluster, json!({})).await.unwrap();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    assert!(second.logs().contains("became leader"), "{}", second.logs());
}

fn names<K: kube::Resource>(items: &[K]) -> Vec<String> {
    items.iter().map(|item| item.name_any()).collect()
}
