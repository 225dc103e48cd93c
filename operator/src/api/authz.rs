//! Who may do what, as pure functions of the caller's identity and the Tenant: roles from
//! `spec.members`, source networks from `spec.allowedSourceCidrs`, whose jobs and images a
//! caller may see, and the quota left today. No I/O, so every rule is unit-tested.

use std::net::IpAddr;

use atelier_crds::{Role, Tenant, TenantSpec};
use ipnet::IpNet;

use crate::api::auth::client::unmapped;

/// A caller, as established from a validated token or a login session. Never from a header
/// or a form field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Value of the user id claim (`--user-claim`): the name jobs and images are filed under.
    pub user: String,
    /// Value of the groups claim (`--groups-claim`); empty when the claim is missing.
    pub groups: Vec<String>,
}

/// Whether the caller is in the platform-admin group, which is admin of every tenant.
pub fn is_platform_admin(identity: &Identity, platform_admin_group: Option<&str>) -> bool {
    platform_admin_group.is_some_and(|group| identity.groups.iter().any(|g| g == group))
}

/// The caller's role in a tenant: the highest role among the members entries that name one of
/// their groups or their user id; `None` if no entry does. Platform admins are admins everywhere.
pub fn tenant_role(
    spec: &TenantSpec,
    identity: &Identity,
    platform_admin_group: Option<&str>,
) -> Option<Role> {
    if is_platform_admin(identity, platform_admin_group) {
        return Some(Role::Admin);
    }
    spec.members
        .iter()
        .filter(|member| {
            let by_group = member
                .group
                .as_ref()
                .is_some_and(|group| identity.groups.contains(group));
            let by_user = member
                .user
                .as_ref()
                .is_some_and(|user| *user == identity.user);
            by_group || by_user
        })
        .map(|member| member.role)
        .max()
}

/// Whether `client` may use a tenant restricted to `cidrs` (an empty list allows everyone).
/// Malformed entries match nothing, so a typo closes access rather than opening it.
pub fn source_allowed(cidrs: &[String], client: Option<IpAddr>) -> bool {
    if cidrs.is_empty() {
        return true;
    }
    // An unknown address (a trusted proxy that did not say) is admitted by no restriction.
    let Some(client) = client.map(unmapped) else {
        return false;
    };
    cidrs.iter().any(|cidr| {
        cidr.parse::<IpNet>()
            .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
            .is_ok_and(|net| net.contains(&client))
    })
}

/// Whose data a request is about: the caller's own unless an admin names another user
/// (`?user=`). A plain user naming someone else is refused.
pub fn target_user<'a>(
    role: Role,
    caller: &'a str,
    requested: Option<&'a str>,
) -> Result<&'a str, &'static str> {
    match requested {
        None => Ok(caller),
        Some(user) if user == caller || role == Role::Admin => Ok(user),
        Some(_) => Err("only tenant admins may see other users' jobs and images"),
    }
}

/// Whether the caller may see (and cancel) a job of `job_user`.
pub fn may_access_job(role: Role, caller: &str, job_user: &str) -> bool {
    role == Role::Admin || caller == job_user
}

/// A user's daily quota as seen today.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaView {
    /// The day counted, `YYYY-MM-DD` in the tenant's quota time zone.
    pub day: String,
    pub limit: u32,
    pub used: u32,
    /// Images the user may still ask for today (also bounded by the tenant-wide limit).
    pub remaining: u32,
}

/// The tenant's quota day at `now` (`YYYY-MM-DD` in `spec.quota.timeZone`, UTC if unknown).
pub fn quota_day(tenant: &Tenant, now: jiff::Timestamp) -> String {
    let zoned = now
        .in_tz(&tenant.spec.quota.time_zone)
        .unwrap_or_else(|_| now.to_zoned(jiff::tz::TimeZone::UTC));
    zoned.date().to_string()
}

