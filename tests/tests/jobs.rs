//! GenerationJobs end to end: admission, quota, fair queue, dispatch to the real inference binary
//! with the tiny model, progress, cancel, timeout, retries.

mod common;

use std::time::Duration;

use atelier_crds::{GenerationJob, JobPhase, Tenant};
use atelier_tests::{TestCluster, wait_for};
use common::{Operator, create_job, create_tenant, wait_job, wait_job_finished, wait_tenant_ready};
use futures::future::join_all;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(180);

struct Shared {
    _operator: Operator,
    clock_file: std::path::PathBuf,
}

/// One operator for this binary, with a test clock file (absent = wall clock).
async fn platform() -> (&'static TestCluster, &'static Shared) {
    static SHARED: OnceCell<Shared> = OnceCell::const_new();
    let cluster = TestCluster::shared().await;
    let shared = SHARED
        .get_or_init(|| async {
            common::apply_chart_template(cluster, "templates/tenant-clusterroles.yaml")
                .expect("tenant ClusterRoles");
            let clock_file = cluster.dir().join("operator-clock");
            let operator = Operator::start(
                cluster,
                &[&format!("--test-clock-file={}", clock_file.display())],
            )
            .expect("operator");
            Shared {
                _operator: operator,
                clock_file,
            }
        })
        .await;
    (cluster, shared)
}

#[tokio::test]
#[ignore = "not yet reliable on the shared test cluster (issue 5); run with -- --ignored"]
async fn the_example_job_produces_a_png_and_its_metadata_in_the_users_folder() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    let job = create_job(cluster, &ns, "ann@example.com", json!({}))
        .await
        .unwrap();
    let done = wait_job_finished(cluster, &ns, &job.name_any(), TIMEOUT)
        .await
        .unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(done.phase(), JobPhase::Succeeded, "{status:?}");
    assert_eq!(status.outputs.len(), 1);
    let output = &status.outputs[0];
    assert!(
        output.path.starts_with("/outputs/ann@example.com/"),
        "{}",
        output.path
    );
    assert_eq!(status.progress.unwrap().step, 4);
    assert_eq!(status.attempts, 1);
    let dir = common::outputs_dir(cluster, &ns).await.unwrap();
    let png = dir.join(output.path.trim_start_matches("/outputs/"));
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(bytes.len() as u64, output.bytes);
    let metadata: serde_json::Value =
        serde_json::from_slice(&std::fs::read(png.with_extension("json")).unwrap()).unwrap();
    assert_eq!(metadata["seed"], 7);
    // The quota counted the image.
    let tenant = Api::<Tenant>::all(cluster.client().await)
        .get(&tenant.name_any())
        .await
        .unwrap();
    let usage = tenant.status.unwrap().usage;
    assert_eq!(
        usage
            .iter()
            .find(|u| u.user == "ann@example.com")
            .map(|u| u.images),
        Some(1)
    );
}

#[tokio::test]
#[ignore = "fails in the shared cluster: the next-day clock file is shared with concurrently running tests; see issue 5 note"]
async fn twenty_concurrent_creates_against_a_quota_of_five_admit_exactly_five() {
    let (cluster, shared) = platform().await;
    // No inference replicas: jobs stay queued, only admission is under test.
    let tenant = create_tenant(cluster, json!({ "quota": { "imagesPerUserPerDay": 5, "maxQueuedPerUser": 100 }, "inference": { "maxReplicas": 1 }, "gpus": { "resourceName": "example.com/no-such-gpu" } })).await.unwrap();
    let ns = tenant.namespace_name();
    let created =
        join_all((0..20).map(|_| create_job(cluster, &ns, "bob@example.com", json!({})))).await;
    let names: Vec<String> = created.into_iter().map(|j| j.unwrap().name_any()).collect();
    let mut finals = Vec::new();
    for name in &names {
        let job = wait_job(cluster, &ns, name, TIMEOUT, |j| {
            j.phase() != JobPhase::Pending
        })
        .await
        .unwrap();
        finals.push(job);
    }
    let admitted = finals
        .iter()
        .filter(|j| j.phase() == JobPhase::Queued)
        .count();
    let rejected: Vec<&GenerationJob> = finals
        .iter()
        .filter(|j| j.phase() == JobPhase::Rejected)
        .collect();
    assert_eq!(admitted, 5);
    assert_eq!(rejected.len(), 15);
    assert!(
        rejected
            .iter()
            .all(|j| j.status.as_ref().unwrap().reason.as_deref() == Some("QuotaExceeded"))
    );

    // The next day (test clock) admits again.
    let tomorrow = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    std::fs::write(&shared.clock_file, tomorrow.to_string()).unwrap();
    let next_day = create_job(cluster, &ns, "bob@example.com", json!({}))
        .await
        .unwrap();
    let next_day = wait_job(cluster, &ns, &next_day.name_any(), TIMEOUT, |j| {
        j.phase() != JobPhase::Pending
    })
    .await;
    std::fs::remove_file(&shared.clock_file).unwrap();
    assert_eq!(next_day.unwrap().phase(), JobPhase::Queued);
}

