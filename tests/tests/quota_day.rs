//! The daily quota rolls over at the day boundary. The operator here reads its clock from a file,
//! so this binary has a cluster and an operator of its own: moving the clock would disturb the
//! other job tests.

mod common;

use std::time::Duration;

use atelier_crds::JobPhase;
use atelier_tests::TestCluster;
use common::{Operator, create_job, create_tenant, wait_job};
use kube::ResourceExt;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn the_next_day_admits_again() {
    let cluster = TestCluster::shared().await;
    let clock_file = cluster.dir().join("operator-clock");
    let _operator = Operator::start(
        cluster,
        &[&format!("--test-clock-file={}", clock_file.display())],
    )
    .unwrap();
    // No schedulable inference pod: jobs stay queued, only admission is under test.
    let tenant = create_tenant(
        cluster,
        json!({ "quota": { "imagesPerUserPerDay": 1 }, "gpus": { "resourceName": "example.com/no-such-gpu" } }),
    )
    .await
    .unwrap();
    let ns = tenant.namespace_name();
    let admitted_phase = |user: &'static str| {
        let ns = ns.clone();
        async move {
            let job = create_job(cluster, &ns, user, json!({})).await.unwrap();
            wait_job(cluster, &ns, &job.name_any(), TIMEOUT, |j| {
                j.phase() != JobPhase::Pending
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(
        admitted_phase("ida@example.com").await.phase(),
        JobPhase::Queued
    );
    let refused = admitted_phase("ida@example.com").await;
    assert_eq!(refused.phase(), JobPhase::Rejected);
    assert_eq!(
        refused.status.unwrap().reason.as_deref(),
        Some("QuotaExceeded")
    );

    let tomorrow = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    std::fs::write(&clock_file, tomorrow.to_string()).unwrap();
    let next_day = admitted_phase("ida@example.com").await;
    assert_eq!(next_day.phase(), JobPhase::Queued);
    assert_eq!(
        next_day.status.unwrap().quota_day.as_deref(),
        Some(
            tomorrow
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date()
                .to_string()
                .as_str()
        )
    );
}
