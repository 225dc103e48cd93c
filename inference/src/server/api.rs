//! HTTP handlers of `serve`: jobs, model, health and metrics. The contract is written down in
//! `docs/inference-api.md`; the operator's dispatcher depends on every name here.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{oneshot, watch};

use super::auth::{self, ApiToken};
use super::jobs::{self, JobSpec, JobStatus, Registry, Submitted};
use super::metrics::InferenceMetrics;
use super::warm::ModelState;
use super::worker::{Command, ModelView, OffloadError};
use crate::outputs;
use crate::pipeline;

/// How long `DELETE /v1/jobs/{id}` waits for a running job to stop, so that the reply usually
/// shows the final state. One denoising step is well below this on any supported hardware.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// `Retry-After` on 429 and 503: roughly when a slot or the model may be there.
const RETRY_AFTER_SECS: u32 = 5;

/// Every error answer: `{"error": {"reason": "...", "message": "..."}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("no job {0}")]
    JobNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Conflict(jobs::Error),
    #[error(transparent)]
    AtCapacity(jobs::Error),
    #[error("the model is still loading")]
    NotReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    ModelBusy(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn reason(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "InvalidRequest",
            ApiError::JobNotFound(_) | ApiError::NotFound(_) => "NotFound",
            ApiError::Conflict(_) => "Conflict",
            ApiError::AtCapacity(_) => "AtCapacity",
            ApiError::NotReady => "NotReady",
            ApiError::ShuttingDown => "ShuttingDown",
            ApiError::ModelBusy(_) => "ModelBusy",
            ApiError::Internal(_) => "Internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::JobNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::ModelBusy(_) => StatusCode::CONFLICT,
            ApiError::AtCapacity(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(reason = self.reason(), error = %self, "request failed");
        }
        let body = Json(json!({"error": {"reason": self.reason(), "message": self.to_string()}}));
        let mut response = (status, body).into_response();
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError::InvalidRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::InvalidRequest(rejection.body_text())
    }
}

impl From<jobs::Error> for ApiError {
    fn from(e: jobs::Error) -> Self {
        match e {
            jobs::Error::Conflict(_) => ApiError::Conflict(e),
            jobs::Error::AtCapacity(_) => ApiError::AtCapacity(e),
        }
    }
}

