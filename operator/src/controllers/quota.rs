//! Writes to the quota counters and demand in `Tenant.status`. Every write is a read-modify-write
//! carrying the resourceVersion it read, retried on conflict: concurrent writers (this operator,
//! the API's quota reset) can interleave but never lose or double an update, so 20 concurrent
//! admissions against a quota of 5 admit exactly 5.
//!
//! Within one process, writes to the same tenant take turns: fifty jobs of one tenant admitted
//! at once would otherwise each read the same resourceVersion, and all but one would conflict
//! and retry, fifty times over (quadratic in the burst). Conflicts with other processes remain,
//! and are retried after a short, spread-out pause.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use atelier_crds::{GenerationJobSpec, Tenant, TenantSpec, TenantStatus};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};

use crate::core::admission::{self, Decision, TenantView};
use crate::core::backoff::retry_delay;

const MAX_CONFLICT_RETRIES: u32 = 50;
const FIRST_CONFLICT_PAUSE: Duration = Duration::from_millis(5);
const MAX_CONFLICT_PAUSE: Duration = Duration::from_millis(500);

/// One turn-taking lock per tenant name (a few bytes each; tenants are few).
static WRITERS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Mutex::default);

fn writer_lock(tenant_name: &str) -> Arc<tokio::sync::Mutex<()>> {
    let mut writers = WRITERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    writers.entry(tenant_name.to_string()).or_default().clone()
}

/// Decides admission against the freshest Tenant and, when admitted, reserves the job's images
/// for `day`, keyed by the job's uid inside the same compare-and-swap: a retried admission (the
/// Queued write failed, the operator restarted) finds its reservation and admits again without
/// counting twice. `is_waiting` tells which reserved jobs still wait for a GPU (the job index),
/// so `maxQueuedPerUser` counts jobs admitted concurrently too. Returns the decision and the day
/// counted, or `None` when the tenant does not exist.
pub async fn admit(
    tenants: &Api<Tenant>,
    tenant_name: &str,
    job_uid: &str,
    job: &GenerationJobSpec,
    is_waiting: impl Fn(&str) -> bool,
    now: Timestamp,
) -> kube::Result<Option<(Decision, String)>> {
    let mut outcome = None;
    let found = update(tenants, tenant_name, |spec, status| {
        let day = admission::quota_day(now, &spec.quota.time_zone);
        let rolled_over = roll_over(status, &day);
        if admission::is_reserved(status, job_uid) {
            outcome = Some((Decision::Admit, day));
            return rolled_over;
        }
        let queued_by_user =
            admission::waiting_jobs(status, &job.user, |uid| uid != job_uid && is_waiting(uid));
        let decision = admission::decide(
            job,
            &TenantView {
                limits: &spec.limits,
                quota: &spec.quota,
                usage: &status.usage,
                queued_by_user,
            },
        );
        let admitted = decision == Decision::Admit;
        if admitted {
            admission::reserve(status, job_uid, &job.user, job.num_images);
        }
        outcome = Some((decision, day));
        admitted || rolled_over
    })
    .await?;
    Ok(outcome.filter(|_| found))
}

/// Gives back what job `job_uid` reserved, once (no-op when it holds no reservation: released
/// already, reset, or reserved on a day that has rolled over, which cleared the reservations).
pub async fn release(tenants: &Api<Tenant>, tenant_name: &str, job_uid: &str) -> kube::Result<()> {
    update(tenants, tenant_name, |_, status| {
        admission::release(status, job_uid) > 0
    })
    .await
    .map(drop)
}

/// Resets `user`'s quota for today. Returns the images that were reserved, or `None` when the
/// tenant does not exist.
pub async fn reset(
    tenants: &Api<Tenant>,
    tenant_name: &str,
    user: &str,
) -> kube::Result<Option<u32>> {
    let mut removed = 0;
    let found = update(tenants, tenant_name, |_, status| {
        removed = admission::reset(status, user);
        removed > 0
    })
    .await?;
    Ok(found.then_some(removed))
}

