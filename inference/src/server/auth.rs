//! The tenant's credential on the job and history APIs.
//!
//! The operator creates one random token per tenant (the Secret `atelier-api-token` of the
//! tenant namespace), mounts it into the tenant's pods and sends it from the dispatcher and the
//! API. With it, reaching a pod's address is not enough to submit jobs, cancel them, unload the
//! model or read anyone's images: NetworkPolicies are a second fence, not the only one. Health,
//! readiness and metrics stay open for the kubelet and Prometheus.

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The token requests must carry as `Authorization: Bearer <token>`.
#[derive(Clone)]
pub struct ApiToken(Arc<str>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// Reads the token from `path` (a mounted Secret key), without surrounding whitespace.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(std::io::Error::other(format!(
                "{}: an API token of at least 16 characters is needed",
                path.display()
            )));
        }
        Ok(Self(token.into()))
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    fn matches(&self, presented: &str) -> bool {
        let (expected, presented) = (self.0.as_bytes(), presented.as_bytes());
        expected.len() == presented.len()
            && expected
                .iter()
                .zip(presented)
                .fold(0u8, |differ, (a, b)| differ | (a ^ b))
                == 0
    }
}

/// `routes` answering 401 to requests without the token; unchanged when there is none (a
/// server started by hand, or the tests of the job API).
pub fn protect<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    token: Option<ApiToken>,
) -> Router<S> {
    match token {
        Some(token) => routes.route_layer(middleware::from_fn_with_state(token, require_token)),
        None => routes,
    }
}

async fn require_token(State(token): State<ApiToken>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if presented.is_some_and(|presented| token.matches(presented)) {
        return next.run(request).await;
    }
    let body = json!({"error": {
        "reason": "Unauthorized",
        "message": "this API needs the tenant's token (Authorization: Bearer)",
    }});
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_token_matches() {
        let token = ApiToken("0123456789abcdef-token".into());
        assert!(token.matches("0123456789abcdef-token"));
        for other in [
            "",
            "0123456789abcdef-toke",
            "0123456789abcdef-tokenX",
            "1123456789abcdef-token",
        ] {
            assert!(!token.matches(other), "{other:?}");
        }
    }

    #[test]
    fn a_short_or_missing_token_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(ApiToken::read(&path).is_err());
        std::fs::write(&path, "short\n").unwrap();
        assert!(ApiToken::read(&path).is_err());
        std::fs::write(&path, "a-long-enough-token-value\n").unwrap();
        assert!(
            ApiToken::read(&path)
                .unwrap()
                .matches("a-long-enough-token-value")
        );
    }
}
