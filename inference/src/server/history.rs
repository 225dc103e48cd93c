//! HTTP handlers of `serve-outputs`: a tenant's image history, read straight from the outputs
//! volume, with no model loaded (it keeps history reachable while inference is scaled to zero).
//!
//! Isolation rests on two things from `outputs`: the user in the URL goes through the same
//! injective `safe_user_dir` the writer used, and file names must match the output pattern, so
//! no request can name a path outside that user's directory. Who may ask for which user is the
//! operator's API's decision; this server only answers requests with the tenant's token
//! ([`auth`]), and only the platform namespace can reach it.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use super::api::{ApiError, AppJson};
use super::auth::{self, ApiToken};
use super::metrics::{OutputsMetrics, OutputsRequest};
use crate::outputs::{self, DEFAULT_LIST_LIMIT, Listing};

pub struct HistoryState {
    pub outputs_dir: PathBuf,
    pub metrics: OutputsMetrics,
}

pub fn router(state: Arc<HistoryState>, token: Option<ApiToken>) -> Router {
    let v1 = Router::new()
        .route("/v1/outputs/{user}", get(list))
        .route("/v1/outputs/{user}/{file}", get(file));
    auth::protect(v1, token)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `Query` whose rejections answer in the error format.
#[derive(FromRequestParts)]
#[from_request(via(Query), rejection(ApiError))]
struct AppQuery<T>(T);

#[derive(Deserialize)]
struct ListParams {
    limit: Option<usize>,
    before: Option<String>,
}

/// Runs blocking file-system work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, outputs::Error> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("file task failed: {e}")))?
        .map_err(ApiError::from)
}

async fn list(
    State(state): State<Arc<HistoryState>>,
    Path(user): Path<String>,
    AppQuery(params): AppQuery<ListParams>,
) -> Result<AppJson<Listing>, ApiError> {
    state.metrics.request(OutputsRequest::List);
    let root = state.outputs_dir.clone();
    let limit = params.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    let listing =
        blocking(move || outputs::list_images(&root, &user, limit, params.before.as_deref()))
            .await?;
    Ok(AppJson(listing))
}

async fn file(
    State(state): State<Arc<HistoryState>>,
    Path((user, file)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    state.metrics.request(OutputsRequest::File);
    let root = state.outputs_dir.clone();
    let (data, kind) = blocking(move || outputs::read_output(&root, &user, &file)).await?;
    // Images never change once written (no-clobber), so clients may cache them for good.
    Ok((
        [
            (header::CONTENT_TYPE, kind.content_type()),
            (
                header::CACHE_CONTROL,
                "private, max-age=31536000, immutable",
            ),
        ],
        data,
    ))
}

/// Ready while the outputs volume is mounted and readable.
async fn readyz(State(state): State<Arc<HistoryState>>) -> impl IntoResponse {
    let ready = tokio::fs::metadata(&state.outputs_dir)
        .await
        .is_ok_and(|m| m.is_dir());
    let (code, status) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (code, AppJson(json!({"state": status})))
}

async fn metrics(State(state): State<Arc<HistoryState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
