//! The HTTP API and web page (`atelier-operator api`).
//!
//! - `/api/v1/...`: REST (see [`routes`]), OpenAPI document at `/api/openapi.json`.
//! - `/auth/...`: the browser's OIDC login ([`auth`]).
//! - `/`: the web page ([`web`]); `/healthz`, `/readyz`, `/metrics`.
//!
//! The API holds no state of its own beyond browser sessions and rate-limit budgets (both in
//! memory): jobs, quotas and presets live in Kubernetes objects, images on the tenant volume.

pub mod audit;
pub mod auth;
pub mod authz;
pub mod error;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod streams;
pub mod tenants;
pub mod web;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::pod_token::PodTokens;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ipnet::IpNet;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::auth::claims::ClaimNames;
use self::auth::client::ProxyTrust;
use self::auth::jwt::{JwtValidator, TokenRules, check_audience};
use self::auth::oidc::{DiscoveredJwks, Oidc, OidcSettings};
use self::auth::pending::PendingLogins;
use self::auth::session::SessionStore;
use self::error::ApiError;
use self::metrics::Metrics;
use self::ratelimit::RateLimiter;
use self::routes::{admin, generations, images, me, presets};

/// Largest request body accepted (job parameters and presets are small).
const BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Time limit of every request but the event streams.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Address to listen on (pods pass `$(POD_IP):8080`).
    #[arg(long, env = "ATELIER_API_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// OpenID provider (issuer URL, exactly as in its tokens' `iss`).
    #[arg(long, env = "ATELIER_OIDC_ISSUER_URL")]
    pub issuer_url: String,
    /// OAuth client id of the web page's login.
    #[arg(long, env = "ATELIER_OIDC_CLIENT_ID")]
    pub client_id: String,
    /// OAuth client secret (confidential client); prefer the environment variable.
    #[arg(long, env = "ATELIER_OIDC_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,
    /// Expected `aud` of bearer access tokens: the API's own audience (resource) at the
    /// provider, never the login client's id (ID tokens carry that).
    #[arg(long, env = "ATELIER_API_AUDIENCE")]
    pub audience: String,
    /// External base URL of the API (for redirect URIs), e.g. `https://atelier.example.com`.
    #[arg(long, env = "ATELIER_PUBLIC_URL")]
    pub public_url: String,
    /// Claim holding the user's groups.
    #[arg(long, env = "ATELIER_GROUPS_CLAIM", default_value = "groups")]
    pub groups_claim: String,
    /// Claim holding the user id that jobs and images are filed under (`email` or `sub`, ...).
    #[arg(long, env = "ATELIER_USER_CLAIM", default_value = "email")]
    pub user_claim: String,
    /// Members of this group are admins of every tenant.
    #[arg(long, env = "ATELIER_PLATFORM_ADMIN_GROUP")]
    pub platform_admin_group: Option<String>,
    /// Header carrying the client address set by a trusted reverse proxy (e.g.
    /// `X-Forwarded-For`); without it the peer address is used.
    #[arg(
        long,
        env = "ATELIER_TRUSTED_PROXY_HEADER",
        requires = "trusted_proxy_cidrs"
    )]
    pub trusted_proxy_header: Option<HeaderName>,
    /// Addresses of the reverse proxies (comma-separated CIDRs): only their connections'
    /// `--trusted-proxy-header` is believed.
    #[arg(
        long,
        env = "ATELIER_TRUSTED_PROXY_CIDRS",
        value_delimiter = ',',
        requires = "trusted_proxy_header"
    )]
    pub trusted_proxy_cidrs: Vec<IpNet>,
    /// Session cookies without `Secure` (plain-http local development only).
    #[arg(long, env = "ATELIER_INSECURE_COOKIES")]
    pub insecure_cookies: bool,
    /// Requests one user may make per minute (bursts up to this many).
    #[arg(long, env = "ATELIER_RATE_LIMIT_PER_MINUTE", default_value_t = NonZeroU32::new(300).expect("non-zero"))]
    pub rate_limit_per_minute: NonZeroU32,
    /// OAuth scopes of the browser login.
    #[arg(
        long,
        env = "ATELIER_OIDC_SCOPES",
        default_value = "openid email profile groups",
        value_delimiter = ' '
    )]
    pub scopes: Vec<String>,
    /// Seconds after which the provider's signing keys are fetched again (a removed key stops
    /// being trusted within this time; new keys are fetched at once when a token names one).
    #[arg(long, env = "ATELIER_JWKS_MAX_AGE_SECONDS", default_value_t = 300)]
    pub jwks_max_age_seconds: u64,
}

