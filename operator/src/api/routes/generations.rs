//! Generations: create, list, read, cancel and follow `GenerationJob`s of a tenant.
//!
//! `spec.user` is always the authenticated caller: the request body cannot name a user (unknown
//! fields are refused). Users see only their own jobs; someone else's job answers 404 as if it
//! did not exist. Tenant admins see and cancel every job of the tenant.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use atelier_crds::{GenerationJob, GenerationJobSpec, JobLimits, Role};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{TenantAccess, hidden, query_value, tenant_access};
use crate::api::AppState;
use crate::api::audit::{Event, Outcome};
use crate::api::auth::Caller;
use crate::api::authz;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::api::streams;

/// What a caller may ask for. The user is not a field: it comes from the token.
#[derive(Deserialize, ToSchema, Debug, Clone, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerateRequest {
    /// What to draw (1–2000 characters).
    pub prompt: String,
    /// Multiple of 16, 256 up to the tenant's `limits.maxWidth`; 1024 by default.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Denoising steps, 1 up to the tenant's `limits.maxSteps`; 28 by default.
    pub steps: Option<u32>,
    /// Guidance scale, 0–20; 3.5 by default.
    pub guidance: Option<f64>,
    /// 0–4294967295; random when empty.
    pub seed: Option<u64>,
    /// 1 up to the tenant's `limits.maxImages`; 1 by default.
    pub num_images: Option<u32>,
}

#[derive(Serialize, ToSchema, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressView {
    pub step: u32,
    pub total_steps: u32,
}

#[derive(Serialize, ToSchema, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputView {
    /// File name in the user's history.
    pub file: String,
    /// Where the API serves the PNG.
    pub url: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

/// A generation as the API shows it.
#[derive(Serialize, ToSchema, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub name: String,
    pub tenant: String,
    pub user: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f64,
    /// The seed asked for, or the one chosen once the job is admitted.
    pub seed: Option<u64>,
    pub num_images: u32,
    /// Pending, Queued, Running, Succeeded, Failed, Cancelled or Rejected.
    pub phase: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// 1-based place in the tenant's queue while Queued.
    pub queue_position: Option<u32>,
    pub progress: Option<ProgressView>,
    pub cancel_requested: bool,
    pub outputs: Vec<OutputView>,
    pub created_at: Option<String>,
    pub start_time: Option<String>,
    pub completion_time: Option<String>,
}

fn time(value: Option<&Time>) -> Option<String> {
    value.map(|time| time.0.to_string())
}

impl JobView {
    pub fn new(job: &GenerationJob, tenant: &str) -> Self {
        let status = job.status.clone().unwrap_or_default();
        let outputs = status
            .outputs
            .iter()
            .filter_map(|output| {
                let file = output.path.rsplit('/').next()?.to_string();
                let url = format!(
                    "/api/v1/tenants/{tenant}/images/{file}?user={}",
                    query_value(&job.spec.user)
                );
                Some(OutputView {
                    file,
                    url,
                    width: output.width,
                    height: output.height,
                    bytes: output.bytes,
                })
            })
            .collect();
        JobView {
            name: job.name_any(),
            tenant: tenant.to_string(),
            user: job.spec.user.clone(),
            prompt: job.spec.prompt.clone(),
            width: job.spec.width,
            height: job.spec.height,
            steps: job.spec.steps,
            guidance: job.spec.guidance,
            seed: status.seed.or(job.spec.seed),
            num_images: job.spec.num_images,
            phase: job.phase().as_str().to_string(),
            reason: status.reason,
            message: status.message,
            queue_position: status.queue_position,
            progress: status.progress.map(|p| ProgressView {
                step: p.step,
                total_steps: p.total_steps,
            }),
            cancel_requested: job.spec.cancel,
            outputs,
            created_at: time(job.metadata.creation_timestamp.as_ref()),
            start_time: time(status.start_time.as_ref()),
            completion_time: time(status.completion_time.as_ref()),
        }
    }
}

