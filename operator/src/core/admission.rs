//! Whether a new job may enter the queue, and the quota bookkeeping that goes with it.
//!
//! Reservations are counted in `Tenant.status.usage` for the current day and written with
//! optimistic concurrency, so concurrent admissions can never overshoot a quota.

use atelier_crds::{GenerationJobSpec, JobLimits, QuotaSpec, Reservation, TenantStatus, UserUsage};
use jiff::{Timestamp, tz::TimeZone};

/// Reasons shown in `status.reason`, Events and metrics.
pub mod reason {
    pub const LIMIT_EXCEEDED: &str = "LimitExceeded";
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    pub const TENANT_QUOTA_EXCEEDED: &str = "TenantQuotaExceeded";
    pub const TOO_MANY_QUEUED: &str = "TooManyQueued";
    pub const TENANT_NOT_FOUND: &str = "TenantNotFound";
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admit,
    Reject {
        reason: &'static str,
        message: String,
    },
}

/// What admission needs to know about the tenant at the moment of the decision.
pub struct TenantView<'a> {
    pub limits: &'a JobLimits,
    pub quota: &'a QuotaSpec,
    /// Reservations of `today` (already reset if the stored day is older).
    pub usage: &'a [UserUsage],
    /// Jobs of this user admitted and still waiting for a GPU.
    pub queued_by_user: u32,
}

pub fn decide(job: &GenerationJobSpec, tenant: &TenantView<'_>) -> Decision {
    if let Some(message) = limit_violation(job, tenant.limits) {
        return Decision::Reject {
            reason: reason::LIMIT_EXCEEDED,
            message,
        };
    }
    if tenant.queued_by_user >= tenant.quota.max_queued_per_user {
        return Decision::Reject {
            reason: reason::TOO_MANY_QUEUED,
            message: format!(
                "{} already has {} jobs waiting, the most the tenant allows (quota.maxQueuedPerUser)",
                job.user, tenant.queued_by_user
            ),
        };
    }
    let used = images_of(tenant.usage, &job.user);
    let per_user = tenant.quota.images_per_user_per_day;
    if used + job.num_images > per_user {
        return Decision::Reject {
            reason: reason::QUOTA_EXCEEDED,
            message: format!(
                "daily quota of {per_user} images for {} reached ({used} used, {} asked)",
                job.user, job.num_images
            ),
        };
    }
    if let Some(per_tenant) = tenant.quota.images_per_tenant_per_day {
        let total: u32 = tenant.usage.iter().map(|u| u.images).sum();
        if total + job.num_images > per_tenant {
            return Decision::Reject {
                reason: reason::TENANT_QUOTA_EXCEEDED,
                message: format!(
                    "the tenant's daily quota of {per_tenant} images is reached ({total} used)"
                ),
            };
        }
    }
    Decision::Admit
}

/// The first tenant limit the job exceeds, named so the user knows what to change.
fn limit_violation(job: &GenerationJobSpec, limits: &JobLimits) -> Option<String> {
    let checks = [
        ("steps", job.steps, limits.max_steps, "limits.maxSteps"),
        ("width", job.width, limits.max_width, "limits.maxWidth"),
        ("height", job.height, limits.max_height, "limits.maxHeight"),
        (
            "numImages",
            job.num_images,
            limits.max_images,
            "limits.maxImages",
        ),
    ];
    let numbers = checks
        .into_iter()
        .find(|(_, value, max, _)| value > max)
        .map(|(field, value, max, limit)| {
            format!("{field} {value} exceeds the tenant limit of {max} ({limit})")
        });
    // A job may end sooner than the tenant's jobs do, never later: a GPU held longer is taken
    // from everyone else.
    let longest: std::time::Duration = limits.default_timeout.into();
    let timeout = job.timeout.map(std::time::Duration::from);
    numbers.or_else(|| {
        timeout.filter(|t| *t > longest).map(|t| {
            format!(
                "timeout {}s exceeds the tenant limit of {}s (limits.defaultTimeout)",
                t.as_secs(),
                longest.as_secs()
            )
        })
    })
}

/// Images `user` has reserved in `usage`.
pub fn images_of(usage: &[UserUsage], user: &str) -> u32 {
    usage
        .iter()
        .find(|u| u.user == user)
        .map_or(0, |u| u.images)
}

/// Whether the job with uid `job` holds a reservation: its admission already counted it.
pub fn is_reserved(status: &TenantStatus, job: &str) -> bool {
    status.reservations.iter().any(|r| r.job == job)
}

