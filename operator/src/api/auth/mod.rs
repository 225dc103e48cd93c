//! Authentication: who is calling. Two ways in, one [`Caller`]:
//!
//! - `Authorization: Bearer <JWT>` (scripts, `curl`): validated by [`jwt`] on every request.
//! - The browser's session cookie, set by the OIDC login in [`oidc`]; cookie-authenticated
//!   requests that change state must also carry the session's CSRF token in `X-CSRF-Token`.
//!
//! Failures are answered 401 (403 for a CSRF failure), counted by reason and audited.

pub mod claims;
pub mod client;
pub mod jwt;
pub mod oidc;
pub mod pending;
pub mod session;

use std::net::IpAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use self::jwt::TokenError;
use self::pending::PENDING_TTL;
use self::session::{SESSION_TTL, Session};
use super::AppState;
use super::audit::{Event, Outcome};
use super::authz::Identity;
use super::error::ApiError;

/// Header that carries the CSRF token of a cookie session.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// An authenticated caller of the REST API.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: Identity,
    /// The client's address (see [`client::ProxyTrust`]); `None` when a trusted proxy did not
    /// say.
    pub client: Option<IpAddr>,
    /// The browser session the request came with; `None` for bearer tokens.
    pub session: Option<String>,
}

impl Caller {
    pub fn user(&self) -> &str {
        &self.identity.user
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let client = state.settings.proxy.client_of(parts);
        match authenticate(parts, state).await {
            Ok((identity, session)) => {
                if let Err(retry_after_seconds) = state.limiter.check(&identity.user) {
                    state.metrics.rate_limited.inc();
                    return Err(ApiError::RateLimited {
                        retry_after_seconds,
                    });
                }
                Ok(Caller {
                    identity,
                    client,
                    session,
                })
            }
            Err(error) => {
                state.metrics.auth_failure(error.reason());
                Event::new("authenticate", Outcome::Denied)
                    .client(client)
                    .reason(error.reason())
                    .object(parts.uri.path())
                    .emit();
                Err(error)
            }
        }
    }
}

/// The caller's identity, and the session id when it came with a cookie.
async fn authenticate(
    parts: &Parts,
    state: &AppState,
) -> Result<(Identity, Option<String>), ApiError> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthenticated(
                    "malformed_authorization",
                    "expected `Authorization: Bearer <token>`",
                )
            })?;
        let identity = state.tokens.validate(token).await.map_err(token_error)?;
        return Ok((identity, None));
    }
    let Some(id) = session::cookie_value(&parts.headers, state.settings.secure_cookies) else {
        return Err(ApiError::unauthenticated(
            "missing_credentials",
            "log in, or send `Authorization: Bearer <token>`",
        ));
    };
    let Some(session) = state.sessions.get(&id) else {
        return Err(ApiError::unauthenticated(
            "session_expired",
            "your session has expired; log in again",
        ));
    };
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let sent = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !session::constant_time_eq(sent, &session.csrf_token) {
            return Err(ApiError::forbidden(
                "csrf_failed",
                "missing or wrong X-CSRF-Token header",
            ));
        }
    }
    Ok((session.identity, Some(id)))
}

