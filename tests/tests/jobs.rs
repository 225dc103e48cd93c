//! GenerationJobs end to end: admission, quota, fair queue, dispatch to the real inference binary
//! with the tiny model, progress, cancel, timeout, retries.

mod common;

use std::time::Duration;

use atelier_crds::{GenerationJob, JobPhase, Tenant};
use atelier_tests::{TestCluster, wait_for};
use base64::Engine as _;
use common::{
    Operator, create_job, create_ready_tenant, create_tenant, delete_tenant, metric, user_pngs,
    wait_job, wait_job_finished, wait_job_generating, wait_tenant_ready,
};
use futures::future::join_all;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_secs(180);

/// One operator for this binary.
async fn platform() -> (&'static TestCluster, &'static Operator) {
    static OPERATOR: OnceCell<Operator> = OnceCell::const_new();
    let cluster = TestCluster::shared().await;
    let operator = OPERATOR
        .get_or_init(|| async {
            common::apply_chart_template(cluster, "templates/tenant-clusterroles.yaml")
                .expect("tenant ClusterRoles");
            // Test receivers listen on 127.0.0.1 only; 127.0.0.2 stays refused like any other
            // internal address.
            Operator::start(cluster, &["--webhook-allowed-cidrs=127.0.0.1/32"]).expect("operator")
        })
        .await;
    (cluster, operator)
}