/// Settings that handlers consult.
#[derive(Clone, Debug)]
pub struct Settings {
    pub secure_cookies: bool,
    /// Where the page is served; login return targets must stay on its origin.
    pub public_url: reqwest::Url,
    pub proxy: ProxyTrust,
    pub platform_admin_group: Option<String>,
}

/// Everything a request may need.
pub struct AppState {
    pub kube: kube::Client,
    pub tenants: tenants::TenantCache,
    pub settings: Settings,
    pub oidc: Arc<Oidc>,
    pub tokens: JwtValidator<DiscoveredJwks>,
    pub sessions: SessionStore,
    pub pending_logins: PendingLogins,
    pub streams: streams::StreamSlots,
    pub limiter: RateLimiter,
    pub metrics: Metrics,
    /// Client for the tenants' outputs and inference pods, with [`AppState::send_to_pod`].
    pub http: reqwest::Client,
    /// The tokens those pods require.
    pub pod_tokens: PodTokens,
    /// Content-Security-Policy of the page (its form may go on to the provider at logout).
    csp: HeaderValue,
}

impl AppState {
    pub fn new(args: &ApiArgs, kube: kube::Client) -> anyhow::Result<Self> {
        check_audience(&args.audience, &args.client_id).map_err(anyhow::Error::msg)?;
        let public_url = args.public_url.trim_end_matches('/').to_string();
        let claims = ClaimNames {
            user: args.user_claim.clone(),
            groups: args.groups_claim.clone(),
        };
        let oidc = Arc::new(Oidc::new(OidcSettings {
            issuer: args.issuer_url.clone(),
            client_id: args.client_id.clone(),
            client_secret: args.client_secret.clone(),
            redirect_url: format!("{public_url}/auth/callback"),
            post_logout_url: format!("{public_url}/"),
            scopes: args.scopes.clone(),
            claims: claims.clone(),
        })?);
        let rules = TokenRules {
            issuer: args.issuer_url.clone(),
            audience: args.audience.clone(),
            claims,
            jwks_max_age: Duration::from_secs(args.jwks_max_age_seconds.max(1)),
        };
        let issuer_origin = reqwest::Url::parse(&args.issuer_url)?
            .origin()
            .ascii_serialization();
        let csp = format!(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self' {issuer_origin}"
        );
        Ok(Self {
            tenants: tenants::TenantCache::spawn(kube.clone()),
            pod_tokens: PodTokens::new(kube.clone()),
            kube,
            settings: Settings {
                secure_cookies: !args.insecure_cookies,
                public_url: reqwest::Url::parse(&format!("{public_url}/"))?,
                proxy: ProxyTrust {
                    header: args.trusted_proxy_header.clone(),
                    proxies: args.trusted_proxy_cidrs.clone(),
                },
                platform_admin_group: args.platform_admin_group.clone(),
            },
            tokens: JwtValidator::new(rules, DiscoveredJwks(oidc.clone())),
            oidc,
            sessions: SessionStore::default(),
            pending_logins: PendingLogins::default(),
            streams: streams::StreamSlots::default(),
            limiter: RateLimiter::per_minute(args.rate_limit_per_minute),
            metrics: Metrics::default(),
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            csp: HeaderValue::from_str(&csp)?,
        })
    }

    /// Sends `request` to a pod of tenant namespace `namespace` with the tenant's token; the
    /// error says what went wrong, for the caller's own message.
    pub async fn send_to_pod(
        &self,
        namespace: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, String> {
        let token = self
            .pod_tokens
            .get(namespace)
            .await
            .map_err(|e| e.to_string())?;
        let response = request
            .bearer_auth(&*token)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            self.pod_tokens.forget(namespace);
        }
        Ok(response)
    }
}

