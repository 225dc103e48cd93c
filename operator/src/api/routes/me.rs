//! `GET /api/v1/me`: who the caller is, their tenants with their role there, and what is left
//! of their quota today.

use std::sync::Arc;

use atelier_crds::Role;
use axum::Json;
use axum::extract::State;
use kube::ResourceExt;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::AppState;
use crate::api::auth::Caller;
use crate::api::authz::{self, QuotaView};
use crate::api::error::{ApiResult, ErrorBody};

#[derive(Serialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct TenantMembership {
    pub name: String,
    pub display_name: Option<String>,
    /// `user` or `admin`.
    #[schema(value_type = String)]
    pub role: Role,
    /// Whether the caller's address is among the tenant's allowed source networks.
    pub source_allowed: bool,
    pub quota: QuotaView,
    /// Bounds of generation parameters in this tenant.
    pub limits: LimitsView,
}

#[derive(Serialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct LimitsView {
    pub max_steps: u32,
    pub max_width: u32,
    pub max_height: u32,
    pub max_images: u32,
}

#[derive(Serialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    pub user: String,
    pub groups: Vec<String>,
    pub platform_admin: bool,
    pub tenants: Vec<TenantMembership>,
}

/// Who am I
#[utoipa::path(
    get, path = "/api/v1/me", tag = "me",
    responses(
        (status = 200, description = "The caller, their tenants and quotas", body = Me),
        (status = 401, description = "Not authenticated", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn me(State(state): State<Arc<AppState>>, caller: Caller) -> ApiResult<Json<Me>> {
    let admin_group = state.settings.platform_admin_group.as_deref();
    let tenants = state.tenants.all().await?;
    let now = jiff::Timestamp::now();
    let mut memberships: Vec<TenantMembership> = tenants
        .iter()
        .filter_map(|tenant| {
            let role = authz::tenant_role(&tenant.spec, &caller.identity, admin_group)?;
            let limits = &tenant.spec.limits;
            Some(TenantMembership {
                name: tenant.name_any(),
                display_name: tenant.spec.display_name.clone(),
                role,
                source_allowed: authz::source_allowed(
                    &tenant.spec.allowed_source_cidrs,
                    caller.client,
                ),
                quota: authz::quota_for(tenant, caller.user(), now),
                limits: LimitsView {
                    max_steps: limits.max_steps,
                    max_width: limits.max_width,
                    max_height: limits.max_height,
                    max_images: limits.max_images,
                },
            })
        })
        .collect();
    memberships.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(Me {
        user: caller.identity.user.clone(),
        groups: caller.identity.groups.clone(),
        platform_admin: authz::is_platform_admin(&caller.identity, admin_group),
        tenants: memberships,
    }))
}