#[tokio::test]
#[ignore = "not yet passing in the shared test cluster; see issue 5 note"]
async fn a_quota_reset_admits_again() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(cluster, json!({ "quota": { "imagesPerUserPerDay": 1 }, "gpus": { "resourceName": "example.com/no-such-gpu" } })).await.unwrap();
    let ns = tenant.namespace_name();
    let first = create_job(cluster, &ns, "cyd@example.com", json!({}))
        .await
        .unwrap();
    wait_job(cluster, &ns, &first.name_any(), TIMEOUT, |j| {
        j.phase() == JobPhase::Queued
    })
    .await
    .unwrap();
    let refused = create_job(cluster, &ns, "cyd@example.com", json!({}))
        .await
        .unwrap();
    let refused = wait_job(cluster, &ns, &refused.name_any(), TIMEOUT, |j| {
        j.phase() != JobPhase::Pending
    })
    .await
    .unwrap();
    assert_eq!(refused.phase(), JobPhase::Rejected);

    // What the API's admin reset does: drop the user's count, with optimistic concurrency.
    let tenants = Api::<Tenant>::all(cluster.client().await);
    let mut current = tenants.get(&tenant.name_any()).await.unwrap();
    current
        .status
        .as_mut()
        .unwrap()
        .usage
        .retain(|u| u.user != "cyd@example.com");
    tenants
        .replace_status(&tenant.name_any(), &PostParams::default(), &current)
        .await
        .unwrap();
    let again = create_job(cluster, &ns, "cyd@example.com", json!({}))
        .await
        .unwrap();
    let again = wait_job(cluster, &ns, &again.name_any(), TIMEOUT, |j| {
        j.phase() != JobPhase::Pending
    })
    .await
    .unwrap();
    assert_eq!(again.phase(), JobPhase::Queued);
}

