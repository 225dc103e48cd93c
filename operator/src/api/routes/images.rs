//! A user's image history, read through the tenant's outputs server (found through the
//! EndpointSlices of its `outputs` Service), so it outlives job objects and inference pods.
//!
//! The `{user}` path segment sent to the outputs server is always the authenticated caller's
//! (admins may pass `?user=`), and file names are checked against the output naming scheme
//! before anything is forwarded: a user can neither list nor guess-download another user's
//! images.

use std::sync::Arc;

use atelier_crds::names::{HTTP_PORT_NAME, OUTPUTS, user_name_problem};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{TenantAccess, query_value, tenant_access};
use crate::api::AppState;
use crate::api::auth::Caller;
use crate::api::authz;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::endpoints::ready_endpoints;

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct ImagesQuery {
    /// Page size, 1–200 (default 24).
    pub limit: Option<u32>,
    /// `nextBefore` of the previous page.
    pub before: Option<String>,
    /// Whose images (tenant admins only).
    pub user: Option<String>,
}

/// One image in a user's history.
#[derive(Serialize, Deserialize, ToSchema, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct ImageView {
    pub file: String,
    /// Where the API serves the PNG.
    #[serde(default)]
    pub url: String,
    /// The generation parameters recorded next to the image (prompt, seed, steps, guidance,
    /// width, height, model, jobId...), or null when missing.
    #[schema(value_type = Object)]
    pub metadata: Option<serde_json::Value>,
    pub bytes: u64,
    pub created_at: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ImagePage {
    /// Newest first.
    pub images: Vec<ImageView>,
    /// Pass as `before` for the next page; null on the last page.
    pub next_before: Option<String>,
}

/// Whether `name` is an output file name, `<yyyymmdd>_<HHMMSS>_<seed>_<job8>[_<n>].png|json`
/// (the inference server's naming scheme). Nothing else is forwarded, so no `..`, `/`, hidden
/// or foreign file can be asked for.
pub fn is_output_file(name: &str) -> bool {
    let Some(stem) = name
        .strip_suffix(".png")
        .or_else(|| name.strip_suffix(".json"))
    else {
        return false;
    };
    let digits = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    let job = |s: &str| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric());
    match stem.split('_').collect::<Vec<_>>().as_slice() {
        [date, time, seed, job8] => {
            digits(date, 8, 8) && digits(time, 6, 6) && digits(seed, 1, 20) && job(job8)
        }
        [date, time, seed, job8, index] => {
            digits(date, 8, 8)
                && digits(time, 6, 6)
                && digits(seed, 1, 20)
                && job(job8)
                && digits(index, 1, 10)
        }
        _ => false,
    }
}

/// Whose history the request is about.
fn history_user<'a>(
    caller: &'a Caller,
    access: &TenantAccess,
    requested: Option<&'a str>,
) -> ApiResult<&'a str> {
    if let Some(problem) = requested.and_then(user_name_problem) {
        return Err(ApiError::InvalidRequest(format!(
            "`user` {problem}: not a user id"
        )));
    }
    authz::target_user(access.role, caller.user(), requested)
        .map_err(|message| super::deny(caller, &access.name, "images", "AdminRequired", message))
}

/// `http://<ip:port>/v1/outputs/<user>[/<file>]` on one ready outputs pod.
async fn outputs_url(
    state: &AppState,
    access: &TenantAccess,
    user: &str,
    file: Option<&str>,
) -> ApiResult<reqwest::Url> {
    let endpoints =
        ready_endpoints(&state.kube, &access.namespace, OUTPUTS, HTTP_PORT_NAME).await?;
    let Some(endpoint) = endpoints.first() else {
        return Err(ApiError::unavailable(
            "OutputsUnavailable",
            format!(
                "the image history of tenant {:?} is not reachable right now",
                access.name
            ),
        ));
    };
    reqwest::Url::parse(&format!(
        "http://{}{}",
        endpoint.address,
        outputs_path(user, file)
    ))
    .map_err(|e| ApiError::Internal(e.to_string()))
}

/// `/v1/outputs/<user>[/<file>]`, every byte of `user` outside the URL-safe set
/// percent-encoded here: the URL parser would drop `.`/`..` segments and strip TAB, CR and LF,
/// so two users could share a path. `file` is an output file name ([`is_output_file`]).
fn outputs_path(user: &str, file: Option<&str>) -> String {
    let mut path = String::from("/v1/outputs/");
    for byte in user.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~@".contains(&byte) {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("%{byte:02X}"));
        }
    }
    if let Some(file) = file {
        path.push('/');
        path.push_str(file);
    }
    path
}

fn unreachable(error: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(
        "OutputsUnavailable",
        format!("the outputs server did not answer: {error}"),
    )
}