/// Publishes the tenant's demand (queued and running jobs) for the tenant controller's scaling.
pub async fn publish_demand(
    tenants: &Api<Tenant>,
    tenant_name: &str,
    queued: u32,
    running: u32,
    now: Timestamp,
) -> kube::Result<()> {
    update(tenants, tenant_name, |_, status| {
        if status.queued == queued && status.running == running {
            return false;
        }
        let was_active = status.queued + status.running > 0;
        status.queued = queued;
        status.running = running;
        // Idle time counts from the moment the last job left; also stamp the start of activity.
        if was_active || queued + running > 0 {
            status.last_active_time = Some(Time(now));
        }
        true
    })
    .await
    .map(drop)
}

/// Applies `change` to the latest status (seeing the spec it was decided against) and writes it
/// if `change` says something changed; on a conflicting write, reads again and retries.
/// Returns whether the tenant exists.
pub async fn update(
    tenants: &Api<Tenant>,
    tenant_name: &str,
    mut change: impl FnMut(&TenantSpec, &mut TenantStatus) -> bool,
) -> kube::Result<bool> {
    let turn = writer_lock(tenant_name);
    let _turn = turn.lock().await;
    for attempt in 1..=MAX_CONFLICT_RETRIES {
        let Some(mut tenant) = tenants.get_opt(tenant_name).await? else {
            return Ok(false);
        };
        let mut status = tenant.status.clone().unwrap_or_default();
        if !change(&tenant.spec, &mut status) {
            return Ok(true);
        }
        tenant.status = Some(status);
        match tenants
            .replace_status(tenant_name, &PostParams::default(), &tenant)
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let pause = retry_delay(
                    tenant_name,
                    attempt,
                    FIRST_CONFLICT_PAUSE,
                    MAX_CONFLICT_PAUSE,
                );
                tokio::time::sleep(pause).await;
            }
            Err(error) => return Err(error),
        }
    }
    Err(conflict_exhausted())
}

/// Starts a fresh count when the stored day is not today; returns whether it did.
fn roll_over(status: &mut TenantStatus, day: &str) -> bool {
    if status.usage_day.as_deref() == Some(day) {
        return false;
    }
    status.usage_day = Some(day.to_string());
    status.usage.clear();
    status.reservations.clear();
    true
}