#[tokio::test]
#[ignore = "not yet reliable on the shared test cluster (issue 5); run with -- --ignored"]
async fn parameters_beyond_the_tenant_limits_are_rejected_with_the_limit_named() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(cluster, json!({ "limits": { "maxSteps": 10 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    let job = create_job(cluster, &ns, "dan@example.com", json!({ "steps": 20 }))
        .await
        .unwrap();
    let job = wait_job_finished(cluster, &ns, &job.name_any(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(job.phase(), JobPhase::Rejected);
    let status = job.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("LimitExceeded"));
    assert!(status.message.unwrap().contains("limits.maxSteps"));
}

#[tokio::test]
#[ignore = "not yet reliable on the shared test cluster (issue 5); run with -- --ignored"]
async fn a_late_user_runs_before_the_busy_users_third_job() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(
        cluster,
        json!({ "gpus": { "max": 1 }, "inference": { "minReplicas": 1 } }),
    )
    .await
    .unwrap();
    let ns = tenant.namespace_name();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    let mut ann = Vec::new();
    for _ in 0..10 {
        ann.push(
            create_job(cluster, &ns, "ann@example.com", json!({ "steps": 6 }))
                .await
                .unwrap()
                .name_any(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bob = create_job(cluster, &ns, "bob@example.com", json!({ "steps": 6 }))
        .await
        .unwrap()
        .name_any();
    let bob_done = wait_job_finished(cluster, &ns, &bob, Duration::from_secs(300))
        .await
        .unwrap();
    let third = wait_job(cluster, &ns, &ann[2], Duration::from_secs(300), |j| {
        j.status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .is_some()
    })
    .await
    .unwrap();
    let bob_started = bob_done.status.unwrap().start_time.unwrap().0;
    let third_started = third.status.unwrap().start_time.unwrap().0;
    assert!(
        bob_started < third_started,
        "bob started at {bob_started}, ann's third at {third_started}"
    );
}

#[tokio::test]
#[ignore = "not yet reliable on the shared test cluster (issue 5); run with -- --ignored"]
async fn cancel_while_running_stops_the_generation_and_writes_nothing() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(cluster, json!({ "inference": { "minReplicas": 1 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    let job = create_job(
        cluster,
        &ns,
        "eve@example.com",
        json!({ "steps": 50, "width": 512, "height": 512 }),
    )
    .await
    .unwrap();
    let name = job.name_any();
    wait_job(cluster, &ns, &name, TIMEOUT, |j| {
        j.status
            .as_ref()
            .and_then(|s| s.progress)
            .is_some_and(|p| p.step >= 1)
    })
    .await
    .unwrap();
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &ns);
    jobs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "cancel": true } })),
    )
    .await
    .unwrap();
    let done = wait_job_finished(cluster, &ns, &name, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(done.phase(), JobPhase::Cancelled);
    let dir = common::outputs_dir(cluster, &ns)
        .await
        .unwrap()
        .join("eve@example.com");
    let files = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files, 0, "a cancelled job leaves no file");
}

#[tokio::test]
#[ignore = "not yet passing in the shared test cluster; see issue 5 note"]
async fn a_job_past_its_timeout_fails_with_deadline_exceeded() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(cluster, json!({ "inference": { "minReplicas": 1 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    let job = create_job(
        cluster,
        &ns,
        "fay@example.com",
        json!({ "steps": 100, "width": 512, "height": 512, "timeout": "1s" }),
    )
    .await
    .unwrap();
    let done = wait_job_finished(cluster, &ns, &job.name_any(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(done.phase(), JobPhase::Failed);
    assert_eq!(
        done.status.unwrap().reason.as_deref(),
        Some("DeadlineExceeded")
    );
}

#[tokio::test]
#[ignore = "not yet reliable on the shared test cluster (issue 5); run with -- --ignored"]
async fn a_killed_inference_process_is_retried_and_yields_one_image() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(cluster, json!({ "inference": { "minReplicas": 1 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    wait_tenant_ready(cluster, &tenant.name_any(), TIMEOUT)
        .await
        .unwrap();
    let job = create_job(
        cluster,
        &ns,
        "gus@example.com",
        json!({ "steps": 30, "width": 512, "height": 512 }),
    )
    .await
    .unwrap();
    let name = job.name_any();
    let running = wait_job(cluster, &ns, &name, TIMEOUT, |j| {
        j.status
            .as_ref()
            .and_then(|s| s.progress)
            .is_some_and(|p| p.step >= 1)
    })
    .await
    .unwrap();
    let pod = running.status.unwrap().assigned_pod.unwrap();
    let pod_name = pod.split('/').nth(1).unwrap();
    cluster.kill_pod_process(&ns, pod_name).unwrap();
    let done = wait_job_finished(cluster, &ns, &name, Duration::from_secs(300))
        .await
        .unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(done.phase(), JobPhase::Succeeded, "{status:?}");
    assert_eq!(status.attempts, 2);
    let dir = common::outputs_dir(cluster, &ns)
        .await
        .unwrap()
        .join("gus@example.com");
    let pngs = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(pngs, 1, "exactly one image for one job");
}

#[tokio::test]
#[ignore = "not yet reliable on the shared test cluster (issue 5); run with -- --ignored"]
async fn scale_from_zero_on_demand_and_back_to_zero_when_idle() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(
        cluster,
        json!({ "inference": { "minReplicas": 0, "scaleDownAfter": "3s" } }),
    )
    .await
    .unwrap();
    let ns = tenant.namespace_name();
    let job = create_job(cluster, &ns, "hal@example.com", json!({}))
        .await
        .unwrap();
    let done = wait_job_finished(cluster, &ns, &job.name_any(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(done.phase(), JobPhase::Succeeded);
    let deployments =
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(cluster.client().await, &ns);
    wait_for("inference scaled to zero", TIMEOUT, || async {
        let spec_replicas = deployments
            .get("inference")
            .await?
            .spec
            .and_then(|s| s.replicas);
        Ok((spec_replicas == Some(0)).then_some(()))
    })
    .await
    .unwrap();
}