/// List my images
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/images", tag = "images",
    params(("tenant" = String, Path, description = "Tenant name"), ImagesQuery),
    responses(
        (status = 200, description = "A page of the user's history, newest first", body = ImagePage),
        (status = 400, description = "Bad `before`", body = ErrorBody),
        (status = 403, description = "Not a member, or ?user= without admin role", body = ErrorBody),
        (status = 503, description = "Outputs server unavailable", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(tenant): Path<String>,
    Query(query): Query<ImagesQuery>,
) -> ApiResult<Json<ImagePage>> {
    let access = tenant_access(&state, &caller, &tenant, "images").await?;
    let user = history_user(&caller, &access, query.user.as_deref())?;
    if query
        .before
        .as_deref()
        .is_some_and(|before| !is_output_file(before))
    {
        return Err(ApiError::InvalidRequest(
            "before must be an image file name (nextBefore of the previous page)".into(),
        ));
    }
    let mut url = outputs_url(&state, &access, user, None).await?;
    {
        let mut pairs = url.query_pairs_mut();
        pairs.append_pair(
            "limit",
            &query.limit.unwrap_or(24).clamp(1, 200).to_string(),
        );
        if let Some(before) = &query.before {
            pairs.append_pair("before", before);
        }
    }
    let response = state
        .send_to_pod(&access.namespace, state.http.get(url))
        .await
        .map_err(unreachable)?;
    if !response.status().is_success() {
        return Err(ApiError::unavailable(
            "OutputsUnavailable",
            format!("the outputs server answered {}", response.status()),
        ));
    }
    let mut page: ImagePage = response.json().await.map_err(unreachable)?;
    page.images.retain(|image| is_output_file(&image.file));
    for image in &mut page.images {
        image.url = format!(
            "/api/v1/tenants/{tenant}/images/{}?user={}",
            image.file,
            query_value(user)
        );
    }
    Ok(Json(page))
}

#[derive(Deserialize, IntoParams, Debug, Default)]
#[into_params(parameter_in = Query)]
pub struct ImageQuery {
    /// Whose image (tenant admins only).
    pub user: Option<String>,
}

/// Download an image
///
/// The PNG (or its `.json` metadata) from the caller's history.
#[utoipa::path(
    get, path = "/api/v1/tenants/{tenant}/images/{file}", tag = "images",
    params(("tenant" = String, Path, description = "Tenant name"), ("file" = String, Path, description = "File name"), ImageQuery),
    responses(
        (status = 200, description = "The file", content_type = "image/png", body = Vec<u8>),
        (status = 400, description = "Not an output file name", body = ErrorBody),
        (status = 404, description = "No such image in the user's history", body = ErrorBody),
    ),
    security(("bearer" = []), ("session" = []))
)]
pub async fn file(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((tenant, file)): Path<(String, String)>,
    Query(query): Query<ImageQuery>,
) -> ApiResult<Response> {
    let access = tenant_access(&state, &caller, &tenant, "images").await?;
    let user = history_user(&caller, &access, query.user.as_deref())?;
    if !is_output_file(&file) {
        return Err(ApiError::InvalidRequest("not an image file name".into()));
    }
    let url = outputs_url(&state, &access, user, Some(&file)).await?;
    let response = state
        .send_to_pod(&access.namespace, state.http.get(url))
        .await
        .map_err(unreachable)?;
    match response.status() {
        status if status.is_success() => {}
        reqwest::StatusCode::NOT_FOUND => {
            return Err(ApiError::NotFound(format!("no image {file:?}")));
        }
        status => {
            return Err(ApiError::unavailable(
                "OutputsUnavailable",
                format!("the outputs server answered {status}"),
            ));
        }
    }
    let content_type = if file.ends_with(".png") {
        "image/png"
    } else {
        "application/json"
    };
    let bytes = response.bytes().await.map_err(unreachable)?;
    let mut answer = (StatusCode::OK, Body::from(bytes)).into_response();
    let headers = answer.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Images never change once written; they are private to the user.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400, immutable"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_paths_keep_users_apart() {
        assert_eq!(
            outputs_path("alice@example.com", Some("x.png")),
            "/v1/outputs/alice@example.com/x.png"
        );
        // Pairs that the URL parser would make one path: each stays its own after parsing.
        let pairs = [
            ("alice@example.com", "al\tice@example.com"),
            ("alice@example.com", "alice@example.com\n"),
            ("alice@example.com", "al\r\nice@example.com"),
            ("alice@example.com", "alice%40example.com"),
            ("alice", "alice/."),
            ("bob", "alice/../bob"),
            ("a", ".\t."),
            ("a b", "a+b"),
        ];
        let parsed = |user: &str| {
            reqwest::Url::parse(&format!(
                "http://198.18.0.1:8080{}",
                outputs_path(user, None)
            ))
            .unwrap()
            .path()
            .to_string()
        };
        for (one, other) in pairs {
            assert_ne!(parsed(one), parsed(other), "{one:?} and {other:?}");
            assert_eq!(
                parsed(other).matches('/').count(),
                3,
                "{other:?} stays one segment"
            );
        }
    }

    #[test]
    fn only_output_file_names_pass() {
        for good in [
            "20261129_223501_42_1a2b3c4d.png",
            "20261129_223501_42_1a2b3c4d.json",
            "20261129_223501_0_ab_3.png",
        ] {
            assert!(is_output_file(good), "{good}");
        }
        for bad in [
            "",
            "../x.png",
            "..%2F20261129_223501_42_1a2b3c4d.png",
            "/etc/passwd",
            ".20261129_223501_42_1a2b3c4d.png",
            "20261129_223501_42_1a2b3c4d.png/..",
            "20261129_223501_42_1a2b3c4d.txt",
            "20261129_223501_42_1a2b3c4d5.png",
            "2026112_223501_42_1a2b3c4d.png",
            "20261129_223501_42_1a-2b.png",
            "20261129_223501_42.png",
        ] {
            assert!(!is_output_file(bad), "{bad}");
        }
    }
}