#[tokio::test]
async fn the_example_job_produces_a_png_and_its_metadata_in_the_users_folder() {
    let (cluster, operator) = platform().await;
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
    let usage = tenant.status.clone().unwrap().usage;
    assert_eq!(
        usage
            .iter()
            .find(|u| u.user == "ann@example.com")
            .map(|u| u.images),
        Some(1)
    );

    // The operator's metrics saw the job through; the dispatcher refreshes its gauges every tick.
    let tenant_label = format!("tenant=\"{}\"", tenant.name_any());
    let metrics = wait_for("job metrics", Duration::from_secs(10), || async {
        let text = operator.metrics().await?;
        let succeeded = metric(
            &text,
            "atelier_jobs",
            &[&tenant_label, "phase=\"Succeeded\""],
        );
        Ok((succeeded == Some(1.0)).then_some(text))
    })
    .await
    .unwrap();
    assert_eq!(
        metric(&metrics, "atelier_queue_depth", &[&tenant_label]),
        Some(0.0)
    );
    for histogram in [
        "atelier_job_wait_seconds_count",
        "atelier_job_run_seconds_count",
    ] {
        let observed = metric(&metrics, histogram, &[]).unwrap_or_default();
        assert!(observed >= 1.0, "{histogram} = {observed}\n{metrics}");
    }
    let transitions = metric(
        &metrics,
        "atelier_job_transitions_total",
        &["phase=\"Succeeded\""],
    );
    assert!(transitions >= Some(1.0), "{metrics}");
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn a_queued_job_deleted_gives_its_images_back_and_concurrent_creates_respect_max_queued() {
    let (cluster, _) = platform().await;
    // No inference replicas: jobs stay queued, only admission is under test.
    let tenant = create_tenant(cluster, json!({ "quota": { "imagesPerUserPerDay": 1, "maxQueuedPerUser": 1 }, "gpus": { "resourceName": "example.com/no-such-gpu" } })).await.unwrap();
    let ns = tenant.namespace_name();
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &ns);
    let settled = |name: String| {
        let ns = &ns;
        async move {
            wait_job(cluster, ns, &name, TIMEOUT, |j| {
                j.phase() != JobPhase::Pending
            })
            .await
            .unwrap()
        }
    };
    let first = create_job(cluster, &ns, "dee@example.com", json!({}))
        .await
        .unwrap();
    assert_eq!(settled(first.name_any()).await.phase(), JobPhase::Queued);
    jobs.delete(&first.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let tenants = Api::<Tenant>::all(cluster.client().await);
    wait_for("the deleted job's image given back", TIMEOUT, || async {
        let status = tenants
            .get(&tenant.name_any())
            .await?
            .status
            .unwrap_or_default();
        Ok(status.usage.is_empty().then_some(()))
    })
    .await
    .unwrap();
    let second = create_job(cluster, &ns, "dee@example.com", json!({}))
        .await
        .unwrap();
    assert_eq!(settled(second.name_any()).await.phase(), JobPhase::Queued);

    // Five jobs at once where one may wait: one is queued, whatever the order the job index
    // sees them in.
    let roomy = create_tenant(cluster, json!({ "quota": { "imagesPerUserPerDay": 50, "maxQueuedPerUser": 1 }, "gpus": { "resourceName": "example.com/no-such-gpu" } })).await.unwrap();
    let roomy_ns = roomy.namespace_name();
    let created =
        join_all((0..5).map(|_| create_job(cluster, &roomy_ns, "eve@example.com", json!({}))))
            .await;
    let mut phases = Vec::new();
    for job in created {
        let job = wait_job(cluster, &roomy_ns, &job.unwrap().name_any(), TIMEOUT, |j| {
            j.phase() != JobPhase::Pending
        })
        .await
        .unwrap();
        phases.push((job.phase(), job.status.and_then(|s| s.reason)));
    }
    let queued = phases
        .iter()
        .filter(|(p, _)| *p == JobPhase::Queued)
        .count();
    assert_eq!(queued, 1, "{phases:?}");
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn twenty_concurrent_creates_against_a_quota_of_five_admit_exactly_five() {
    let (cluster, _) = platform().await;
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
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
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

    // The admin reset, through the same code the API's reset endpoint runs.
    let tenants = Api::<Tenant>::all(cluster.client().await);
    let removed = atelier_operator::controllers::quota::reset(
        &tenants,
        &tenant.name_any(),
        "cyd@example.com",
    )
    .await
    .unwrap();
    assert_eq!(removed, Some(1));
    let again = create_job(cluster, &ns, "cyd@example.com", json!({}))
        .await
        .unwrap();
    let again = wait_job(cluster, &ns, &again.name_any(), TIMEOUT, |j| {
        j.phase() != JobPhase::Pending
    })
    .await
    .unwrap();
    assert_eq!(again.phase(), JobPhase::Queued);
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn a_user_at_the_queued_limit_is_refused_until_a_job_leaves_the_queue() {
    let (cluster, _) = platform().await;
    // No inference replicas: admitted jobs stay queued.
    let tenant = create_tenant(cluster, json!({ "quota": { "imagesPerUserPerDay": 100, "maxQueuedPerUser": 2 }, "gpus": { "resourceName": "example.com/no-such-gpu" } })).await.unwrap();
    let ns = tenant.namespace_name();
    let admitted_phase = |user: &'static str| {
        let ns = ns.clone();
        async move {
            let job = create_job(cluster, &ns, user, json!({})).await.unwrap();
            let job = wait_job(cluster, &ns, &job.name_any(), TIMEOUT, |j| {
                j.phase() != JobPhase::Pending
            })
            .await
            .unwrap();
            let reason = job.status.as_ref().unwrap().reason.clone();
            (job.name_any(), job.phase(), reason)
        }
    };
    let (first, phase, _) = admitted_phase("eve@example.com").await;
    assert_eq!(phase, JobPhase::Queued);
    assert_eq!(admitted_phase("eve@example.com").await.1, JobPhase::Queued);
    let (_, phase, reason) = admitted_phase("eve@example.com").await;
    assert_eq!(
        (phase, reason.as_deref()),
        (JobPhase::Rejected, Some("TooManyQueued"))
    );
    // The limit is per user.
    assert_eq!(admitted_phase("fay@example.com").await.1, JobPhase::Queued);

    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &ns);
    jobs.patch(
        &first,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "cancel": true } })),
    )
    .await
    .unwrap();
    let cancelled = wait_job_finished(cluster, &ns, &first, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(cancelled.phase(), JobPhase::Cancelled);
    assert_eq!(admitted_phase("eve@example.com").await.1, JobPhase::Queued);
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
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
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn a_late_user_runs_before_the_busy_users_third_job() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({ "gpus": { "max": 1 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    // Ann's jobs take several seconds each on the tiny model, so Bob's arrives while her first
    // runs and the rest of hers wait.
    for _ in 0..10 {
        create_job(
            cluster,
            &ns,
            "ann@example.com",
            json!({ "steps": 12, "width": 512, "height": 512 }),
        )
        .await
        .unwrap();
    }
    let bob = create_job(cluster, &ns, "bob@example.com", json!({ "steps": 6 }))
        .await
        .unwrap()
        .name_any();
    // Waiting jobs show where they stand in the queue (rewritten at most every few seconds,
    // so only the publishing is checked here; the order itself is unit-tested in core::queue).
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &ns);
    wait_for("queue positions", TIMEOUT, || async {
        let deepest = jobs
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|j| j.status?.queue_position)
            .max();
        Ok(deepest.filter(|position| *position >= 2))
    })
    .await
    .unwrap();
    let bob_done = wait_job_finished(cluster, &ns, &bob, Duration::from_secs(300))
        .await
        .unwrap();
    // Ann's own jobs may start in any order (creation times have one-second resolution);
    // what counts is that Bob's started no later than the third of hers to start. One job runs
    // at a time and each takes seconds, so a Bob served after that would start seconds later.
    let ann_starts = wait_for(
        "three of Ann's jobs started",
        Duration::from_secs(300),
        || async {
            let mut starts: Vec<jiff::Timestamp> = jobs
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter(|j| j.spec.user == "ann@example.com")
                .filter_map(|j| j.status?.start_time.map(|t| t.0))
                .collect();
            starts.sort();
            Ok((starts.len() >= 3).then_some(starts))
        },
    )
    .await
    .unwrap();
    let bob_started = bob_done.status.unwrap().start_time.unwrap().0;
    assert!(
        bob_started <= ann_starts[2],
        "bob started at {bob_started}, ann's jobs at {ann_starts:?}"
    );
    // Ann's other jobs are of no further interest; deleting the tenant cancels them.
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn cancel_while_running_stops_the_generation_and_writes_nothing() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    let name = running_job(cluster, &ns, "eve@example.com", 50)
        .await
        .name_any();
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
    let pngs = user_pngs(cluster, &ns, "eve@example.com").await.unwrap();
    assert!(pngs.is_empty(), "a cancelled job leaves no image: {pngs:?}");
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn a_job_past_its_timeout_fails_with_deadline_exceeded() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({ "limits": { "maxSteps": 100 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    // About half a minute of work on the tiny model, stopped after one second.
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
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn a_killed_inference_process_is_retried_and_yields_one_image() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    let running = running_job(cluster, &ns, "gus@example.com", 30).await;
    let name = running.name_any();
    let pod = running.status.unwrap().assigned_pod.unwrap();
    let pod_name = pod.split('/').nth(1).unwrap();
    cluster.kill_pod_process(&ns, pod_name).unwrap();
    let done = wait_job_finished(cluster, &ns, &name, Duration::from_secs(300))
        .await
        .unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(done.phase(), JobPhase::Succeeded, "{status:?}");
    assert_eq!(status.attempts, 2);
    let pngs = user_pngs(cluster, &ns, "gus@example.com").await.unwrap();
    assert_eq!(pngs.len(), 1, "exactly one image for one job: {pngs:?}");
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn scale_from_zero_on_demand_and_back_to_zero_when_idle() {
    let (cluster, _) = platform().await;
    let tenant = create_tenant(
        cluster,
        json!({ "inference": { "minReplicas": 0, "scaleDownAfter": "3s" } }),
    )
    .await
    .unwrap();
    let ns = tenant.namespace_name();
    let deployments =
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(cluster.client().await, &ns);
    let replicas = || async {
        let deployment = deployments.get_opt("inference").await?;
        anyhow::Ok(deployment.and_then(|d| d.spec?.replicas))
    };
    // Before any job the tenant is at zero: the job below must scale it up.
    wait_for("the idle tenant at zero replicas", TIMEOUT, || async {
        Ok((replicas().await? == Some(0)).then_some(()))
    })
    .await
    .unwrap();
    let job = create_job(cluster, &ns, "hal@example.com", json!({}))
        .await
        .unwrap();
    let done = wait_job_finished(cluster, &ns, &job.name_any(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(done.phase(), JobPhase::Succeeded);
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
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn a_signed_webhook_hears_start_and_completion_and_the_ttl_keeps_the_image() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    let (deliveries, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let deliveries = deliveries.clone();
            async move {
                let header = |name: &str| headers[name].to_str().unwrap().to_string();
                let _ = deliveries.send((
                    header("webhook-id"),
                    header("webhook-timestamp"),
                    header("webhook-signature"),
                    body,
                ));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let key = b"a signing key of the tenant".to_vec();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "hooks", "labels": { "atelier.dev/webhook-signing": "true" } },
        "stringData": { "key": format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&key)) },
    }))
    .unwrap();
    Api::<Secret>::namespaced(cluster.client().await, &ns)
        .create(&Default::default(), &secret)
        .await
        .unwrap();

    let job = create_job(
        cluster,
        &ns,
        "kim@example.com",
        json!({
            "webhook": { "url": url, "secretRef": { "name": "hooks", "key": "key" }, "events": ["started", "completed"] },
            "ttlAfterFinished": "3s",
        }),
    )
    .await
    .unwrap();
    let mut events = Vec::new();
    for _ in 0..2 {
        let (id, timestamp, signature, body) = tokio::time::timeout(TIMEOUT, delivered.recv())
            .await
            .expect("a webhook delivery")
            .unwrap();
        assert_eq!(
            signature,
            atelier_operator::controllers::webhook::sign(&key, &id, &timestamp, &body)
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["data"]["name"], job.name_any().as_str());
        events.push((body["type"].as_str().unwrap().to_string(), body));
    }
    assert_eq!(events[0].0, "generation.started");
    assert_eq!(events[1].0, "generation.completed");
    assert_eq!(events[1].1["data"]["phase"], "Succeeded");
    let path = events[1].1["data"]["outputs"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();

    // The finished object goes after its TTL; the image stays.
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &ns);
    wait_for("the job deleted after its TTL", TIMEOUT, || async {
        Ok(jobs.get_opt(&job.name_any()).await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    let png = common::outputs_dir(cluster, &ns)
        .await
        .unwrap()
        .join(path.trim_start_matches("/outputs/"));
    assert!(png.exists(), "{} is gone", png.display());
    delete_tenant(cluster, &tenant).await;
}

/// A webhook is any member's URL sent from the operator's position: internal addresses, and
/// redirects to them, are not called, and the job says why (without the URL).
#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_even_through_a_redirect() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    // The internal target: counts what reaches it.
    let (reached, mut reached_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let internal = axum::Router::new().fallback(move || {
        let reached = reached.clone();
        async move {
            let _ = reached.send(());
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let internal_listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let internal_url = format!(
        "http://{}/hook?token=s3cret",
        internal_listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(internal_listener, internal).await });
    // An allowed receiver that redirects to it.
    let location = internal_url.clone();
    let redirector = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move {
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, location)],
            )
        }
    });
    let redirect_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect_url = format!("http://{}/hook", redirect_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(redirect_listener, redirector).await });

    let direct = create_job(
        cluster,
        &ns,
        "lou@example.com",
        json!({ "webhook": { "url": internal_url, "events": ["started", "completed"] } }),
    )
    .await
    .unwrap();
    let redirected = create_job(
        cluster,
        &ns,
        "lou@example.com",
        json!({ "webhook": { "url": redirect_url, "events": ["started", "completed"] } }),
    )
    .await
    .unwrap();
    for job in [&direct, &redirected] {
        let done = wait_job_finished(cluster, &ns, &job.name_any(), TIMEOUT)
            .await
            .unwrap();
        assert_eq!(done.phase(), JobPhase::Succeeded);
    }
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(cluster.client().await, &ns);
    let refusal = wait_for(
        "a WebhookRefused event on the direct job",
        TIMEOUT,
        || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("WebhookRefused")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some(direct.name_any().as_str())
            }))
        },
    )
    .await
    .unwrap();
    let note = refusal.note.unwrap_or_default();
    assert!(note.contains("loopback"), "{note}");
    assert!(
        !note.contains("s3cret"),
        "the URL's token is in the event: {note}"
    );
    // The redirect's first attempt was answered; its retries (1 s, 2 s...) would follow a
    // redirect within a few seconds if they ever did.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        reached_rx.try_recv().is_err(),
        "a webhook reached the internal address"
    );
    delete_tenant(cluster, &tenant).await;
}

