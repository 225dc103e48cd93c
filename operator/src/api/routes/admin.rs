//! Tenant administration (tenant admins and platform admins only): status with queue and
//! usage, quota reset, restarting inference pods, freeing the GPU, and the usage export.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use atelier_crds::names::{HTTP_PORT_NAME, INFERENCE, LABEL_COMPONENT};
use atelier_crds::{GenerationJob, Tenant};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::generations::{JobView, jobs};
use super::tenant_access;
use crate::api::AppState;
use crate::api::audit::{Event, Outcome};
use crate::api::auth::Caller;
use crate::api::authz;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::controllers::quota;
use crate::endpoints::ready_endpoints;

/// How long an inference pod may take to answer a model request.
const MODEL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Serialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Serialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ModelView {
    /// `ip:port` of the inference pod.
    pub endpoint: String,
    pub pod: Option<String>,
    /// The pod's `GET /v1/model` answer (`state`: loading, host or device), or null.
    #[schema(value_type = Object)]
    pub model: Option<serde_json::Value>,
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct UsageEntry {
    pub user: String,
    pub images: u32,
}

#[derive(Serialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatusView {
    pub name: String,
    pub phase: Option<String>,
    pub replicas: u32,
    pub ready_replicas: u32,
    pub gpus_in_use: u32,
    pub gpus_max: u32,
    pub queued: u32,
    pub running: u32,
    pub conditions: Vec<ConditionView>,
    pub models: Vec<ModelView>,
    /// Jobs not finished yet, in queue order (running first).
    pub queue: Vec<JobView>,
    /// Today's day in the quota time zone.
    pub usage_day: String,
    /// Images reserved per user today.
    pub usage: Vec<UsageEntry>,
    pub images_per_user_per_day: u32,
}