fn token_error(error: TokenError) -> ApiError {
    match error {
        TokenError::KeysUnavailable(message) => ApiError::unavailable(
            "provider_unavailable",
            format!("the identity provider cannot be reached to check tokens: {message}"),
        ),
        other => ApiError::unauthenticated(other.reason(), other.to_string()),
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    #[serde(rename = "returnTo")]
    return_to: Option<String>,
}

/// Where to send the browser after login: `requested` resolved against the public URL, when
/// it stays on the public URL's origin; else the page. An open redirect would let a phishing
/// link bounce through our login. The result is absolute: a path alone such as `//evil` (what
/// `/.//evil` resolves to) would leave the origin. White space and control characters are
/// refused before parsing, since browsers drop them (`/\t/evil.example.com` is `//evil...`).
fn return_target(public_url: &reqwest::Url, requested: Option<&str>) -> String {
    let home = public_url.as_str().to_string();
    let Some(requested) = requested else {
        return home;
    };
    if requested
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
        || requested.contains('\\')
    {
        return home;
    }
    match public_url.join(requested) {
        Ok(target) if target.origin() == public_url.origin() => target.to_string(),
        _ => home,
    }
}

fn with_cookie(mut response: Response, cookie: String) -> Response {
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /auth/login`: starts the authorization-code flow.
pub async fn login(State(state): State<Arc<AppState>>, parts: Parts) -> Response {
    let query: Option<Query<LoginQuery>> = Query::try_from_uri(&parts.uri).ok();
    let requested = query.and_then(|Query(q)| q.return_to);
    let return_to = return_target(&state.settings.public_url, requested.as_deref());
    let client = state.settings.proxy.client_of(&parts);
    match state.oidc.begin(return_to).await {
        Ok((url, pending)) => match state.pending_logins.start(client, pending) {
            Ok(id) => {
                let cookie =
                    session::set_cookie(state.settings.secure_cookies, Some(&id), PENDING_TTL);
                with_cookie(Redirect::to(&url).into_response(), cookie)
            }
            Err(pending::TooManyFromClient) => {
                Event::new("login", Outcome::Denied)
                    .client(client)
                    .reason("too_many_logins")
                    .emit();
                ApiError::RateLimited {
                    retry_after_seconds: PENDING_TTL.as_secs(),
                }
                .into_response()
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot start a login");
            Event::new("login", Outcome::Failure)
                .client(client)
                .reason(error.reason())
                .emit();
            Redirect::to(&format!("/?error={}", error.reason())).into_response()
        }
    }
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    /// RFC 9207: the issuer that answered, against mix-up attacks.
    iss: Option<String>,
}

/// `GET /auth/callback`: the provider sends the browser back here with a code.
pub async fn callback(State(state): State<Arc<AppState>>, parts: Parts) -> Response {
    let client = state.settings.proxy.client_of(&parts);
    let secure = state.settings.secure_cookies;
    let fail = |reason: &str, detail: &str| {
        tracing::info!(reason, detail, "login failed");
        Event::new("login", Outcome::Failure)
            .client(client)
            .reason(reason)
            .emit();
        state.metrics.auth_failure(reason);
        let response = Redirect::to(&format!("/?error={reason}")).into_response();
        with_cookie(response, session::set_cookie(secure, None, SESSION_TTL))
    };
    let Ok(Query(query)) = Query::<CallbackQuery>::try_from_uri(&parts.uri) else {
        return fail("malformed_callback", "unparsable query");
    };
    let pending =
        session::cookie_value(&parts.headers, secure).and_then(|id| state.pending_logins.take(&id));
    let Some(pending) = pending else {
        return fail("no_login_in_progress", "no pending login for this browser");
    };
    if let Some(error) = query.error {
        // The provider's error code is a fixed vocabulary (access_denied, login_required...).
        return fail("provider_refused", &error);
    }
    if query
        .iss
        .as_ref()
        .is_some_and(|iss| *iss != state.oidc.settings().issuer)
    {
        return fail("issuer_mismatch", "the answer names another issuer");
    }
    let (Some(code), Some(returned_state)) = (query.code, query.state) else {
        return fail("malformed_callback", "code or state missing");
    };
    let return_to = pending.return_to.clone();
    match state.oidc.complete(pending, &returned_state, code).await {
        Ok(logged_in) => {
            let user = logged_in.identity.user.clone();
            let new_session = Session {
                identity: logged_in.identity,
                csrf_token: session::random_token(),
                id_token: Some(logged_in.id_token),
            };
            match state.sessions.create(new_session) {
                Ok(id) => {
                    Event::new("login", Outcome::Success)
                        .user(&user)
                        .client(client)
                        .emit();
                    with_cookie(
                        Redirect::to(&return_to).into_response(),
                        session::set_cookie(secure, Some(&id), SESSION_TTL),
                    )
                }
                Err(full) => {
                    ApiError::unavailable("too_many_sessions", full.to_string()).into_response()
                }
            }
        }
        Err(error) => fail(error.reason(), &error.to_string()),
    }
}

/// What the page learns about its login.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub authenticated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// To send back in `X-CSRF-Token` on POST/PUT/DELETE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf_token: Option<String>,
}

/// `GET /auth/session`: whether this browser is logged in, and its CSRF token. Readable only
/// by our own origin (no CORS), which is what makes the token a secret from other sites.
pub async fn session_info(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let session = session::cookie_value(&headers, state.settings.secure_cookies)
        .and_then(|id| state.sessions.get(&id));
    let info = match session {
        Some(session) => SessionInfo {
            authenticated: true,
            user: Some(session.identity.user),
            csrf_token: Some(session.csrf_token),
        },
        None => SessionInfo {
            authenticated: false,
            user: None,
            csrf_token: None,
        },
    };
    let mut response = Json(info).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The logout form: only its CSRF token matters.
struct LogoutForm {
    csrf: Option<String>,
}

/// `POST /auth/logout` (a form with the `csrf` field, or the header): ends the session here
/// and, when the provider supports it, at the provider.
pub async fn logout(
    State(state): State<Arc<AppState>>,
    parts: Parts,
    body: axum::body::Bytes,
) -> Response {
    let client = state.settings.proxy.client_of(&parts);
    let secure = state.settings.secure_cookies;
    let Some(id) = session::cookie_value(&parts.headers, secure) else {
        return Redirect::to("/").into_response();
    };
    let Some(current) = state.sessions.get(&id) else {
        return with_cookie(
            Redirect::to("/").into_response(),
            session::set_cookie(secure, None, SESSION_TTL),
        );
    };
    let form = parse_logout_form(&body);
    let sent = parts
        .headers
        .get(CSRF_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .or(form.csrf)
        .unwrap_or_default();
    if !session::constant_time_eq(&sent, &current.csrf_token) {
        Event::new("logout", Outcome::Denied)
            .user(&current.identity.user)
            .client(client)
            .reason("csrf_failed")
            .emit();
        return (StatusCode::FORBIDDEN, "missing or wrong CSRF token").into_response();
    }
    state.sessions.remove(&id);
    Event::new("logout", Outcome::Success)
        .user(&current.identity.user)
        .client(client)
        .emit();
    let target = state
        .oidc
        .logout_url(current.id_token.as_deref())
        .await
        .unwrap_or_else(|| "/".to_string());
    with_cookie(
        Redirect::to(&target).into_response(),
        session::set_cookie(secure, None, SESSION_TTL),
    )
}

fn parse_logout_form(body: &[u8]) -> LogoutForm {
    let csrf = openidconnect::url::form_urlencoded::parse(body)
        .find(|(key, _)| key == "csrf")
        .map(|(_, value)| value.into_owned());
    LogoutForm { csrf }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_targets_stay_on_the_public_origin() {
        let public: reqwest::Url = "https://atelier.example.com/".parse().unwrap();
        let home = "https://atelier.example.com/";
        let target = |requested: &str| return_target(&public, Some(requested));
        assert_eq!(
            target("/?tenant=x"),
            "https://atelier.example.com/?tenant=x"
        );
        assert_eq!(target("/a/b#c"), "https://atelier.example.com/a/b#c");
        assert_eq!(return_target(&public, None), home);
        for hostile in [
            "//evil.example.com",
            "https://evil.example.com",
            "/\\evil.example.com",
            "/\t/evil.example.com",
            "/\n/evil.example.com",
            " //evil.example.com",
            "\u{0}//evil.example.com",
            "http://atelier.example.com/",
            "https://atelier.example.com:444/",
            "javascript:alert(1)",
        ] {
            assert_eq!(target(hostile), home, "{hostile:?}");
        }
        // Resolves to the path `//evil.example.com`: only safe as an absolute URL.
        assert_eq!(
            target("/.//evil.example.com"),
            "https://atelier.example.com//evil.example.com"
        );
    }

    #[test]
    fn logout_form() {
        assert_eq!(
            parse_logout_form(b"csrf=a%2Bb&x=1").csrf.as_deref(),
            Some("a+b")
        );
        assert!(parse_logout_form(b"").csrf.is_none());
    }
}