/// Images the tenant's status counts for `user` today.
async fn usage_of(cluster: &TestCluster, tenant: &str, user: &str) -> u32 {
    let tenant = Api::<Tenant>::all(cluster.client().await)
        .get(tenant)
        .await
        .unwrap();
    let usage = tenant.status.map(|s| s.usage).unwrap_or_default();
    usage
        .iter()
        .find(|u| u.user == user)
        .map_or(0, |u| u.images)
}

/// Waits until the tenant's status counts `images` for `user`.
async fn wait_usage(cluster: &TestCluster, tenant: &str, user: &str, images: u32) {
    wait_for(&format!("{user} at {images} image(s)"), TIMEOUT, || async {
        Ok((usage_of(cluster, tenant, user).await == images).then_some(()))
    })
    .await
    .unwrap();
}

/// Creates a 512×512 job of `steps` steps (seconds of work per step on the tiny model, so it
/// holds its GPU a while) and waits until it is generating.
async fn running_job(cluster: &TestCluster, ns: &str, user: &str, steps: u32) -> GenerationJob {
    let job = create_job(
        cluster,
        ns,
        user,
        json!({ "steps": steps, "width": 512, "height": 512 }),
    )
    .await
    .unwrap();
    wait_job_generating(cluster, ns, &job.name_any(), TIMEOUT)
        .await
        .unwrap()
}

