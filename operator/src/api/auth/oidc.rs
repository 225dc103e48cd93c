//! The browser login: OpenID Connect authorization-code flow with PKCE, `state` and `nonce`,
//! against the issuer found by discovery, and RP-initiated logout when the provider offers it.
//!
//! The provider's metadata is discovered lazily and cached for [`METADATA_MAX_AGE`]: the API
//! starts (and serves bearer tokens it can validate) while the provider is down, and a login
//! attempt then gets a clear "provider unavailable" instead of a crash loop. All back-channel
//! requests use a client that does not follow redirects (no SSRF through a redirecting
//! provider) and times out.

use std::sync::Arc;
use std::time::Duration;

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType,
    CoreGenderClaim, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
    CoreRevocableToken, CoreRevocationErrorResponse, CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AccessTokenHash, AdditionalClaims, AuthorizationCode, ClaimsVerificationError, ClientId,
    ClientSecret, CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    IdToken, IdTokenClaims, IdTokenFields, IssuerUrl, LogoutRequest, Nonce, OAuth2TokenResponse,
    PkceCodeChallenge, PkceCodeVerifier, PostLogoutRedirectUrl, ProviderMetadataWithLogout,
    RedirectUrl, Scope, StandardErrorResponse, StandardTokenResponse, TokenResponse,
    UserInfoClaims,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::RwLock;
use tokio::time::Instant;

use super::claims::{ClaimError, ClaimNames, identity_from_claims};
use super::jwt::JwksSource;
use super::pending::PendingLogin;
use crate::api::authz::Identity;

/// Metadata (and the JWKS fetched with it for ID tokens) is re-discovered after this long.
pub const METADATA_MAX_AGE: Duration = Duration::from_secs(3600);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Every claim beyond the standard ones, so that the groups and user claims can be any name.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ExtraClaims {
    #[serde(flatten)]
    pub claims: Map<String, Value>,
}

impl AdditionalClaims for ExtraClaims {}

type ExtraIdTokenFields = IdTokenFields<
    ExtraClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type ExtraTokenResponse = StandardTokenResponse<ExtraIdTokenFields, CoreTokenType>;
type ExtraIdToken = IdToken<
    ExtraClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type OidcClient = openidconnect::Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    ExtraTokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Why a login failed. `reason` labels audit events and metrics; only `Unavailable` is the
/// provider's fault.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    #[error("the identity provider refused the login: {0}")]
    Refused(String),
    #[error("the login answer does not match a login started here")]
    StateMismatch,
    #[error("the ID token is invalid: {0}")]
    InvalidIdToken(String),
    #[error("{0}")]
    BadIdentity(ClaimError),
}

impl LoginError {
    pub fn reason(&self) -> &'static str {
        match self {
            LoginError::Unavailable(_) => "provider_unavailable",
            LoginError::Refused(_) => "provider_refused",
            LoginError::StateMismatch => "state_mismatch",
            LoginError::InvalidIdToken(_) => "invalid_id_token",
            LoginError::BadIdentity(error) => error.reason(),
        }
    }
}

/// What the API is registered as at the provider.
#[derive(Clone, Debug)]
pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// `<public-url>/auth/callback`.
    pub redirect_url: String,
    /// `<public-url>/`, where the provider sends the browser after logout.
    pub post_logout_url: String,
    pub scopes: Vec<String>,
    pub claims: ClaimNames,
}

struct Discovered {
    at: Instant,
    metadata: ProviderMetadataWithLogout,
    client: OidcClient,
}

pub struct Oidc {
    settings: OidcSettings,
    http: openidconnect::reqwest::Client,
    discovered: RwLock<Option<Arc<Discovered>>>,
}

/// The result of a finished login.
pub struct LoggedIn {
    pub identity: Identity,
    pub id_token: String,
}

impl Oidc {
    pub fn new(settings: OidcSettings) -> anyhow::Result<Self> {
        IssuerUrl::new(settings.issuer.clone())?;
        RedirectUrl::new(settings.redirect_url.clone())?;
        let http = openidconnect::reqwest::ClientBuilder::new()
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .build()?;
        Ok(Self {
            settings,
            http,
            discovered: RwLock::new(None),
        })
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.settings
    }