/// Counts `images` of job `job` for `user`, once per job: returns false (and counts nothing)
/// when the job already holds its reservation, as after a retried admission.
pub fn reserve(status: &mut TenantStatus, job: &str, user: &str, images: u32) -> bool {
    if is_reserved(status, job) {
        return false;
    }
    status.reservations.push(Reservation {
        job: job.to_string(),
        user: user.to_string(),
        images,
    });
    match status.usage.iter_mut().find(|u| u.user == user) {
        Some(entry) => entry.images += images,
        None => {
            status.usage.push(UserUsage {
                user: user.to_string(),
                images,
            });
            status.usage.sort_by(|a, b| a.user.cmp(&b.user));
        }
    }
    true
}

/// Gives back what job `job` reserved, once; returns the images given back (0 when the job holds
/// no reservation: released already, reset, or reserved on another day).
pub fn release(status: &mut TenantStatus, job: &str) -> u32 {
    let Some(at) = status.reservations.iter().position(|r| r.job == job) else {
        return 0;
    };
    let reservation = status.reservations.remove(at);
    if let Some(entry) = status.usage.iter_mut().find(|u| u.user == reservation.user) {
        entry.images = entry.images.saturating_sub(reservation.images);
    }
    status.usage.retain(|u| u.images > 0);
    reservation.images
}

/// Forgets everything `user` reserved today (an admin's quota reset); returns how many images that
/// was. The user's jobs keep running but no longer count.
pub fn reset(status: &mut TenantStatus, user: &str) -> u32 {
    let removed = images_of(&status.usage, user);
    status.usage.retain(|u| u.user != user);
    status.reservations.retain(|r| r.user != user);
    removed
}

/// How many of `user`'s jobs with a reservation are still waiting for a GPU, as `is_waiting`
/// (the job index) tells. Counted from the reservations in the status that admission
/// compare-and-swaps, so jobs admitted concurrently see each other.
pub fn waiting_jobs(status: &TenantStatus, user: &str, is_waiting: impl Fn(&str) -> bool) -> u32 {
    status
        .reservations
        .iter()
        .filter(|r| r.user == user && is_waiting(&r.job))
        .count() as u32
}