#[tokio::test]
async fn cancelled_and_timed_out_jobs_give_their_images_back() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(
        cluster,
        json!({ "gpus": { "max": 1 }, "limits": { "maxSteps": 100 } }),
    )
    .await
    .unwrap();
    let (name, ns) = (tenant.name_any(), tenant.namespace_name());
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &ns);
    // A long job holds the only GPU; two more wait behind it.
    let running = running_job(cluster, &ns, "ida@example.com", 100)
        .await
        .name_any();
    let queued = create_job(cluster, &ns, "ida@example.com", json!({ "numImages": 2 }))
        .await
        .unwrap()
        .name_any();
    wait_job(cluster, &ns, &queued, TIMEOUT, |j| {
        j.phase() == JobPhase::Queued
    })
    .await
    .unwrap();
    wait_usage(cluster, &name, "ida@example.com", 3).await;

    // Cancelled while queued: its two images come back.
    jobs.patch(
        &queued,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "cancel": true } })),
    )
    .await
    .unwrap();
    let cancelled = wait_job_finished(cluster, &ns, &queued, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(cancelled.phase(), JobPhase::Cancelled);
    wait_usage(cluster, &name, "ida@example.com", 1).await;

    // Cancelled while running: its image comes back too.
    jobs.patch(
        &running,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "cancel": true } })),
    )
    .await
    .unwrap();
    let cancelled = wait_job_finished(cluster, &ns, &running, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(cancelled.phase(), JobPhase::Cancelled);
    wait_usage(cluster, &name, "ida@example.com", 0).await;

    // Past its timeout: failed, and nothing counted.
    let timed = json!({ "steps": 100, "width": 512, "height": 512, "timeout": "2s" });
    let late = create_job(cluster, &ns, "ida@example.com", timed)
        .await
        .unwrap()
        .name_any();
    let failed = wait_job_finished(cluster, &ns, &late, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        (failed.phase(), failed.status.unwrap().reason.as_deref()),
        (JobPhase::Failed, Some("DeadlineExceeded"))
    );
    wait_usage(cluster, &name, "ida@example.com", 0).await;
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn a_higher_priority_job_runs_before_a_fairer_earlier_one() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({ "gpus": { "max": 1 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    // Ann's first job holds the only GPU for many seconds, so the next two wait together.
    running_job(cluster, &ns, "ann@example.com", 30).await;
    // Fair share alone would serve Bob first (Ann is running a job); Ann's priority wins.
    let low = create_job(cluster, &ns, "bob@example.com", json!({}))
        .await
        .unwrap()
        .name_any();
    let high = create_job(cluster, &ns, "ann@example.com", json!({ "priority": 10 }))
        .await
        .unwrap()
        .name_any();
    let started = |name: String| {
        let ns = ns.clone();
        async move {
            let job = wait_job_finished(cluster, &ns, &name, TIMEOUT)
                .await
                .unwrap();
            assert_eq!(job.phase(), JobPhase::Succeeded);
            job.status.unwrap().start_time.unwrap().0
        }
    };
    let (high_started, low_started) = (started(high).await, started(low).await);
    assert!(
        high_started < low_started,
        "priority 10 started at {high_started}, priority 0 at {low_started}"
    );
    delete_tenant(cluster, &tenant).await;
}

/// The address of the tenant's (single) ready inference pod.
async fn inference_pod_url(cluster: &TestCluster, ns: &str) -> String {
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.client().await, ns);
    let ip = wait_for("a running inference pod", TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=inference"))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .find_map(|p| p.status?.pod_ip))
    })
    .await
    .unwrap();
    format!("http://{ip}:{}", atelier_crds::names::HTTP_PORT)
}

#[tokio::test]
async fn an_idle_model_leaves_the_device_and_comes_back_for_the_next_job() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(
        cluster,
        json!({ "inference": { "idleOffloadAfter": "2s" } }),
    )
    .await
    .unwrap();
    let ns = tenant.namespace_name();
    let url = inference_pod_url(cluster, &ns).await;
    let moves = |to: &'static str| {
        let url = url.clone();
        async move {
            let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
            let label = format!("to=\"{to}\"");
            Ok::<_, anyhow::Error>(
                metric(&text, "atelier_inference_model_moves_total", &[&label]).unwrap_or(-1.0),
            )
        }
    };
    let token = common::pod_token(cluster, &ns).await.unwrap();
    let model_state = || {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let model: serde_json::Value = reqwest::Client::new()
                .get(format!("{url}/v1/model"))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await?;
            Ok::<_, anyhow::Error>(model["state"].as_str().unwrap_or_default().to_string())
        }
    };
    for round in 1..=2 {
        let job = create_job(cluster, &ns, "max@example.com", json!({}))
            .await
            .unwrap();
        let done = wait_job_finished(cluster, &ns, &job.name_any(), TIMEOUT)
            .await
            .unwrap();
        assert_eq!(done.phase(), JobPhase::Succeeded);
        assert_eq!(moves("device").await.unwrap(), f64::from(round));
        wait_for("the idle model back in host memory", TIMEOUT, || async {
            Ok((model_state().await? == "host").then_some(()))
        })
        .await
        .unwrap();
        assert_eq!(moves("host").await.unwrap(), f64::from(round));
    }
    delete_tenant(cluster, &tenant).await;
}