/// The REST routes and their OpenAPI document.
fn rest() -> (
    Router<Arc<AppState>>,
    Router<Arc<AppState>>,
    utoipa::openapi::OpenApi,
) {
    let (bounded, mut doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(me::me))
        .routes(routes!(generations::create, generations::list))
        .routes(routes!(generations::get, generations::cancel))
        .routes(routes!(images::list))
        .routes(routes!(images::file))
        .routes(routes!(admin::status))
        .routes(routes!(admin::reset_quota))
        .routes(routes!(admin::restart))
        .routes(routes!(admin::offload))
        .routes(routes!(admin::usage))
        .routes(routes!(presets::list))
        .routes(routes!(presets::save_mine, presets::delete_mine))
        .routes(routes!(presets::save_tenant, presets::delete_tenant))
        .split_for_parts();
    // Event streams last as long as the job: they stay outside the request timeout.
    let (streams, streams_doc) = OpenApiRouter::new()
        .routes(routes!(generations::events))
        .split_for_parts();
    doc.merge(streams_doc);
    (bounded, streams, doc)
}

/// The OpenAPI document, as served.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    rest().2
}

pub fn router(state: Arc<AppState>) -> Router {
    let (bounded, streams, doc) = rest();
    let doc = Arc::new(doc);
    let bounded = bounded
        .route(
            "/api/openapi.json",
            get(move || async move { Json(doc.as_ref().clone()) }),
        )
        .route("/auth/login", get(auth::login))
        .route("/auth/callback", get(auth::callback))
        .route("/auth/session", get(auth::session_info))
        .route("/auth/logout", post(auth::logout))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::serve))
        .route("/", get(web::index))
        .route("/static/{file}", get(web::asset))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    bounded
        .merge(streams)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            security_headers,
        ))
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT_BYTES))
        .with_state(state)
}

/// Ready when the Kubernetes API answers: without it no request can be served. The OpenID
/// provider is not checked, so that its outage does not take the API (and bearer callers with
/// cached keys) down with it.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match tokio::time::timeout(Duration::from_secs(3), state.kube.apiserver_version()).await {
        Ok(Ok(_)) => "ready".into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the Kubernetes API is not answering",
        )
            .into_response(),
    }
}

async fn security_headers(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CONTENT_SECURITY_POLICY, state.csp.clone());
    response
}

pub async fn run(args: ApiArgs) -> anyhow::Result<()> {
    let kube = kube::Client::try_default().await?;
    let state = Arc::new(AppState::new(&args, kube)?);
    let forgetter = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            forgetter.limiter.forget_idle();
        }
    });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, issuer = %args.issuer_url, "API listening");
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await?;
    Ok(())
}

async fn shutdown() {
    let terminate = async {
        if let Ok(mut signal) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            signal.recv().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ApiArgs;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        api: ApiArgs,
    }

    fn parse(extra: &[&str]) -> Result<ApiArgs, clap::Error> {
        let required = [
            "api",
            "--issuer-url=https://idp.example.com",
            "--client-id=atelier",
            "--audience=https://atelier.example.com/api",
            "--public-url=https://atelier.example.com",
        ];
        Command::try_parse_from(required.iter().chain(extra)).map(|command| command.api)
    }

    #[test]
    fn a_proxy_header_needs_the_proxies_addresses() {
        assert!(parse(&["--trusted-proxy-header=X-Forwarded-For"]).is_err());
        assert!(parse(&["--trusted-proxy-cidrs=10.0.0.0/8"]).is_err());
        let args = parse(&[
            "--trusted-proxy-header=X-Forwarded-For",
            "--trusted-proxy-cidrs=10.0.0.0/8,192.0.2.1/32",
        ])
        .unwrap();
        assert_eq!(args.trusted_proxy_cidrs.len(), 2);
        assert!(parse(&[]).unwrap().trusted_proxy_cidrs.is_empty());
    }
}