/// The quota of `user` today, from `spec.quota` and the controller's counters in
/// `status.usage`, which only count when `status.usageDay` is today (a stale day means nothing
/// was reserved yet today). The controller's admission stays authoritative; this is the
/// pre-check that lets the page answer at once.
pub fn quota_for(tenant: &Tenant, user: &str, now: jiff::Timestamp) -> QuotaView {
    let day = quota_day(tenant, now);
    let status = tenant
        .status
        .as_ref()
        .filter(|status| status.usage_day.as_deref() == Some(day.as_str()));
    let usage = status
        .map(|status| status.usage.as_slice())
        .unwrap_or_default();
    let used = usage
        .iter()
        .filter(|entry| entry.user == user)
        .map(|entry| entry.images)
        .sum::<u32>();
    let limit = tenant.spec.quota.images_per_user_per_day;
    let mut remaining = limit.saturating_sub(used);
    if let Some(tenant_limit) = tenant.spec.quota.images_per_tenant_per_day {
        let tenant_used = usage.iter().map(|entry| entry.images).sum::<u32>();
        remaining = remaining.min(tenant_limit.saturating_sub(tenant_used));
    }
    QuotaView {
        day,
        limit,
        used,
        remaining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_crds::{Member, TenantStatus, UserUsage};

    fn member_group(group: &str, role: Role) -> Member {
        Member {
            group: Some(group.into()),
            user: None,
            role,
        }
    }

    fn member_user(user: &str, role: Role) -> Member {
        Member {
            group: None,
            user: Some(user.into()),
            role,
        }
    }

    fn tenant(members: Vec<Member>) -> Tenant {
        let spec: TenantSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        let mut tenant = Tenant::new("team-x", TenantSpec { members, ..spec });
        tenant.spec.quota.images_per_user_per_day = 10;
        tenant
    }

    fn who(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn roles_come_from_groups_and_users_and_the_highest_wins() {
        let t = tenant(vec![
            member_group("team-x", Role::User),
            member_group("team-x-admins", Role::Admin),
            member_user("carol@example.com", Role::Admin),
        ]);
        assert_eq!(
            tenant_role(&t.spec, &who("alice@example.com", &["team-x"]), None),
            Some(Role::User)
        );
        assert_eq!(
            tenant_role(
                &t.spec,
                &who("bob@example.com", &["team-x", "team-x-admins"]),
                None
            ),
            Some(Role::Admin)
        );
        assert_eq!(
            tenant_role(&t.spec, &who("carol@example.com", &["team-x"]), None),
            Some(Role::Admin)
        );
        assert_eq!(
            tenant_role(&t.spec, &who("dave@example.com", &["team-y"]), None),
            None
        );
        assert_eq!(
            tenant_role(&t.spec, &who("erin@example.com", &[]), None),
            None
        );
    }

    #[test]
    fn a_user_entry_does_not_match_a_group_of_the_same_name() {
        let t = tenant(vec![member_user("team-x", Role::Admin)]);
        assert_eq!(
            tenant_role(&t.spec, &who("alice@example.com", &["team-x"]), None),
            None
        );
        let t = tenant(vec![member_group("alice@example.com", Role::Admin)]);
        assert_eq!(
            tenant_role(&t.spec, &who("alice@example.com", &[]), None),
            None
        );
    }

    #[test]
    fn platform_admins_are_admins_of_every_tenant() {
        let t = tenant(vec![]);
        let erin = who("erin@example.com", &["platform-admins"]);
        assert_eq!(
            tenant_role(&t.spec, &erin, Some("platform-admins")),
            Some(Role::Admin)
        );
        assert_eq!(
            tenant_role(&t.spec, &erin, None),
            None,
            "only when the flag names the group"
        );
        assert_eq!(tenant_role(&t.spec, &erin, Some("other")), None);
    }

    #[test]
    fn source_networks() {
        let v4: Option<IpAddr> = "10.1.2.3".parse().ok();
        assert!(source_allowed(&[], v4));
        assert!(source_allowed(&[], None));
        assert!(
            !source_allowed(&["0.0.0.0/0".into()], None),
            "an unknown address passes no restriction"
        );
        assert!(source_allowed(&["10.0.0.0/8".into()], v4));
        assert!(!source_allowed(&["192.168.0.0/16".into()], v4));
        assert!(source_allowed(
            &["192.168.0.0/16".into(), "10.1.2.3".into()],
            v4
        ));
        assert!(
            !source_allowed(&["not a cidr".into()], v4),
            "malformed entries match nothing"
        );
        let mapped: Option<IpAddr> = "::ffff:10.1.2.3".parse().ok();
        assert!(source_allowed(&["10.0.0.0/8".into()], mapped));
        assert!(source_allowed(
            &["2001:db8::/32".into()],
            "2001:db8::1".parse().ok()
        ));
    }

    #[test]
    fn users_see_only_their_own_data_admins_choose() {
        assert_eq!(target_user(Role::User, "alice", None), Ok("alice"));
        assert_eq!(target_user(Role::User, "alice", Some("alice")), Ok("alice"));
        assert!(target_user(Role::User, "alice", Some("bob")).is_err());
        assert_eq!(target_user(Role::Admin, "carol", Some("bob")), Ok("bob"));
        assert_eq!(target_user(Role::Admin, "carol", None), Ok("carol"));
        assert!(may_access_job(Role::User, "alice", "alice"));
        assert!(!may_access_job(Role::User, "bob", "alice"));
        assert!(may_access_job(Role::Admin, "carol", "alice"));
    }

    #[test]
    fn quota_counts_only_today_and_the_tenant_limit() {
        let mut t = tenant(vec![]);
        let now: jiff::Timestamp = "2026-11-29T23:30:00Z".parse().unwrap();
        assert_eq!(
            quota_for(&t, "alice", now),
            QuotaView {
                day: "2026-11-29".into(),
                limit: 10,
                used: 0,
                remaining: 10
            }
        );

        t.status = Some(TenantStatus {
            usage_day: Some("2026-11-29".into()),
            usage: vec![
                UserUsage {
                    user: "alice".into(),
                    images: 7,
                },
                UserUsage {
                    user: "bob".into(),
                    images: 12,
                },
            ],
            ..TenantStatus::default()
        });
        assert_eq!(quota_for(&t, "alice", now).remaining, 3);
        assert_eq!(quota_for(&t, "bob", now).remaining, 0, "never negative");
        t.spec.quota.images_per_tenant_per_day = Some(20);
        assert_eq!(
            quota_for(&t, "carol", now).remaining,
            1,
            "bounded by the tenant-wide limit"
        );

        // In Paris it is already the 30th: yesterday's counters do not count.
        t.spec.quota.time_zone = "Europe/Paris".into();
        let paris = quota_for(&t, "alice", now);
        assert_eq!(
            (paris.day.as_str(), paris.used, paris.remaining),
            ("2026-11-30", 0, 10)
        );
    }
}
