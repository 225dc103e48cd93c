//! REST handlers under `/api/v1`, and what they share: resolving the caller's access to a
//! tenant (membership, role, source network) and auditing refusals.

pub mod admin;
pub mod generations;
pub mod images;
pub mod me;
pub mod presets;

use atelier_crds::{Role, Tenant};
use kube::Api;

use super::AppState;
use super::audit::{Event, Outcome};
use super::auth::Caller;
use super::authz;
use super::error::{ApiError, ApiResult};

/// The caller's standing in one tenant, established for one request.
pub struct TenantAccess {
    pub name: String,
    pub namespace: String,
    pub tenant: Tenant,
    pub role: Role,
}

impl TenantAccess {
    /// Refuses (403, audited) unless the caller is an admin of the tenant.
    pub fn require_admin(&self, caller: &Caller, action: &str) -> ApiResult<()> {
        if self.role == Role::Admin {
            return Ok(());
        }
        Err(deny(
            caller,
            &self.name,
            action,
            "AdminRequired",
            "only tenant admins may do this",
        ))
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Resolves the caller's role in `tenant`. Unknown tenants and tenants the caller does not
/// belong to get the same 403, so that tenant names cannot be probed.
pub async fn tenant_access(
    state: &AppState,
    caller: &Caller,
    tenant: &str,
    action: &str,
) -> ApiResult<TenantAccess> {
    let found = if is_dns_label(tenant) {
        Api::<Tenant>::all(state.kube.clone())
            .get_opt(tenant)
            .await?
    } else {
        None
    };
    let admin_group = state.settings.platform_admin_group.as_deref();
    let role = found
        .as_ref()
        .and_then(|t| authz::tenant_role(&t.spec, &caller.identity, admin_group));
    let (Some(found), Some(role)) = (found, role) else {
        return Err(deny(
            caller,
            tenant,
            action,
            "NotAMember",
            &format!("you are not a member of tenant {tenant:?}"),
        ));
    };
    if !authz::source_allowed(&found.spec.allowed_source_cidrs, caller.client) {
        let message = match caller.client {
            Some(client) => {
                format!("tenant {tenant:?} does not accept requests from your network ({client})")
            }
            None => format!(
                "tenant {tenant:?} accepts requests only from some networks, and the proxy in \
                 front of the API did not say which one yours is"
            ),
        };
        return Err(deny(caller, tenant, action, "SourceNotAllowed", &message));
    }
    Ok(TenantAccess {
        name: tenant.to_string(),
        namespace: atelier_crds::tenant::namespace_for(tenant),
        tenant: found,
        role,
    })
}

/// A 403, audited.
pub fn deny(
    caller: &Caller,
    tenant: &str,
    action: &str,
    reason: &'static str,
    message: &str,
) -> ApiError {
    Event::new(action, Outcome::Denied)
        .user(caller.user())
        .tenant(tenant)
        .client(caller.client)
        .reason(reason)
        .emit();
    ApiError::forbidden(reason, message)
}

/// A 404 for someone else's job, audited like a refusal (it is one) but indistinguishable
/// from a missing job for the caller.
pub fn hidden(caller: &Caller, tenant: &str, action: &str, object: &str) -> ApiError {
    Event::new(action, Outcome::Denied)
        .user(caller.user())
        .tenant(tenant)
        .client(caller.client)
        .reason("NotOwner")
        .object(object)
        .emit();
    ApiError::NotFound(format!("no generation {object:?}"))
}

/// RFC 1123 label: what tenant and object names are.
pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Percent-encodes a query-string value.
pub fn query_value(value: &str) -> String {
    openidconnect::url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns_label("team-x"));
        assert!(is_dns_label("gen-abc12"));
        for bad in ["", "-x", "x-", "Team", "a/b", "a.b", "..", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
        assert_eq!(query_value("a b@c/d&e"), "a+b%40c%2Fd%26e");
    }
}