/// Tenant status (admin)
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/status", tag = "admin",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "Replicas, GPUs, model state, queue and usage today", body = TenantStatusView),
        (status = 403, description = "Not an admin of the tenant", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn status(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> ApiResult<Json<TenantStatusView>> {
    let access = tenant_access(&state, &caller, &tenant, "admin_status").await?;
    access.require_admin(&caller, "admin_status")?;
    let status = access.tenant.status.clone().unwrap_or_default();
    let mut queue: Vec<GenerationJob> = jobs(&state, &access.namespace)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|job| !job.phase().is_finished())
        .collect();
    queue.sort_by_key(|job| {
        let position = job
            .status
            .as_ref()
            .and_then(|s| s.queue_position)
            .unwrap_or(u32::MAX);
        (
            job.phase() != atelier_crds::JobPhase::Running,
            position,
            job.metadata.creation_timestamp.clone(),
        )
    });
    let endpoints =
        ready_endpoints(&state.kube, &access.namespace, INFERENCE, HTTP_PORT_NAME).await?;
    let mut models = Vec::new();
    for endpoint in endpoints {
        let url = format!("http://{}/v1/model", endpoint.address);
        let request = state.http.get(&url).timeout(Duration::from_secs(3));
        let answer = state.send_to_pod(&access.namespace, request).await;
        let (model, error) = match answer {
            Ok(response) if response.status().is_success() => (response.json().await.ok(), None),
            Ok(response) => (None, Some(format!("answered {}", response.status()))),
            Err(error) => (None, Some(error)),
        };
        models.push(ModelView {
            endpoint: endpoint.address.to_string(),
            pod: endpoint.pod,
            model,
            error,
        });
    }
    let day = authz::quota_day(&access.tenant, jiff::Timestamp::now());
    let usage = if status.usage_day.as_deref() == Some(day.as_str()) {
        status
            .usage
            .iter()
            .map(|u| UsageEntry {
                user: u.user.clone(),
                images: u.images,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Json(TenantStatusView {
        name: tenant.clone(),
        phase: status.phase.map(|phase| format!("{phase:?}")),
        replicas: status.replicas,
        ready_replicas: status.ready_replicas,
        gpus_in_use: status.gpus_in_use,
        gpus_max: access.tenant.spec.gpus.max,
        queued: status.queued,
        running: status.running,
        conditions: status
            .conditions
            .iter()
            .map(|c| ConditionView {
                kind: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
            .collect(),
        models,
        queue: queue.iter().map(|job| JobView::new(job, &tenant)).collect(),
        usage_day: day,
        usage,
        images_per_user_per_day: access.tenant.spec.quota.images_per_user_per_day,
    }))
}

#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct QuotaReset {
    /// The user whose images today are forgotten.
    pub user: String,
}

#[derive(Serialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct QuotaResetResult {
    pub user: String,
    /// Images that had been counted today (0 if none).
    pub removed_images: u32,
}

/// Reset a user's daily quota (admin)
///
/// Removes the user's entry from `Tenant.status.usage` with a read-modify-write that carries
/// the resourceVersion and is retried on 409 Conflict, so it never overwrites a concurrent
/// update by the controller.
#[utoipa::path(
    post, path = "/api/v1/tenants/{tenant}/quota/reset", tag = "admin",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = QuotaReset,
    responses(
        (status = 200, description = "Reset", body = QuotaResetResult),
        (status = 403, description = "Not an admin of the tenant", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn reset_quota(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
    body: Result<Json<QuotaReset>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<QuotaResetResult>> {
    let access = tenant_access(&state, &caller, &tenant, "quota_reset").await?;
    access.require_admin(&caller, "quota_reset")?;
    let Json(QuotaReset { user }) =
        body.map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))?;
    let tenants = Api::<Tenant>::all(state.kube.clone());
    let removed_images = match quota::reset(&tenants, &tenant, &user).await {
        Ok(removed) => removed.unwrap_or(0),
        Err(error) => {
            Event::new("quota_reset", Outcome::Failure)
                .user(caller.user())
                .tenant(&tenant)
                .client(caller.client)
                .object(&user)
                .reason("WriteFailed")
                .emit();
            return Err(error.into());
        }
    };
    Event::new("quota_reset", Outcome::Success)
        .user(caller.user())
        .tenant(&tenant)
        .client(caller.client)
        .object(&user)
        .emit();
    Ok(Json(QuotaResetResult {
        user,
        removed_images,
    }))
}

#[derive(Serialize, ToSchema, Debug)]
pub struct RestartResult {
    /// Pods deleted; their Deployment replaces them.
    pub deleted: Vec<String>,
}

/// Restart the inference pods (admin)
#[utoipa::path(
    post, path = "/api/v1/tenants/{tenant}/restart", tag = "admin",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "Pods deleted", body = RestartResult),
        (status = 403, description = "Not an admin of the tenant", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn restart(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> ApiResult<Json<RestartResult>> {
    let access = tenant_access(&state, &caller, &tenant, "restart").await?;
    access.require_admin(&caller, "restart")?;
    let pods: Api<Pod> = Api::namespaced(state.kube.clone(), &access.namespace);
    let selector = ListParams::default().labels(&format!("{LABEL_COMPONENT}={INFERENCE}"));
    // `Right` means the API server deleted them without listing them back.
    let deleted: Vec<String> = (pods
        .delete_collection(&DeleteParams::default(), &selector)
        .await?)
        .left()
        .map(|list| list.items.iter().map(|pod| pod.name_any()).collect())
        .unwrap_or_default();
    Event::new("restart", Outcome::Success)
        .user(caller.user())
        .tenant(&tenant)
        .client(caller.client)
        .object(&deleted.join(","))
        .emit();
    Ok(Json(RestartResult { deleted }))
}

#[derive(Serialize, ToSchema, Debug)]
pub struct OffloadResult {
    pub models: Vec<ModelView>,
}

/// Free the GPU now (admin)
///
/// Asks every ready inference pod to move its weights to host memory (`POST
/// /v1/model/offload`). A pod with jobs in flight refuses (ModelBusy) and says so.
#[utoipa::path(
    post, path = "/api/v1/tenants/{tenant}/offload", tag = "admin",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 200, description = "Each pod's answer", body = OffloadResult),
        (status = 403, description = "Not an admin of the tenant", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn offload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> ApiResult<Json<OffloadResult>> {
    let access = tenant_access(&state, &caller, &tenant, "offload").await?;
    access.require_admin(&caller, "offload")?;
    let endpoints =
        ready_endpoints(&state.kube, &access.namespace, INFERENCE, HTTP_PORT_NAME).await?;
    let mut models = Vec::new();
    for endpoint in endpoints {
        let url = format!("http://{}/v1/model/offload", endpoint.address);
        let request = state.http.post(&url).timeout(MODEL_TIMEOUT);
        let answer = state.send_to_pod(&access.namespace, request).await;
        let (model, error) = match answer {
            Ok(response) if response.status().is_success() => (response.json().await.ok(), None),
            Ok(response) => {
                let status = response.status();
                let body: Option<serde_json::Value> = response.json().await.ok();
                let reason = body
                    .as_ref()
                    .and_then(|b| b["error"]["message"].as_str())
                    .map(str::to_string);
                (
                    None,
                    Some(reason.unwrap_or_else(|| format!("answered {status}"))),
                )
            }
            Err(error) => (None, Some(error)),
        };
        models.push(ModelView {
            endpoint: endpoint.address.to_string(),
            pod: endpoint.pod,
            model,
            error,
        });
    }
    Event::new("offload", Outcome::Success)
        .user(caller.user())
        .tenant(&tenant)
        .client(caller.client)
        .emit();
    Ok(Json(OffloadResult { models }))
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// First day, `YYYY-MM-DD` (inclusive).
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (inclusive).
    pub to: Option<String>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

/// Usage of one user on one day.
#[derive(Serialize, ToSchema, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    /// `YYYY-MM-DD` in the tenant's quota time zone, by completion time.
    pub day: String,
    pub user: String,
    pub jobs: u32,
    pub images: u32,
    /// Run time × GPUs per replica: an upper bound when a replica runs several jobs at once.
    pub gpu_seconds: f64,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct UsageReport {
    pub rows: Vec<UsageRow>,
}

/// Usage per user and day from finished jobs that ran (start and completion time known).
pub fn usage_rows(
    jobs: &[GenerationJob],
    tenant: &Tenant,
    from: Option<&str>,
    to: Option<&str>,
) -> Vec<UsageRow> {
    let gpus = f64::from(tenant.spec.gpus.per_replica);
    let mut rows: BTreeMap<(String, String), UsageRow> = BTreeMap::new();
    for job in jobs.iter().filter(|job| job.phase().is_finished()) {
        let Some(status) = &job.status else { continue };
        let (Some(start), Some(end)) = (&status.start_time, &status.completion_time) else {
            continue;
        };
        let day = authz::quota_day(tenant, end.0);
        if from.is_some_and(|from| day.as_str() < from) || to.is_some_and(|to| day.as_str() > to) {
            continue;
        }
        let seconds = (end.0.as_millisecond() - start.0.as_millisecond()).max(0) as f64 / 1000.0;
        let row = rows
            .entry((day.clone(), job.spec.user.clone()))
            .or_insert_with(|| UsageRow {
                day,
                user: job.spec.user.clone(),
                jobs: 0,
                images: 0,
                gpu_seconds: 0.0,
            });
        row.jobs += 1;
        row.images += status.outputs.len() as u32;
        row.gpu_seconds += seconds * gpus;
    }
    rows.into_values().collect()
}

/// One CSV field: quoted when needed, and a leading `=`, `+`, `-` or `@` defused so that a
/// spreadsheet does not run a user name as a formula.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

pub fn usage_csv(rows: &[UsageRow]) -> String {
    let mut out = String::from("day,user,jobs,images,gpu_seconds\n");
    for row in rows {
        out.push_str(&format!(
            "{},{},{},{},{:.1}\n",
            row.day,
            csv_field(&row.user),
            row.jobs,
            row.images,
            row.gpu_seconds
        ));
    }
    out
}

/// Usage export (admin)
///
/// Images and GPU-seconds per user and day, from the finished jobs still in the cluster
/// (`ttlAfterFinished` bounds how far back this goes). JSON or CSV (`?format=csv`).
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/usage", tag = "admin",
    params(("tenant" = String, Path, description = "Tenant name"), UsageQuery),
    responses(
        (status = 200, description = "Rows by day and user", content(
            (UsageReport = "application/json"),
            (String = "text/csv"),
        )),
        (status = 403, description = "Not an admin of the tenant", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn usage(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
    Query(query): Query<UsageQuery>,
) -> ApiResult<Response> {
    let access = tenant_access(&state, &caller, &tenant, "usage").await?;
    access.require_admin(&caller, "usage")?;
    for day in [&query.from, &query.to].into_iter().flatten() {
        if day.parse::<jiff::civil::Date>().is_err() {
            return Err(ApiError::InvalidRequest(format!(
                "{day:?} is not a YYYY-MM-DD day"
            )));
        }
    }
    let all = jobs(&state, &access.namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let rows = usage_rows(
        &all,
        &access.tenant,
        query.from.as_deref(),
        query.to.as_deref(),
    );
    match query.format.as_deref() {
        None | Some("json") => Ok(Json(UsageReport { rows }).into_response()),
        Some("csv") => {
            let mut response = usage_csv(&rows).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            let disposition = format!("attachment; filename=\"usage-{tenant}.csv\"");
            if let Ok(value) = HeaderValue::from_str(&disposition) {
                headers.insert(header::CONTENT_DISPOSITION, value);
            }
            Ok(response)
        }
        Some(other) => Err(ApiError::InvalidRequest(format!(
            "format must be json or csv, not {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_crds::{GenerationJobStatus, JobOutput, JobPhase};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn tenant() -> Tenant {
        let mut tenant = Tenant::new(
            "team-x",
            serde_json::from_value(serde_json::json!({})).unwrap(),
        );
        tenant.spec.gpus.per_replica = 2;
        tenant.spec.gpus.max = 2;
        tenant
    }

    fn finished(user: &str, start: &str, end: &str, images: usize) -> GenerationJob {
        let spec =
            serde_json::from_value(serde_json::json!({"prompt": "p", "user": user})).unwrap();
        let mut job = GenerationJob::new("j", spec);
        let output = JobOutput {
            path: "/o".into(),
            sha256: String::new(),
            width: 1,
            height: 1,
            bytes: 1,
        };
        job.status = Some(GenerationJobStatus {
            phase: Some(JobPhase::Succeeded),
            start_time: Some(Time(start.parse().unwrap())),
            completion_time: Some(Time(end.parse().unwrap())),
            outputs: vec![output; images],
            ..Default::default()
        });
        job
    }

    #[test]
    fn usage_by_user_and_day() {
        let jobs = vec![
            finished("alice", "2026-11-29T10:00:00Z", "2026-11-29T10:00:30Z", 1),
            finished("alice", "2026-11-29T11:00:00Z", "2026-11-29T11:00:10Z", 2),
            finished("bob", "2026-11-29T23:59:00Z", "2026-11-30T00:00:05Z", 1),
            {
                let mut running =
                    finished("bob", "2026-11-29T10:00:00Z", "2026-11-29T10:00:01Z", 0);
                running.status.as_mut().unwrap().phase = Some(JobPhase::Running);
                running
            },
        ];
        let rows = usage_rows(&jobs, &tenant(), None, None);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].day.as_str(),
                rows[0].user.as_str(),
                rows[0].jobs,
                rows[0].images
            ),
            ("2026-11-29", "alice", 2, 3)
        );
        assert_eq!(rows[0].gpu_seconds, 80.0, "40 s on a 2-GPU replica");
        assert_eq!(
            (rows[1].day.as_str(), rows[1].user.as_str()),
            ("2026-11-30", "bob")
        );
        assert_eq!(
            usage_rows(&jobs, &tenant(), Some("2026-11-30"), None).len(),
            1
        );
        assert_eq!(
            usage_rows(&jobs, &tenant(), None, Some("2026-11-29")).len(),
            1
        );
        let csv = usage_csv(&rows);
        assert_eq!(csv.lines().next(), Some("day,user,jobs,images,gpu_seconds"));
        assert_eq!(csv.lines().nth(1), Some("2026-11-29,alice,2,3,80.0"));
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }
}