/// The job spec for a request, checked against the tenant's limits so that the caller gets a
/// precise 400 rather than a rejection later. The CRD's own rules stay in force on create.
pub fn build_spec(
    request: &GenerateRequest,
    limits: &JobLimits,
    user: &str,
) -> Result<GenerationJobSpec, String> {
    let prompt = request.prompt.trim();
    if prompt.is_empty() {
        return Err("prompt must not be empty".into());
    }
    if prompt.chars().count() > 2000 {
        return Err("prompt must be at most 2000 characters".into());
    }
    let side = |value: Option<u32>, max: u32, what: &str| -> Result<u32, String> {
        let value = value.unwrap_or_else(|| 1024.min(max) / 16 * 16);
        if !value.is_multiple_of(16) || !(256..=max).contains(&value) {
            return Err(format!(
                "{what} must be a multiple of 16 between 256 and {max}"
            ));
        }
        Ok(value)
    };
    let width = side(request.width, limits.max_width, "width")?;
    let height = side(request.height, limits.max_height, "height")?;
    let steps = request.steps.unwrap_or_else(|| 28.min(limits.max_steps));
    if !(1..=limits.max_steps).contains(&steps) {
        return Err(format!("steps must be between 1 and {}", limits.max_steps));
    }
    let guidance = request.guidance.unwrap_or(3.5);
    if !guidance.is_finite() || !(0.0..=20.0).contains(&guidance) {
        return Err("guidance must be between 0 and 20".into());
    }
    if request.seed.is_some_and(|seed| seed > u64::from(u32::MAX)) {
        return Err(format!("seed must be between 0 and {}", u32::MAX));
    }
    let num_images = request.num_images.unwrap_or(1);
    if !(1..=limits.max_images).contains(&num_images) {
        return Err(format!(
            "numImages must be between 1 and {}",
            limits.max_images
        ));
    }
    let mut spec: GenerationJobSpec =
        serde_json::from_value(serde_json::json!({"prompt": prompt, "user": user}))
            .map_err(|e| e.to_string())?;
    spec.width = width;
    spec.height = height;
    spec.steps = steps;
    spec.guidance = guidance;
    spec.seed = request.seed;
    spec.num_images = num_images;
    Ok(spec)
}

pub fn jobs(state: &AppState, namespace: &str) -> Api<GenerationJob> {
    Api::namespaced(state.kube.clone(), namespace)
}

/// Escapes a field-selector value (`\`, `,` and `=` are special there).
fn field_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace('=', "\\=")
}

