//! The one error type of the API. Every failure answers with the same JSON body,
//! `{"error": {"reason": "...", "message": "..."}}`, so that the page and scripts can switch on a
//! stable `reason` and show the `message` to a person.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Body of every error answer.
#[derive(Serialize, ToSchema, Debug)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct ErrorDetail {
    /// Stable machine-readable reason, e.g. `QuotaExceeded`.
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials, or credentials that failed validation (`reason` says which check).
    #[error("{message}")]
    Unauthenticated {
        reason: &'static str,
        message: String,
    },
    /// Authenticated, but not allowed (`reason` says why, e.g. `NotAMember`).
    #[error("{message}")]
    Forbidden {
        reason: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("too many requests; retry in {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    /// A dependency is down: the OpenID provider, the tenant's outputs or inference pods.
    #[error("{message}")]
    Unavailable {
        reason: &'static str,
        message: String,
    },
    #[error("Kubernetes API: {0}")]
    Kubernetes(#[source] kube::Error),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Unauthenticated {
            reason,
            message: message.into(),
        }
    }

    pub fn forbidden(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Forbidden {
            reason,
            message: message.into(),
        }
    }

    pub fn unavailable(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Unavailable {
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::QuotaExceeded(_) | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Kubernetes(error) => kube_status(error),
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthenticated { reason, .. }
            | Self::Forbidden { reason, .. }
            | Self::Unavailable { reason, .. } => reason,
            Self::NotFound(_) => "NotFound",
            Self::InvalidRequest(_) => "InvalidRequest",
            Self::Conflict(_) => "Conflict",
            Self::QuotaExceeded(_) => "QuotaExceeded",
            Self::RateLimited { .. } => "RateLimited",
            Self::Kubernetes(error) => match kube_status(error) {
                StatusCode::NOT_FOUND => "NotFound",
                StatusCode::CONFLICT => "Conflict",
                StatusCode::BAD_REQUEST => "InvalidRequest",
                StatusCode::SERVICE_UNAVAILABLE => "KubernetesUnavailable",
                _ => "KubernetesError",
            },
            Self::Internal(_) => "Internal",
        }
    }
}

/// What a Kubernetes API failure means for our caller: validation failures (422, e.g. a CEL
/// rule of the CRD) are the caller's bad request; transport failures mean the cluster is down.
fn kube_status(error: &kube::Error) -> StatusCode {
    match error {
        kube::Error::Api(status) => match status.code {
            404 => StatusCode::NOT_FOUND,
            409 => StatusCode::CONFLICT,
            400 | 422 => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        },
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<kube::Error> for ApiError {
    fn from(error: kube::Error) -> Self {
        Self::Kubernetes(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(reason = self.reason(), error = %self, "request failed");
        }
        let message = match &self {
            // The API server's message explains validation failures; other Kubernetes errors
            // could carry internal detail, so they get a generic message.
            Self::Kubernetes(kube::Error::Api(status))
                if matches!(status.code, 400 | 404 | 409 | 422) =>
            {
                status.message.clone()
            }
            Self::Kubernetes(_) => {
                "the Kubernetes API is not answering; try again shortly".to_string()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                reason: self.reason().to_string(),
                message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        match &self {
            Self::RateLimited {
                retry_after_seconds,
            } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            Self::Unauthenticated { .. } => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(error: ApiError) -> (StatusCode, serde_json::Value, Option<String>) {
        let response = error.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap(), retry)
    }

    #[tokio::test]
    async fn errors_have_stable_reasons_and_json_bodies() {
        let (status, body, _) =
            body_of(ApiError::QuotaExceeded("50 of 50 images used today".into())).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["error"]["reason"], "QuotaExceeded");
        assert_eq!(body["error"]["message"], "50 of 50 images used today");

        let (status, body, retry) = body_of(ApiError::RateLimited {
            retry_after_seconds: 7,
        })
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["error"]["reason"], "RateLimited");
        assert_eq!(retry.as_deref(), Some("7"));

        let (status, body, _) = body_of(ApiError::forbidden("NotAMember", "not a member")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"]["reason"], "NotAMember");
    }

    #[tokio::test]
    async fn kubernetes_errors_map_to_http_meaning() {
        let invalid = kube::Error::Api(
            kube::core::Status::failure("spec.width: must be a multiple of 16", "Invalid")
                .with_code(422)
                .boxed(),
        );
        let (status, body, _) = body_of(ApiError::from(invalid)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["reason"], "InvalidRequest");
        assert_eq!(
            body["error"]["message"],
            "spec.width: must be a multiple of 16"
        );

        let forbidden = kube::Error::Api(
            kube::core::Status::failure("secret detail", "Forbidden")
                .with_code(403)
                .boxed(),
        );
        let (status, body, _) = body_of(ApiError::from(forbidden)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("secret")
        );
    }
}
