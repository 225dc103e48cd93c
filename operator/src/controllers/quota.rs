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
/// for `day`. Returns the decision and the day counted, or `None` when the tenant does not exist.
pub async fn admit(
    tenants: &Api<Tenant>,
    tenant_name: &str,
    job: &GenerationJobSpec,
    queued_by_user: u32,
    now: Timestamp,
) -> kube::Result<Option<(Decision, String)>> {
    let mut outcome = None;
    let found = update(tenants, tenant_name, |spec, status| {
        let day = admission::quota_day(now, &spec.quota.time_zone);
        roll_over(status, &day);
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
            admission::reserve(&mut status.usage, &job.user, job.num_images);
        }
        outcome = Some((decision, day));
        admitted
    })
    .await?;
    Ok(outcome.filter(|_| found))
}

/// Gives back `images` of `user` reserved on `day` (no-op once the day has rolled over).
pub async fn release(
    tenants: &Api<Tenant>,
    tenant_name: &str,
    user: &str,
    images: u32,
    day: &str,
) -> kube::Result<()> {
    update(tenants, tenant_name, |_, status| {
        if status.usage_day.as_deref() != Some(day) {
            return false;
        }
        let before = status.usage.clone();
        admission::release(&mut status.usage, user, images);
        status.usage != before
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
        removed = admission::reset(&mut status.usage, user);
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

/// Starts a fresh count when the stored day is not today.
fn roll_over(status: &mut TenantStatus, day: &str) {
    if status.usage_day.as_deref() != Some(day) {
        status.usage_day = Some(day.to_string());
        status.usage.clear();
    }
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