/// Create a generation
///
/// The job runs as the authenticated user. Answers 429 at once when the user's daily quota is
/// used up; the controller's admission stays authoritative (a job can still end `Rejected`).
#[utoipa::path(
    post, path = "/api/v1/tenants/{tenant}/generations", tag = "generations",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = GenerateRequest,
    responses(
        (status = 201, description = "Created", body = JobView),
        (status = 400, description = "Invalid parameters", body = ErrorBody),
        (status = 401, description = "Not authenticated", body = ErrorBody),
        (status = 403, description = "Not a member of the tenant", body = ErrorBody),
        (status = 429, description = "Daily quota used up (QuotaExceeded) or rate limited (RateLimited, Retry-After)", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
    body: Result<Json<GenerateRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let access = tenant_access(&state, &caller, &tenant, "generate").await?;
    let audit = |outcome: Outcome, reason: &str, object: &str| {
        Event::new("generate", outcome)
            .user(caller.user())
            .tenant(&tenant)
            .client(caller.client)
            .reason(reason)
            .object(object)
            .emit();
    };
    let Json(request) =
        body.map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))?;
    let spec = build_spec(&request, &access.tenant.spec.limits, caller.user())
        .map_err(ApiError::InvalidRequest)?;
    let quota = authz::quota_for(&access.tenant, caller.user(), jiff::Timestamp::now());
    if quota.remaining < spec.num_images {
        audit(Outcome::Denied, "QuotaExceeded", "");
        return Err(ApiError::QuotaExceeded(format!(
            "daily quota used up: {} of {} images used on {} ({} left, {} asked for)",
            quota.used, quota.limit, quota.day, quota.remaining, spec.num_images
        )));
    }
    let job = GenerationJob {
        metadata: ObjectMeta {
            generate_name: Some("gen-".into()),
            namespace: Some(access.namespace.clone()),
            labels: Some(
                [(
                    atelier_crds::names::LABEL_TENANT.to_string(),
                    tenant.clone(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    };
    match jobs(&state, &access.namespace)
        .create(&PostParams::default(), &job)
        .await
    {
        Ok(created) => {
            audit(Outcome::Success, "Created", &created.name_any());
            Ok((StatusCode::CREATED, Json(JobView::new(&created, &tenant))))
        }
        Err(error) => {
            let error = ApiError::from(error);
            audit(Outcome::Failure, error.reason(), "");
            Err(error)
        }
    }
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Whose jobs (admins only; the caller's own by default). Admins get every user's jobs
    /// when they leave it out.
    pub user: Option<String>,
    /// At most this many, newest first (1–500, default 100).
    pub limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub items: Vec<JobView>,
}

/// List generations
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/generations", tag = "generations",
    params(("tenant" = String, Path, description = "Tenant name"), ListQuery),
    responses(
        (status = 200, description = "Newest first", body = JobList),
        (status = 403, description = "Not a member, or ?user= of someone else without admin role", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<JobList>> {
    let access = tenant_access(&state, &caller, &tenant, "list").await?;
    let limit = query.limit.unwrap_or(100).clamp(1, 500);
    let user = match (access.role, query.user.as_deref()) {
        (Role::Admin, None) => None,
        (role, requested) => Some(
            authz::target_user(role, caller.user(), requested)
                .map_err(|message| super::deny(&caller, &tenant, "list", "AdminRequired", message))?
                .to_string(),
        ),
    };
    let params = match &user {
        Some(user) => ListParams::default().fields(&format!("spec.user={}", field_value(user))),
        None => ListParams::default(),
    };
    let mut items = jobs(&state, &access.namespace).list(&params).await?.items;
    // The field selector already did this; checking again costs nothing and keeps a selector
    // bug from leaking other users' jobs.
    items.retain(|job| user.as_ref().is_none_or(|user| job.spec.user == *user));
    items.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
            .then(b.name_any().cmp(&a.name_any()))
    });
    items.truncate(limit);
    Ok(Json(JobList {
        items: items.iter().map(|job| JobView::new(job, &tenant)).collect(),
    }))
}

/// The job `name` if the caller may see it (404 otherwise, audited when it exists).
async fn visible_job(
    state: &AppState,
    caller: &Caller,
    access: &TenantAccess,
    name: &str,
    action: &str,
) -> ApiResult<GenerationJob> {
    let job = if super::is_dns_label(name) {
        jobs(state, &access.namespace).get_opt(name).await?
    } else {
        None
    };
    match job {
        Some(job) if authz::may_access_job(access.role, caller.user(), &job.spec.user) => Ok(job),
        Some(_) => Err(hidden(caller, &access.name, action, name)),
        None => Err(ApiError::NotFound(format!("no generation {name:?}"))),
    }
}

/// Read a generation
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/generations/{name}", tag = "generations",
    params(("tenant" = String, Path, description = "Tenant name"), ("name" = String, Path, description = "Job name")),
    responses(
        (status = 200, description = "Phase, queue position, progress, outputs", body = JobView),
        (status = 404, description = "No such job, or not the caller's", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Json<JobView>> {
    let access = tenant_access(&state, &caller, &tenant, "read").await?;
    let job = visible_job(&state, &caller, &access, &name, "read").await?;
    Ok(Json(JobView::new(&job, &tenant)))
}

/// Cancel a generation
///
/// Sets `spec.cancel`: a queued job leaves the queue, a running one stops within a step.
/// Cancelling a finished job changes nothing.
#[utoipa::path(
    delete, path = "/api/v1/tenants/{tenant}/generations/{name}", tag = "generations",
    params(("tenant" = String, Path, description = "Tenant name"), ("name" = String, Path, description = "Job name")),
    responses(
        (status = 202, description = "Cancellation requested", body = JobView),
        (status = 404, description = "No such job, or not the caller's", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let access = tenant_access(&state, &caller, &tenant, "cancel").await?;
    let job = visible_job(&state, &caller, &access, &name, "cancel").await?;
    let job = if job.phase().is_finished() || job.spec.cancel {
        job
    } else {
        let patch = serde_json::json!({"spec": {"cancel": true}});
        jobs(&state, &access.namespace)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?
    };
    Event::new("cancel", Outcome::Success)
        .user(caller.user())
        .tenant(&tenant)
        .client(caller.client)
        .object(&name)
        .emit();
    Ok((StatusCode::ACCEPTED, Json(JobView::new(&job, &tenant))))
}

/// Follow a generation (Server-Sent Events)
///
/// `event: job` with a JobView now and on every change, until the job finishes
/// (`event: deleted` if the object goes away). Keep-alive comments every 15 s.
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/generations/{name}/events", tag = "generations",
    params(("tenant" = String, Path, description = "Tenant name"), ("name" = String, Path, description = "Job name")),
    responses(
        (status = 200, description = "text/event-stream of JobView", content_type = "text/event-stream", body = JobView),
        (status = 404, description = "No such job, or not the caller's", body = ErrorBody),
        (status = 409, description = "The caller holds the most event streams one user may", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, name)): Path<(String, String)>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let access = tenant_access(&state, &caller, &tenant, "read").await?;
    let job = visible_job(&state, &caller, &access, &name, "read").await?;
    let slot = state
        .streams
        .acquire(caller.user())
        .map_err(|too_many| ApiError::Conflict(too_many.to_string()))?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<SseEvent>(16);
    let api = jobs(&state, &access.namespace);
    let session_ended = streams::session_ended(state.clone(), caller.session.clone());
    tokio::spawn(async move {
        let _slot = slot;
        let first = JobView::new(&job, &tenant);
        if sender.send(job_event(&first)).await.is_err() || job.phase().is_finished() {
            return;
        }
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut changes = std::pin::pin!(watcher(api, config).default_backoff());
        let mut session_ended = std::pin::pin!(session_ended);
        let mut last = first;
        loop {
            let change = tokio::select! {
                () = sender.closed() => return,
                () = &mut session_ended => return,
                change = changes.next() => change,
            };
            let job = match change {
                Some(Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job))) => job,
                Some(Ok(watcher::Event::Delete(_))) => {
                    let _ = sender
                        .send(SseEvent::default().event("deleted").data(&name))
                        .await;
                    return;
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => {
                    tracing::debug!(%error, "watch of a job failed; retrying");
                    continue;
                }
                None => return,
            };
            let view = JobView::new(&job, &tenant);
            if view != last && sender.send(job_event(&view)).await.is_err() {
                return;
            }
            if job.phase().is_finished() {
                return;
            }
            last = view;
        }
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn job_event(view: &JobView) -> SseEvent {
    SseEvent::default()
        .event("job")
        .json_data(view)
        .unwrap_or_else(|_| SseEvent::default().event("job"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_crds::JobPhase;

    fn limits() -> JobLimits {
        JobLimits {
            max_steps: 50,
            max_width: 1024,
            max_height: 2048,
            max_images: 2,
            ..JobLimits::default()
        }
    }

    fn request(change: impl FnOnce(&mut GenerateRequest)) -> GenerateRequest {
        let mut request = GenerateRequest {
            prompt: " a red fox in snow ".into(),
            ..GenerateRequest::default()
        };
        change(&mut request);
        request
    }

    #[test]
    fn defaults_and_the_user_from_the_token() {
        let spec = build_spec(&request(|_| {}), &limits(), "alice@example.com").unwrap();
        assert_eq!(spec.user, "alice@example.com");
        assert_eq!(spec.prompt, "a red fox in snow");
        assert_eq!(
            (spec.width, spec.height, spec.steps, spec.num_images),
            (1024, 1024, 28, 1)
        );
        assert_eq!(spec.guidance, 3.5);
        assert_eq!(spec.seed, None);
        assert!(!spec.cancel);
        let small = JobLimits {
            max_width: 512,
            max_steps: 8,
            ..limits()
        };
        let spec = build_spec(&request(|_| {}), &small, "a").unwrap();
        assert_eq!(
            (spec.width, spec.steps),
            (512, 8),
            "defaults fit the tenant's limits"
        );
    }

    #[test]
    fn out_of_bounds_parameters_are_refused() {
        let cases: Vec<(GenerateRequest, &str)> = vec![
            (request(|r| r.prompt = "  ".into()), "prompt"),
            (request(|r| r.prompt = "x".repeat(2001)), "prompt"),
            (request(|r| r.width = Some(1000)), "width"),
            (request(|r| r.width = Some(2048)), "width"),
            (request(|r| r.height = Some(128)), "height"),
            (request(|r| r.steps = Some(0)), "steps"),
            (request(|r| r.steps = Some(51)), "steps"),
            (request(|r| r.guidance = Some(f64::NAN)), "guidance"),
            (request(|r| r.guidance = Some(21.0)), "guidance"),
            (request(|r| r.seed = Some(1 << 32)), "seed"),
            (request(|r| r.num_images = Some(3)), "numImages"),
        ];
        for (request, field) in cases {
            let error = build_spec(&request, &limits(), "a").unwrap_err();
            assert!(error.contains(field), "{error}");
        }
        assert!(build_spec(&request(|r| r.height = Some(2048)), &limits(), "a").is_ok());
    }

    #[test]
    fn the_body_cannot_name_a_user() {
        let body = serde_json::json!({"prompt": "x", "user": "bob@example.com"});
        assert!(serde_json::from_value::<GenerateRequest>(body).is_err());
    }

    #[test]
    fn views_link_outputs_through_the_api() {
        let spec = build_spec(&request(|_| {}), &limits(), "a b@x").unwrap();
        let mut job = GenerationJob::new("gen-1", spec);
        job.status = Some(atelier_crds::GenerationJobStatus {
            phase: Some(JobPhase::Succeeded),
            outputs: vec![atelier_crds::JobOutput {
                path: "/outputs/a%20b@x/20261129_223501_42_1a2b3c4d.png".into(),
                sha256: "00".into(),
                width: 1024,
                height: 1024,
                bytes: 10,
            }],
            seed: Some(42),
            ..Default::default()
        });
        let view = JobView::new(&job, "team-x");
        assert_eq!(view.phase, "Succeeded");
        assert_eq!(view.seed, Some(42));
        assert_eq!(view.outputs[0].file, "20261129_223501_42_1a2b3c4d.png");
        assert_eq!(
            view.outputs[0].url,
            "/api/v1/tenants/team-x/images/20261129_223501_42_1a2b3c4d.png?user=a+b%40x"
        );
        assert_eq!(field_value("a=b,c\\"), "a\\=b\\,c\\\\");
    }
}