impl From<outputs::Error> for ApiError {
    fn from(e: outputs::Error) -> Self {
        match e {
            outputs::Error::InvalidUser(_) | outputs::Error::InvalidFileName => {
                ApiError::InvalidRequest(e.to_string())
            }
            outputs::Error::NotFound => ApiError::NotFound(e.to_string()),
            outputs::Error::AlreadyExists(_) | outputs::Error::Io { .. } => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

/// `Json` whose rejections (malformed body, wrong content type) answer in the error format.
#[derive(FromRequest)]
#[from_request(via(Json), rejection(ApiError))]
pub struct AppJson<T>(pub T);

impl<T: Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

/// Body of `POST /v1/jobs`. Only `id`, `user`, `prompt` and `seed` are required; a fixed seed
/// is what makes a retried job reproduce the same image.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRequest {
    pub id: String,
    pub user: String,
    pub prompt: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub guidance: Option<f32>,
    pub seed: Option<u64>,
    pub num_images: Option<u32>,
    pub timeout_seconds: Option<u64>,
}

pub const DEFAULT_SIZE: u32 = 1024;
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 600;
const MAX_ID_LEN: usize = 128;
const MAX_PROMPT_BYTES: usize = 10_000;
const MAX_TIMEOUT_SECONDS: u64 = 24 * 3600;

impl JobRequest {
    /// Validates and fills in defaults. The generation parameters go through the pipeline's
    /// own [`pipeline::validate`], which the worker would otherwise hit only when the job runs.
    pub fn into_spec(self, model: &ModelView) -> Result<JobSpec, ApiError> {
        let invalid = |m: String| Err(ApiError::InvalidRequest(m));
        if self.id.is_empty()
            || self.id.len() > MAX_ID_LEN
            || !self.id.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return invalid(format!(
                "id must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-], starting with a letter or digit"
            ));
        }
        outputs::safe_user_dir(&self.user).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
        if self.prompt.trim().is_empty() || self.prompt.len() > MAX_PROMPT_BYTES {
            return invalid(format!(
                "prompt must be non-empty and at most {MAX_PROMPT_BYTES} bytes"
            ));
        }
        let Some(seed) = self.seed else {
            return invalid("seed is required".into());
        };
        let timeout_seconds = self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
        if !(1..=MAX_TIMEOUT_SECONDS).contains(&timeout_seconds) {
            return invalid(format!(
                "timeoutSeconds must be between 1 and {MAX_TIMEOUT_SECONDS}, got {timeout_seconds}"
            ));
        }
        let spec = JobSpec {
            id: self.id,
            user: self.user,
            prompt: self.prompt,
            width: self.width.unwrap_or(DEFAULT_SIZE),
            height: self.height.unwrap_or(DEFAULT_SIZE),
            steps: self.steps.unwrap_or(model.default_steps),
            guidance: self.guidance.unwrap_or(model.default_guidance),
            seed,
            num_images: self.num_images.unwrap_or(1),
            timeout: Duration::from_secs(timeout_seconds),
        };
        pipeline::validate(&spec.request()).map_err(|e| match e {
            // Without the variant's "invalid request: " prefix: the reason already says so.
            pipeline::Error::InvalidRequest(message) => ApiError::InvalidRequest(message),
            other => ApiError::InvalidRequest(other.to_string()),
        })?;
        Ok(spec)
    }
}

pub struct AppState {
    pub jobs: Mutex<Registry>,
    pub commands: mpsc::Sender<Command>,
    pub model: watch::Receiver<ModelView>,
    pub metrics: Arc<InferenceMetrics>,
    pub outputs_dir: PathBuf,
    /// Set on SIGTERM: no new jobs, readiness fails, existing jobs stay readable.
    pub draining: AtomicBool,
}

impl AppState {
    pub fn jobs(&self) -> MutexGuard<'_, Registry> {
        // Registry methods leave it consistent at every point, so a panic elsewhere while the
        // lock was held does not make its content unusable.
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn job(&self, id: &str) -> Result<Arc<jobs::Job>, ApiError> {
        self.jobs()
            .get(id)
            .ok_or_else(|| ApiError::JobNotFound(id.to_owned()))
    }
}

pub fn router(state: Arc<AppState>, token: Option<ApiToken>) -> Router {
    let v1 = Router::new()
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/model", get(get_model))
        .route("/v1/model/offload", post(offload_model));
    auth::protect(v1, token)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn submit_job(
    State(state): State<Arc<AppState>>,
    AppJson(request): AppJson<JobRequest>,
) -> Result<(StatusCode, AppJson<JobStatus>), ApiError> {
    let model = state.model.borrow().clone();
    if model.state == ModelState::Loading {
        return Err(ApiError::NotReady);
    }
    let spec = request.into_spec(&model)?;
    let submitted = {
        let mut jobs = state.jobs();
        // A resubmission of a known job still gets its status while draining.
        if state.draining.load(Ordering::SeqCst) && jobs.get(&spec.id).is_none() {
            return Err(ApiError::ShuttingDown);
        }
        jobs.submit(spec, Timestamp::now(), Instant::now())?
    };
    match submitted {
        Submitted::Existing(job) => Ok((StatusCode::OK, AppJson(job.status()))),
        Submitted::Created(job) => {
            tracing::info!(
                target: "audit",
                action = "submit",
                user = %job.spec.user,
                job = %job.spec.id,
                outcome = "accepted",
            );
            if let Some(files) = earlier_outputs(&state, &job).await {
                tracing::info!(job = %job.spec.id, images = files.len(), "an earlier attempt already wrote this job's images; not generating again");
                let now = Timestamp::now();
                job.start(now);
                job.finish(jobs::Outcome::Succeeded(files), now);
                return Ok((StatusCode::ACCEPTED, AppJson(job.status())));
            }
            if state.commands.send(Command::Run(Arc::clone(&job))).is_err() {
                // Only after the worker thread died: fail the job rather than leave it queued.
                job.finish(
                    jobs::Outcome::Failed(jobs::JobError {
                        reason: jobs::FailureReason::GenerationFailed,
                        message: "the generator is not running".into(),
                    }),
                    Timestamp::now(),
                );
                return Err(ApiError::Internal("the generator is not running".into()));
            }
            Ok((StatusCode::ACCEPTED, AppJson(job.status())))
        }
    }
}

/// The images a previous pod wrote for this job before it was lost (see
/// [`outputs::find_job_outputs`]). An unreadable volume means "none": generating then fails with
/// the volume's own error.
async fn earlier_outputs(state: &AppState, job: &jobs::Job) -> Option<Vec<outputs::OutputFile>> {
    let root = state.outputs_dir.clone();
    let spec = job.spec.clone();
    let found = tokio::task::spawn_blocking(move || {
        outputs::find_job_outputs(&root, &spec.user, &spec.id, spec.seed, spec.num_images)
    })
    .await;
    match found {
        Ok(Ok(files)) => files,
        Ok(Err(error)) => {
            tracing::warn!(job = %job.spec.id, %error, "could not look for earlier outputs");
            None
        }
        Err(_) => None,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobList {
    pub jobs: Vec<JobStatus>,
    pub capacity: usize,
    pub active: usize,
}

async fn list_jobs(State(state): State<Arc<AppState>>) -> AppJson<JobList> {
    let mut jobs = state.jobs();
    let list = jobs
        .list(Timestamp::now())
        .iter()
        .map(|job| job.status())
        .collect();
    AppJson(JobList {
        jobs: list,
        capacity: jobs.capacity(),
        active: jobs.active(),
    })
}

async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<AppJson<JobStatus>, ApiError> {
    Ok(AppJson(state.job(&id)?.status()))
}

async fn cancel_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<AppJson<JobStatus>, ApiError> {
    let job = state.job(&id)?;
    if !job.state().is_finished() {
        tracing::info!(target: "audit", action = "cancel", user = %job.spec.user, job = %id, outcome = "requested");
    }
    job.cancel(Timestamp::now());
    let mut updates = job.subscribe();
    // Timing out is fine: the reply then shows "running" and the job stops shortly after.
    let _ = tokio::time::timeout(CANCEL_WAIT, updates.wait_for(|s| s.state.is_finished())).await;
    Ok(AppJson(job.status()))
}

/// A `status` event with the JobStatus on every change, ending after the final state. Changes
/// faster than the client reads are coalesced: it always gets the latest, not every step.
async fn job_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let updates = state.job(&id)?.subscribe();
    let stream = futures::stream::unfold(Some(updates), |updates| async move {
        let mut updates = updates?;
        // An error means the job was dropped from the registry: nothing more will come.
        updates.changed().await.ok()?;
        let status = updates.borrow_and_update().clone();
        let event = Event::default()
            .event("status")
            .json_data(&status)
            .expect("JobStatus serializes");
        let next = (!status.state.is_finished()).then_some(updates);
        Some((Ok(event), next))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn get_model(State(state): State<Arc<AppState>>) -> AppJson<ModelView> {
    AppJson(state.model.borrow().clone())
}

/// Moves the weights to host memory now, freeing the device; refused while jobs are active.
async fn offload_model(State(state): State<Arc<AppState>>) -> Result<AppJson<ModelView>, ApiError> {
    if state.model.borrow().state == ModelState::Loading {
        return Err(ApiError::NotReady);
    }
    let active = state.jobs().active();
    if active > 0 {
        return Err(ApiError::ModelBusy(format!(
            "{active} job(s) are queued or running"
        )));
    }
    let (reply_tx, reply_rx) = oneshot::channel();
    state
        .commands
        .send(Command::Offload(reply_tx))
        .map_err(|_| ApiError::Internal("the generator is not running".into()))?;
    match reply_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(OffloadError::NotIdle(e))) => return Err(ApiError::ModelBusy(e.to_string())),
        Ok(Err(e @ OffloadError::Move(_))) => return Err(ApiError::Internal(e.to_string())),
        Err(_) => return Err(ApiError::Internal("the generator stopped".into())),
    }
    tracing::info!(target: "audit", action = "offload", outcome = "done");
    Ok(AppJson(state.model.borrow().clone()))
}

async fn healthz() -> &'static str {
    "ok"
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Readiness {
    state: ModelState,
    capacity: usize,
    active: usize,
    draining: bool,
}

/// Ready once the model is in memory (host or device) and until shutdown starts.
async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, AppJson<Readiness>) {
    let model_state = state.model.borrow().state;
    let draining = state.draining.load(Ordering::SeqCst);
    let (capacity, active) = {
        let jobs = state.jobs();
        (jobs.capacity(), jobs.active())
    };
    let ready = model_state != ModelState::Loading && !draining;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        AppJson(Readiness {
            state: model_state,
            capacity,
            active,
            draining,
        }),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let text = state.metrics.encode(&state.jobs());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelView {
        ModelView {
            name: "tiny".into(),
            state: ModelState::Host,
            precision: "bf16",
            weight_bytes: 0,
            default_steps: 28,
            default_guidance: 3.5,
        }
    }

    fn request(body: serde_json::Value) -> Result<JobSpec, ApiError> {
        serde_json::from_value::<JobRequest>(body)
            .unwrap()
            .into_spec(&model())
    }

    #[test]
    fn defaults_are_filled_in() {
        let spec =
            request(json!({"id": "j1", "user": "alice", "prompt": "fox", "seed": 1})).unwrap();
        assert_eq!(
            (spec.width, spec.height, spec.steps, spec.num_images),
            (1024, 1024, 28, 1)
        );
        assert_eq!(spec.guidance, 3.5);
        assert_eq!(spec.timeout, Duration::from_secs(DEFAULT_TIMEOUT_SECONDS));
    }

    #[test]
    fn generation_parameters_get_the_pipelines_message() {
        let body = json!({"id": "j1", "user": "alice", "prompt": "fox", "seed": 1, "width": 100});
        match request(body) {
            Err(ApiError::InvalidRequest(message)) => assert_eq!(
                message,
                format!(
                    "width 100 must be a positive multiple of 16 up to {}",
                    pipeline::MAX_SIDE
                )
            ),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_rejected() {
        let base = json!({"id": "j1", "user": "alice", "prompt": "fox", "seed": 1});
        for (field, value) in [
            ("seed", json!(null)),
            ("id", json!("")),
            ("id", json!("../x")),
            ("id", json!("-x")),
            ("user", json!("")),
            ("prompt", json!("  ")),
            ("width", json!(100)),
            ("height", json!(4096)),
            ("width", json!(0)),
            ("steps", json!(0)),
            ("guidance", json!(-1.0)),
            ("numImages", json!(0)),
            ("numImages", json!(100)),
            ("timeoutSeconds", json!(0)),
        ] {
            let mut body = base.clone();
            body[field] = value.clone();
            let err = request(body).expect_err(&format!("{field}={value} must be rejected"));
            assert!(matches!(err, ApiError::InvalidRequest(_)), "{field}: {err}");
        }
    }
}