#[tokio::test]
async fn deleting_a_tenant_ends_its_queued_and_running_jobs_and_leaves_nothing() {
    let (cluster, operator) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({ "gpus": { "max": 1 } }))
        .await
        .unwrap();
    let ns = tenant.namespace_name();
    let running = running_job(cluster, &ns, "ned@example.com", 50)
        .await
        .name_any();
    let mut names = vec![running];
    for _ in 0..2 {
        let queued = create_job(cluster, &ns, "ned@example.com", json!({}))
            .await
            .unwrap()
            .name_any();
        wait_job(cluster, &ns, &queued, TIMEOUT, |j| {
            j.phase() == JobPhase::Queued
        })
        .await
        .unwrap();
        names.push(queued);
    }
    // Every state each job passes through until its namespace takes it away.
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, &ns);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watch = tokio::spawn({
        let jobs = jobs.clone();
        async move {
            use futures::StreamExt as _;
            let mut events = std::pin::pin!(kube::runtime::watcher(jobs, Default::default()));
            while let Some(Ok(event)) = events.next().await {
                if let kube::runtime::watcher::Event::Apply(job)
                | kube::runtime::watcher::Event::InitApply(job) = event
                {
                    let _ = seen_tx.send(job);
                }
            }
        }
    });
    let tenants = Api::<Tenant>::all(cluster.client().await);
    tenants
        .delete(&tenant.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the tenant and its namespace gone", TIMEOUT, || async {
        let namespace = Api::<k8s_openapi::api::core::v1::Namespace>::all(cluster.client().await)
            .get_opt(&ns)
            .await?;
        let tenant = tenants.get_opt(&tenant.name_any()).await?;
        Ok((namespace.is_none() && tenant.is_none()).then_some(()))
    })
    .await
    .unwrap();
    watch.abort();
    let mut last = std::collections::HashMap::new();
    while let Ok(job) = seen.try_recv() {
        last.insert(job.name_any(), job);
    }
    for name in &names {
        let job = last
            .get(name)
            .unwrap_or_else(|| panic!("{name} never seen"));
        let status = job.status.clone().unwrap_or_default();
        assert_eq!(
            (job.phase(), status.reason.as_deref()),
            (JobPhase::Cancelled, Some("Cancelled")),
            "{name}: {status:?}"
        );
        assert!(status.completion_time.is_some(), "{name}: {status:?}");
    }
    // Its metric series went with it (the dispatcher refreshes the others every tick).
    let label = format!("tenant=\"{}\"", tenant.name_any());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = operator.metrics().await.unwrap();
    let left: Vec<&str> = metrics.lines().filter(|l| l.contains(&label)).collect();
    assert!(left.is_empty(), "series of the deleted tenant: {left:?}");
}

