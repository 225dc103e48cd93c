//! The daily quota rolls over at the day boundary. The operator here reads its clock from a file,
//! so this binary has a cluster and an operator of its own: moving the clock would disturb the
//! other job tests.

mod common;

use std::path::Path;
use std::time::Duration;

use atelier_crds::JobPhase;
use atelier_tests::TestCluster;
use common::{Operator, create_job, create_tenant, wait_job};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use kube::ResourceExt;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Kiritimati is UTC+14: at noon UTC it is already the next day there, so a quota day taken in
/// UTC instead of the tenant's zone is a different date.
const ZONE: &str = "Pacific/Kiritimati";

/// Sets the operator's clock; written whole (temporary file, then rename), so the operator never
/// reads half a time.
fn set_clock(path: &Path, now: Timestamp) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, now.to_string()).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// The quota day of `now` in the tenant's zone.
fn day_in_zone(now: Timestamp) -> String {
    now.to_zoned(TimeZone::get(ZONE).unwrap())
        .date()
        .to_string()
}

#[tokio::test]
async fn the_next_day_admits_again() {
    let cluster = TestCluster::shared().await;
    let clock_file = cluster.dir().join("operator-clock");
    let today: Timestamp = "2026-03-10T12:00:00Z".parse().unwrap();
    set_clock(&clock_file, today);
    assert_ne!(
        day_in_zone(today),
        today.to_zoned(TimeZone::UTC).date().to_string(),
        "the test needs a time whose day differs in UTC"
    );
    let _operator = Operator::start(
        cluster,
        &[&format!("--test-clock-file={}", clock_file.display())],
    )
    .unwrap();
    // No schedulable inference pod: jobs stay queued, only admission is under test.
    let tenant = create_tenant(
        cluster,
        json!({ "quota": { "imagesPerUserPerDay": 1, "timeZone": ZONE }, "gpus": { "resourceName": "example.com/no-such-gpu" } }),
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
    let first = admitted_phase("ida@example.com").await;
    assert_eq!(first.phase(), JobPhase::Queued);
    assert_eq!(first.status.unwrap().quota_day, Some(day_in_zone(today)));
    let refused = admitted_phase("ida@example.com").await;
    assert_eq!(refused.phase(), JobPhase::Rejected);
    assert_eq!(
        refused.status.unwrap().reason.as_deref(),
        Some("QuotaExceeded")
    );

    let tomorrow = today + jiff::SignedDuration::from_hours(24);
    set_clock(&clock_file, tomorrow);
    let next_day = admitted_phase("ida@example.com").await;
    assert_eq!(next_day.phase(), JobPhase::Queued);
    assert_eq!(
        next_day.status.unwrap().quota_day,
        Some(day_in_zone(tomorrow))
    );
}