/// The quota day (`YYYY-MM-DD`) of `now` in the tenant's time zone; UTC when the zone is unknown,
/// which the tenant controller reports as a Degraded condition.
pub fn quota_day(now: Timestamp, time_zone: &str) -> String {
    let zone = TimeZone::get(time_zone).unwrap_or(TimeZone::UTC);
    now.to_zoned(zone).date().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(user: &str, images: u32) -> GenerationJobSpec {
        serde_json::from_value(serde_json::json!({
            "prompt": "a cat", "user": user, "numImages": images
        }))
        .unwrap()
    }

    fn view<'a>(
        limits: &'a JobLimits,
        quota: &'a QuotaSpec,
        usage: &'a [UserUsage],
    ) -> TenantView<'a> {
        TenantView {
            limits,
            quota,
            usage,
            queued_by_user: 0,
        }
    }

    #[test]
    fn admits_until_the_user_quota_then_rejects_with_the_numbers() {
        let limits = JobLimits::default();
        let quota = QuotaSpec {
            images_per_user_per_day: 5,
            ..QuotaSpec::default()
        };
        let mut status = TenantStatus::default();
        let mut admitted = 0;
        for n in 0..20 {
            if decide(&job("ann", 1), &view(&limits, &quota, &status.usage)) == Decision::Admit {
                assert!(reserve(&mut status, &format!("uid-{n}"), "ann", 1));
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
        let usage = status.usage;
        match decide(&job("ann", 1), &view(&limits, &quota, &usage)) {
            Decision::Reject { reason, message } => {
                assert_eq!(reason, reason::QUOTA_EXCEEDED);
                assert!(message.contains("5 images"), "{message}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        // Another user is not affected.
        assert_eq!(
            decide(&job("bob", 4), &view(&limits, &quota, &usage)),
            Decision::Admit
        );
    }

    #[test]
    fn a_batch_counts_every_image() {
        let limits = JobLimits::default();
        let quota = QuotaSpec {
            images_per_user_per_day: 5,
            ..QuotaSpec::default()
        };
        let usage = vec![UserUsage {
            user: "ann".into(),
            images: 2,
        }];
        assert!(matches!(
            decide(&job("ann", 4), &view(&limits, &quota, &usage)),
            Decision::Reject { .. }
        ));
        assert_eq!(
            decide(&job("ann", 3), &view(&limits, &quota, &usage)),
            Decision::Admit
        );
    }

    #[test]
    fn tenant_quota_counts_all_users() {
        let limits = JobLimits::default();
        let quota = QuotaSpec {
            images_per_tenant_per_day: Some(3),
            ..QuotaSpec::default()
        };
        let usage = vec![
            UserUsage {
                user: "ann".into(),
                images: 2,
            },
            UserUsage {
                user: "bob".into(),
                images: 1,
            },
        ];
        let decision = decide(&job("cyd", 1), &view(&limits, &quota, &usage));
        assert!(matches!(
            decision,
            Decision::Reject {
                reason: reason::TENANT_QUOTA_EXCEEDED,
                ..
            }
        ));
    }

    #[test]
    fn limits_name_the_field_and_the_limit() {
        let limits = JobLimits {
            max_steps: 10,
            ..JobLimits::default()
        };
        let quota = QuotaSpec::default();
        let mut spec = job("ann", 1);
        spec.steps = 30;
        match decide(&spec, &view(&limits, &quota, &[])) {
            Decision::Reject { reason, message } => {
                assert_eq!(reason, reason::LIMIT_EXCEEDED);
                assert_eq!(
                    message,
                    "steps 30 exceeds the tenant limit of 10 (limits.maxSteps)"
                );
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_timeout_beyond_the_tenants_is_refused() {
        let limits = JobLimits::default();
        let quota = QuotaSpec::default();
        let longest: std::time::Duration = limits.default_timeout.into();
        let mut spec = job("ann", 1);
        spec.timeout = Some((longest + std::time::Duration::from_secs(1)).into());
        match decide(&spec, &view(&limits, &quota, &[])) {
            Decision::Reject { reason, message } => {
                assert_eq!(reason, reason::LIMIT_EXCEEDED);
                assert!(message.contains("(limits.defaultTimeout)"), "{message}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        spec.timeout = Some(longest.into());
        assert_eq!(decide(&spec, &view(&limits, &quota, &[])), Decision::Admit);
    }

    #[test]
    fn too_many_queued_is_refused() {
        let limits = JobLimits::default();
        let quota = QuotaSpec {
            max_queued_per_user: 2,
            ..QuotaSpec::default()
        };
        let tenant = TenantView {
            limits: &limits,
            quota: &quota,
            usage: &[],
            queued_by_user: 2,
        };
        assert!(matches!(
            decide(&job("ann", 1), &tenant),
            Decision::Reject {
                reason: reason::TOO_MANY_QUEUED,
                ..
            }
        ));
    }

    #[test]
    fn a_job_reserves_once_and_gives_back_once() {
        let mut status = TenantStatus::default();
        assert!(reserve(&mut status, "uid-1", "ann", 2));
        // A retried admission of the same job (its Queued write failed) reserves nothing more.
        assert!(!reserve(&mut status, "uid-1", "ann", 2));
        assert!(reserve(&mut status, "uid-2", "ann", 1));
        assert_eq!(images_of(&status.usage, "ann"), 3);
        assert_eq!(release(&mut status, "uid-1"), 2);
        assert_eq!(release(&mut status, "uid-1"), 0, "released twice");
        assert_eq!(images_of(&status.usage, "ann"), 1);
        assert_eq!(release(&mut status, "uid-2"), 1);
        assert!(status.usage.is_empty() && status.reservations.is_empty());
        assert_eq!(release(&mut status, "unknown"), 0);
    }

    #[test]
    fn waiting_jobs_count_only_that_users_waiting_reservations() {
        let mut status = TenantStatus::default();
        reserve(&mut status, "queued", "ann", 1);
        reserve(&mut status, "running", "ann", 1);
        reserve(&mut status, "bobs", "bob", 1);
        let waiting = |uid: &str| uid != "running";
        assert_eq!(waiting_jobs(&status, "ann", waiting), 1);
        assert_eq!(waiting_jobs(&status, "bob", waiting), 1);
        assert_eq!(waiting_jobs(&status, "cyd", waiting), 0);
    }

    #[test]
    fn reset_removes_only_that_user() {
        let mut status = TenantStatus::default();
        reserve(&mut status, "a", "alice", 5);
        reserve(&mut status, "b", "bob", 2);
        assert_eq!(reset(&mut status, "alice"), 5);
        assert_eq!(images_of(&status.usage, "alice"), 0);
        assert_eq!(images_of(&status.usage, "bob"), 2);
        assert_eq!(
            release(&mut status, "a"),
            0,
            "a reset job gives nothing back"
        );
        assert_eq!(reset(&mut status, "carol"), 0);
        assert_eq!(status.usage.len(), 1);
        assert_eq!(status.reservations.len(), 1);
    }

    #[test]
    fn quota_day_follows_the_time_zone() {
        let now: Timestamp = "2026-11-29T23:30:00Z".parse().unwrap();
        assert_eq!(quota_day(now, "UTC"), "2026-11-29");
        assert_eq!(quota_day(now, "Europe/Paris"), "2026-11-30");
        assert_eq!(quota_day(now, "America/New_York"), "2026-11-29");
        assert_eq!(quota_day(now, "Not/AZone"), "2026-11-29");
    }
}