    /// The cached discovery, refreshed when old or when `force`d (after a key rotation).
    async fn discovered(&self, force: bool) -> Result<Arc<Discovered>, LoginError> {
        if !force
            && let Some(found) = self.discovered.read().await.as_ref()
            && found.at.elapsed() < METADATA_MAX_AGE
        {
            return Ok(found.clone());
        }
        let mut slot = self.discovered.write().await;
        let issuer = IssuerUrl::new(self.settings.issuer.clone())
            .map_err(|e| LoginError::Unavailable(e.to_string()))?;
        let metadata = ProviderMetadataWithLogout::discover_async(issuer, &self.http)
            .await
            .map_err(|error| LoginError::Unavailable(error_chain(&error)))?;
        let redirect =
            RedirectUrl::new(self.settings.redirect_url.clone()).expect("checked in Oidc::new");
        let client = OidcClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(self.settings.client_id.clone()),
            self.settings.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect);
        let found = Arc::new(Discovered {
            at: Instant::now(),
            metadata,
            client,
        });
        *slot = Some(found.clone());
        Ok(found)
    }

    /// The provider's `jwks_uri`, for access-token validation.
    async fn jwks_uri(&self) -> Result<String, LoginError> {
        Ok(self
            .discovered(false)
            .await?
            .metadata
            .jwks_uri()
            .url()
            .to_string())
    }

    /// Starts a login: the URL to send the browser to and what the callback must check.
    pub async fn begin(&self, return_to: String) -> Result<(String, PendingLogin), LoginError> {
        let discovered = self.discovered(false).await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = discovered.client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for scope in self
            .settings
            .scopes
            .iter()
            .filter(|scope| *scope != "openid")
        {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        let pending = PendingLogin {
            state: state.into_secret(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.into_secret(),
            return_to,
        };
        Ok((url.to_string(), pending))
    }

    /// Finishes a login: checks `state`, redeems the code with the PKCE verifier, verifies the
    /// ID token (signature, issuer, audience, expiry, nonce, access-token hash) and reads the
    /// identity from its claims, completed by the userinfo endpoint when there is one.
    pub async fn complete(
        &self,
        pending: PendingLogin,
        state: &str,
        code: String,
    ) -> Result<LoggedIn, LoginError> {
        if !super::session::constant_time_eq(&pending.state, state) {
            return Err(LoginError::StateMismatch);
        }
        let discovered = self.discovered(false).await?;
        let token = discovered
            .client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|error| LoginError::Unavailable(error.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier))
            .request_async(&self.http)
            .await
            .map_err(|error| match error {
                openidconnect::RequestTokenError::ServerResponse(response) => {
                    LoginError::Refused(response.to_string())
                }
                other => LoginError::Unavailable(error_chain(&other)),
            })?;
        let id_token = token
            .id_token()
            .ok_or_else(|| LoginError::InvalidIdToken("no ID token in the answer".into()))?;
        let nonce = Nonce::new(pending.nonce);
        let (claims, discovered) = match verify(&discovered, id_token, &nonce, token.access_token())
        {
            // The provider may have rotated its keys since discovery: look again, once.
            Err(ClaimsVerificationError::SignatureVerification(_)) => {
                let fresh = self.discovered(true).await?;
                (
                    verify(&fresh, id_token, &nonce, token.access_token()),
                    fresh,
                )
            }
            other => (other, discovered),
        };
        let claims = claims.map_err(|error| LoginError::InvalidIdToken(error.to_string()))?;
        let mut merged = match serde_json::to_value(&claims) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        if let Ok(request) = discovered
            .client
            .user_info(token.access_token().clone(), Some(claims.subject().clone()))
        {
            let info: Result<UserInfoClaims<ExtraClaims, CoreGenderClaim>, _> =
                request.request_async(&self.http).await;
            match info.map(|info| serde_json::to_value(&info)) {
                Ok(Ok(Value::Object(extra))) => merged.extend(extra),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "userinfo failed; using the ID token's claims")
                }
            }
        }
        let identity = identity_from_claims(&merged, &self.settings.claims)
            .map_err(LoginError::BadIdentity)?;
        Ok(LoggedIn {
            identity,
            id_token: id_token.to_string(),
        })
    }

    /// Where to send the browser to end the provider's session too (RP-initiated logout), if
    /// the provider advertises an `end_session_endpoint`.
    pub async fn logout_url(&self, id_token: Option<&str>) -> Option<String> {
        let discovered = self.discovered(false).await.ok()?;
        let endpoint = discovered
            .metadata
            .additional_metadata()
            .end_session_endpoint
            .clone()?;
        let mut request = LogoutRequest::from(endpoint)
            .set_client_id(ClientId::new(self.settings.client_id.clone()));
        if let Ok(url) = PostLogoutRedirectUrl::new(self.settings.post_logout_url.clone()) {
            request = request.set_post_logout_redirect_uri(url);
        }
        if let Some(token) = id_token.and_then(|raw| raw.parse::<ExtraIdToken>().ok()) {
            request = request.set_id_token_hint(&token);
        }
        Some(request.http_get_url().to_string())
    }

    pub async fn fetch_jwks(&self) -> Result<Value, String> {
        let uri = self.jwks_uri().await.map_err(|error| error.to_string())?;
        let response = self
            .http
            .get(&uri)
            .send()
            .await
            .map_err(|error| error_chain(&error))?;
        if !response.status().is_success() {
            return Err(format!("{uri} answered {}", response.status()));
        }
        response.json().await.map_err(|error| error_chain(&error))
    }
}

fn verify(
    discovered: &Discovered,
    id_token: &ExtraIdToken,
    nonce: &Nonce,
    access_token: &openidconnect::AccessToken,
) -> Result<IdTokenClaims<ExtraClaims, CoreGenderClaim>, ClaimsVerificationError> {
    let verifier = discovered.client.id_token_verifier();
    let claims = id_token.claims(&verifier, nonce)?.clone();
    if let Some(expected) = claims.access_token_hash() {
        let actual = AccessTokenHash::from_token(
            access_token,
            id_token
                .signing_alg()
                .map_err(ClaimsVerificationError::SignatureVerification)?,
            id_token
                .signing_key(&verifier)
                .map_err(ClaimsVerificationError::SignatureVerification)?,
        )
        .map_err(|error| ClaimsVerificationError::Other(error.to_string()))?;
        if actual != *expected {
            return Err(ClaimsVerificationError::Other(
                "the access token does not match at_hash".into(),
            ));
        }
    }
    Ok(claims)
}

/// An error with its causes, for messages about the provider (a bare "Request failed" helps
/// nobody).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Access tokens are checked against the keys at the discovered `jwks_uri`.
#[derive(Clone)]
pub struct DiscoveredJwks(pub Arc<Oidc>);

impl JwksSource for DiscoveredJwks {
    async fn fetch(&self) -> Result<Value, String> {
        self.0.fetch_jwks().await
    }
}