fn conflict_exhausted() -> kube::Error {
    kube::Error::Api(Box::new(
        kube::core::Status::failure(
            "too many conflicting writes to the tenant status",
            "Conflict",
        )
        .with_code(409),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;
    use crate::core::admission::reason;

    /// The one Tenant a fake API server stores, and what it answered.
    struct Stored {
        tenant: Value,
        /// Status writes answered 409 before this one is accepted (a concurrent writer).
        conflicts_left: u32,
        /// Reservations a concurrent writer adds when it wins a conflict.
        concurrent_reservation: Option<Value>,
        answered_conflict: u32,
    }

    /// A `Client` over an in-memory API server that compare-and-swaps by resourceVersion like the
    /// real one, and can lose a write to a concurrent writer.
    fn fake_api(stored: Arc<Mutex<Stored>>) -> Api<Tenant> {
        let service = tower::service_fn(move |request: Request<Body>| {
            let stored = stored.clone();
            async move {
                let method = request.method().clone();
                let body = request.into_body().collect_bytes().await.unwrap();
                let mut stored = stored.lock().unwrap();
                let answer = |code: u16, body: Value| {
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap()
                };
                if method == http::Method::GET {
                    return Ok::<_, kube::Error>(answer(200, stored.tenant.clone()));
                }
                let written: Value = serde_json::from_slice(&body).unwrap();
                let version = |t: &Value| {
                    t["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                };
                let current = version(&stored.tenant);
                let conflict = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified" });
                if stored.conflicts_left > 0 {
                    stored.conflicts_left -= 1;
                    stored.answered_conflict += 1;
                    if let Some(reservation) = stored.concurrent_reservation.take() {
                        let status = &mut stored.tenant["status"];
                        status["usageDay"] = json!("2026-12-01");
                        status["usage"] = json!([{ "user": reservation["user"], "images": reservation["images"] }]);
                        status["reservations"] = json!([reservation]);
                    }
                    stored.tenant["metadata"]["resourceVersion"] = json!((current + 1).to_string());
                    return Ok(answer(409, conflict));
                }
                if version(&written) != current {
                    stored.answered_conflict += 1;
                    return Ok(answer(409, conflict));
                }
                stored.tenant = written;
                stored.tenant["metadata"]["resourceVersion"] = json!((current + 1).to_string());
                Ok(answer(200, stored.tenant.clone()))
            }
        });
        Api::all(kube::Client::new(service, "default"))
    }

    fn stored(per_user: u32, max_queued: u32) -> Arc<Mutex<Stored>> {
        let tenant = json!({
            "apiVersion": "atelier.dev/v1alpha1", "kind": "Tenant",
            "metadata": { "name": "acme", "resourceVersion": "1", "uid": "t" },
            "spec": {
                "members": [{ "group": "acme", "role": "user" }],
                "gpus": { "max": 1 },
                "inference": { "model": { "volumeName": "flux" } },
                "quota": { "imagesPerUserPerDay": per_user, "maxQueuedPerUser": max_queued },
            },
        });
        Arc::new(Mutex::new(Stored {
            tenant,
            conflicts_left: 0,
            concurrent_reservation: None,
            answered_conflict: 0,
        }))
    }

    fn job(user: &str, images: u32) -> GenerationJobSpec {
        serde_json::from_value(json!({ "prompt": "a cat", "user": user, "numImages": images }))
            .unwrap()
    }

    fn status_of(stored: &Arc<Mutex<Stored>>) -> TenantStatus {
        serde_json::from_value(stored.lock().unwrap().tenant["status"].clone()).unwrap()
    }

    const NOON: &str = "2026-12-01T12:00:00Z";

    #[tokio::test]
    async fn a_lost_write_is_read_again_and_counts_the_winners_reservation() {
        let stored = stored(3, 10);
        {
            let mut s = stored.lock().unwrap();
            s.conflicts_left = 1;
            s.concurrent_reservation = Some(json!({ "job": "bobs", "user": "ann", "images": 2 }));
        }
        let api = fake_api(stored.clone());
        let (decision, day) = admit(
            &api,
            "acme",
            "anns",
            &job("ann", 1),
            |_| true,
            NOON.parse().unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!((decision, day.as_str()), (Decision::Admit, "2026-12-01"));
        assert_eq!(stored.lock().unwrap().answered_conflict, 1);
        let status = status_of(&stored);
        assert_eq!(
            admission::images_of(&status.usage, "ann"),
            3,
            "both reservations count"
        );
        assert_eq!(status.reservations.len(), 2);

        // The quota of 3 is now full: a third job of ann's is refused.
        let (decision, _) = admit(
            &api,
            "acme",
            "third",
            &job("ann", 1),
            |_| false,
            NOON.parse().unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            matches!(
                decision,
                Decision::Reject {
                    reason: reason::QUOTA_EXCEEDED,
                    ..
                }
            ),
            "{decision:?}"
        );
    }

    #[tokio::test]
    async fn a_retried_admission_reserves_once_and_a_release_gives_back_once() {
        let stored = stored(1, 10);
        let api = fake_api(stored.clone());
        let now = NOON.parse().unwrap();
        for attempt in 0..2 {
            let (decision, _) = admit(&api, "acme", "job-1", &job("ann", 1), |_| true, now)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(decision, Decision::Admit, "attempt {attempt}");
        }
        assert_eq!(admission::images_of(&status_of(&stored).usage, "ann"), 1);
        for _ in 0..2 {
            release(&api, "acme", "job-1").await.unwrap();
        }
        let status = status_of(&stored);
        assert!(
            status.usage.is_empty() && status.reservations.is_empty(),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn jobs_admitted_one_after_another_count_towards_max_queued() {
        let stored = stored(10, 1);
        let api = fake_api(stored.clone());
        let now = NOON.parse().unwrap();
        // The job index has not yet seen the first job Queued: it is Pending, still waiting.
        let waiting = |uid: &str| uid == "first";
        let first = admit(&api, "acme", "first", &job("ann", 1), waiting, now)
            .await
            .unwrap();
        assert_eq!(first.unwrap().0, Decision::Admit);
        let second = admit(&api, "acme", "second", &job("ann", 1), waiting, now)
            .await
            .unwrap();
        assert!(matches!(
            second.unwrap().0,
            Decision::Reject {
                reason: reason::TOO_MANY_QUEUED,
                ..
            }
        ));
    }
}