#[tokio::test]
async fn a_failing_webhook_receiver_is_tried_again_until_it_answers() {
    let (cluster, _) = platform().await;
    let tenant = create_ready_tenant(cluster, json!({})).await.unwrap();
    let ns = tenant.namespace_name();
    // Fails the first two deliveries of each message, then accepts; counts every delivery.
    let attempts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let attempts = attempts.clone();
            move |headers: axum::http::HeaderMap| {
                let attempts = attempts.clone();
                async move {
                    let id = headers["webhook-id"].to_str().unwrap().to_string();
                    let mut attempts = attempts.lock().unwrap();
                    attempts.push(id.clone());
                    if attempts.iter().filter(|seen| **seen == id).count() <= 2 {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    // A receiver that never answers well.
    let broken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken_url = format!("http://{}/hook", broken.local_addr().unwrap());
    let broken_router =
        axum::Router::new().fallback(|| async { axum::http::StatusCode::INTERNAL_SERVER_ERROR });
    tokio::spawn(async move { axum::serve(broken, broken_router).await });

    let job = create_job(
        cluster,
        &ns,
        "ola@example.com",
        json!({ "webhook": { "url": url, "events": ["completed"] } }),
    )
    .await
    .unwrap();
    let abandoned = create_job(
        cluster,
        &ns,
        "ola@example.com",
        json!({ "webhook": { "url": broken_url, "events": ["completed"] } }),
    )
    .await
    .unwrap();
    let id = format!("{}-generation.completed", job.uid().unwrap());
    wait_for("the third delivery", TIMEOUT, || async {
        let count = attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == id)
            .count();
        Ok((count >= 3).then_some(()))
    })
    .await
    .unwrap();
    // Answered on the third try: no fourth (it would come 4 s after the third).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let count = attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|s| **s == id)
        .count();
    assert_eq!(count, 3, "{:?}", attempts.lock().unwrap());

    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(cluster.client().await, &ns);
    let failed = wait_for("a WebhookFailed event", TIMEOUT, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("WebhookFailed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                    == Some(abandoned.name_any().as_str())
        }))
    })
    .await
    .unwrap();
    assert!(
        failed.note.unwrap_or_default().contains("5 attempts"),
        "the event names the attempts"
    );
    assert!(
        !events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("WebhookFailed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                    == Some(job.name_any().as_str())),
        "the answered webhook is not reported failed"
    );
    delete_tenant(cluster, &tenant).await;
}
