//! Whether a new job may enter the queue, and the quota bookkeeping that goes with it.
//!
//! Reservations are counted in `Tenant.status.usage` for the current day and written with
//! optimistic concurrency, so concurrent admissions can never overshoot a quota.

use atelier_crds::{GenerationJobSpec, JobLimits, QuotaSpec, UserUsage};
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
    /// Jobs of this user currently waiting (`Pending` admitted or `Queued`).
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
    checks
        .into_iter()
        .find(|(_, value, max, _)| value > max)
        .map(|(field, value, max, limit)| {
            format!("{field} {value} exceeds the tenant limit of {max} ({limit})")
        })
}

/// Images `user` has reserved in `usage`.
pub fn images_of(usage: &[UserUsage], user: &str) -> u32 {
    usage
        .iter()
        .find(|u| u.user == user)
        .map_or(0, |u| u.images)
}

/// Adds `images` to `user`'s reservations.
pub fn reserve(usage: &mut Vec<UserUsage>, user: &str, images: u32) {
    match usage.iter_mut().find(|u| u.user == user) {
        Some(entry) => entry.images += images,
        None => {
            usage.push(UserUsage {
                user: user.to_string(),
                images,
            });
            usage.sort_by(|a, b| a.user.cmp(&b.user));
        }
    }
}

/// Gives back `images` of `user`'s reservations (never below zero), dropping empty entries.
pub fn release(usage: &mut Vec<UserUsage>, user: &str, images: u32) {
    if let Some(entry) = usage.iter_mut().find(|u| u.user == user) {
        entry.images = entry.images.saturating_sub(images);
    }
    usage.retain(|u| u.images > 0);
}

/// Forgets everything `user` reserved today (an admin's quota reset); returns how many images that
/// was.
pub fn reset(usage: &mut Vec<UserUsage>, user: &str) -> u32 {
    let removed = images_of(usage, user);
    usage.retain(|u| u.user != user);
    removed
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
        let mut usage = Vec::new();
        let mut admitted = 0;
        for _ in 0..20 {
            if decide(&job("ann", 1), &view(&limits, &quota, &usage)) == Decision::Admit {
                reserve(&mut usage, "ann", 1);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
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
    fn release_never_goes_negative_and_drops_empty_entries() {
        let mut usage = vec![UserUsage {
            user: "ann".into(),
            images: 1,
        }];
        release(&mut usage, "ann", 3);
        assert!(usage.is_empty());
        release(&mut usage, "nobody", 1);
        assert!(usage.is_empty());
    }

    #[test]
    fn reset_removes_only_that_user() {
        let mut usage = Vec::new();
        reserve(&mut usage, "alice", 5);
        reserve(&mut usage, "bob", 2);
        assert_eq!(reset(&mut usage, "alice"), 5);
        assert_eq!(images_of(&usage, "alice"), 0);
        assert_eq!(images_of(&usage, "bob"), 2);
        assert_eq!(reset(&mut usage, "carol"), 0);
        assert_eq!(usage.len(), 1);
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
