//! Validation of `Authorization: Bearer` access tokens: JWTs signed by the issuer, checked
//! against its JWKS.
//!
//! The algorithm comes from the key, never from the token: a token whose header names another
//! algorithm than its key (`none`, or HS256 "signed" with the public key) is refused before any
//! signature check, and symmetric keys in the JWKS are ignored. Keys are cached; an unknown `kid`
//! triggers a re-fetch (at most one per [`UNKNOWN_KID_REFETCH_INTERVAL`]), so a provider can
//! rotate keys without restarting the API, and the whole set is re-fetched after `max_age`, so a
//! key the provider removed stops being trusted.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

use super::claims::{ClaimError, ClaimNames, identity_from_claims};
use crate::api::authz::Identity;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;
/// Unknown `kid`s re-fetch the JWKS at most this often, so that garbage tokens cannot make the
/// API hammer the provider.
pub const UNKNOWN_KID_REFETCH_INTERVAL: Duration = Duration::from_secs(5);

/// Why a token was refused. The `reason` is stable: it labels metrics and audit events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm {0:?} is not accepted")]
    UnsupportedAlgorithm(String),
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token is meant for another audience")]
    WrongAudience,
    #[error("the token lacks the required claim {0:?}")]
    MissingClaim(String),
    /// The claims name no acceptable user.
    #[error("{0}")]
    BadIdentity(ClaimError),
    /// An ID token (it proves a login to the client it was issued to, and travels through
    /// browsers and logout URLs) is no credential for the API.
    #[error("the token is an ID token; send an access token issued for the API")]
    IdToken,
    /// RFC 7515 §4.1.11: a token that needs header extensions this API does not implement.
    #[error("the token's header lists critical extensions this API does not understand: {0:?}")]
    CriticalHeader(Vec<String>),
    /// The JWKS could not be fetched: a provider outage, not the caller's fault.
    #[error("the identity provider's keys cannot be fetched: {0}")]
    KeysUnavailable(String),
}

impl TokenError {
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed_token",
            TokenError::UnsupportedAlgorithm(_) => "unsupported_alg",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::MissingClaim(_) => "missing_claim",
            TokenError::BadIdentity(error) => error.reason(),
            TokenError::IdToken => "id_token_as_bearer",
            TokenError::CriticalHeader(_) => "critical_header",
            TokenError::KeysUnavailable(_) => "keys_unavailable",
        }
    }
}

/// Where the JWKS comes from: the issuer's `jwks_uri` in production, a fixed set in unit tests.
pub trait JwksSource: Send + Sync {
    fn fetch(&self) -> impl Future<Output = Result<Value, String>> + Send;
}

/// What a token must satisfy.
#[derive(Clone, Debug)]
pub struct TokenRules {
    pub issuer: String,
    pub audience: String,
    pub claims: ClaimNames,
    /// Age after which the cached JWKS is fetched again before use.
    pub jwks_max_age: Duration,
}

struct CachedKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

#[derive(Default)]
struct KeyCache {
    by_kid: HashMap<String, std::sync::Arc<CachedKey>>,
    /// Keys without `kid`, tried for tokens without one.
    anonymous: Vec<std::sync::Arc<CachedKey>>,
    fetched_at: Option<Instant>,
}

pub struct JwtValidator<S> {
    rules: TokenRules,
    source: S,
    cache: RwLock<KeyCache>,
    /// Serializes fetches and remembers when the last one started.
    last_fetch: Mutex<Option<Instant>>,
}

/// The part of the JOSE header looked at before trusting anything.
#[derive(serde::Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    /// Present at all (even empty, which RFC 7515 forbids) means refused: no extension is
    /// understood here.
    #[serde(default)]
    crit: Option<Vec<String>>,
}

impl<S: JwksSource> JwtValidator<S> {
    pub fn new(rules: TokenRules, source: S) -> Self {
        Self {
            rules,
            source,
            cache: RwLock::new(KeyCache::default()),
            last_fetch: Mutex::new(None),
        }
    }

    pub fn rules(&self) -> &TokenRules {
        &self.rules
    }

    /// Validates `token` and returns the caller it names.
    pub async fn validate(&self, token: &str) -> Result<Identity, TokenError> {
        let header = raw_header(token)?;
        if let Some(crit) = header.crit {
            return Err(TokenError::CriticalHeader(crit));
        }
        // Refused outright: `none` has no signature and HMAC would use a public key as secret.
        if header.alg == "none" || header.alg.starts_with("HS") {
            return Err(TokenError::UnsupportedAlgorithm(header.alg));
        }
        let candidates = self.keys_for(header.kid.as_deref()).await?;
        let mut last_error = TokenError::UnknownKey;
        for key in candidates {
            if alg_name(key.algorithm) != header.alg {
                last_error = TokenError::UnsupportedAlgorithm(header.alg.clone());
                continue;
            }
            match self.check(token, &key) {
                Ok(claims) => {
                    if is_id_token(header.typ.as_deref(), &claims) {
                        return Err(TokenError::IdToken);
                    }
                    return identity_from_claims(&claims, &self.rules.claims)
                        .map_err(TokenError::BadIdentity);
                }
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    fn check(&self, token: &str, key: &CachedKey) -> Result<Map<String, Value>, TokenError> {
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.rules.issuer]);
        validation.set_audience(&[&self.rules.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm => {
                    TokenError::UnsupportedAlgorithm(alg_name(key.algorithm))
                }
                ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
                _ => TokenError::Malformed,
            })?;
        Ok(data.claims)
    }

    /// The keys that may have signed a token with this `kid`, fetching the JWKS when the cache
    /// is empty or old, or (rate-limited) when the `kid` is unknown.
    async fn keys_for(
        &self,
        kid: Option<&str>,
    ) -> Result<Vec<std::sync::Arc<CachedKey>>, TokenError> {
        let stale = {
            let cache = self.cache.read().await;
            cache
                .fetched_at
                .is_none_or(|at| at.elapsed() >= self.rules.jwks_max_age)
        };
        if stale {
            self.refresh(None).await?;
        }
        if let Some(found) = self.lookup(kid).await {
            return Ok(found);
        }
        if self.refresh(Some(UNKNOWN_KID_REFETCH_INTERVAL)).await?
            && let Some(found) = self.lookup(kid).await
        {
            return Ok(found);
        }
        Err(TokenError::UnknownKey)
    }

    async fn lookup(&self, kid: Option<&str>) -> Option<Vec<std::sync::Arc<CachedKey>>> {
        let cache = self.cache.read().await;
        let found = match kid {
            Some(kid) => cache
                .by_kid
                .get(kid)
                .cloned()
                .into_iter()
                .collect::<Vec<_>>(),
            None => cache.anonymous.clone(),
        };
        (!found.is_empty()).then_some(found)
    }

    /// Fetches the JWKS unless another fetch started less than `min_interval` ago (then
    /// returns `Ok(false)`). A failed fetch keeps the cached keys: a provider outage should not
    /// lock out every caller whose token is still valid.
    async fn refresh(&self, min_interval: Option<Duration>) -> Result<bool, TokenError> {
        let mut last = self.last_fetch.lock().await;
        let recent = |limit: Duration| last.is_some_and(|at: Instant| at.elapsed() < limit);
        if let Some(limit) = min_interval {
            if recent(limit) {
                return Ok(false);
            }
        } else if self
            .cache
            .read()
            .await
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.rules.jwks_max_age)
        {
            // Another caller refreshed while this one waited for the lock.
            return Ok(true);
        }
        *last = Some(Instant::now());
        match self.source.fetch().await {
            Ok(jwks) => {
                let mut cache = self.cache.write().await;
                *cache = parse_jwks(&jwks);
                cache.fetched_at = Some(Instant::now());
                Ok(true)
            }
            Err(error) => {
                let mut cache = self.cache.write().await;
                if cache.fetched_at.is_none() {
                    return Err(TokenError::KeysUnavailable(error));
                }
                tracing::warn!(%error, "re-fetching the JWKS failed; keeping the cached keys");
                // Retry after the rate limit rather than on every request.
                cache.fetched_at = Some(Instant::now());
                Ok(false)
            }
        }
    }
}

/// Whether a validly signed token for our audience is an ID token rather than an access token.
/// An RFC 9068 access token (`typ: at+jwt`) is not. Otherwise the claims that only ID tokens
/// carry give it away: `nonce`, `at_hash`, `c_hash` (OpenID Connect Core §2, §3.3.2.11), and
/// Keycloak's `typ: "ID"`. The API audience differing from the login client's id
/// ([`check_audience`]) keeps the API's own ID tokens out already; this also refuses an ID
/// token of a client registered under the API's audience.
pub fn is_id_token(header_typ: Option<&str>, claims: &Map<String, Value>) -> bool {
    let access_token_typ = header_typ.is_some_and(|typ| {
        typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt")
    });
    if access_token_typ {
        return false;
    }
    ["nonce", "at_hash", "c_hash"]
        .iter()
        .any(|claim| claims.contains_key(*claim))
        || claims.get("typ").and_then(Value::as_str) == Some("ID")
}

/// The API audience must not be the login client's id: the provider puts the client id in the
/// `aud` of every ID token it issues for the page, so such an audience would accept them.
pub fn check_audience(audience: &str, client_id: &str) -> Result<(), String> {
    if audience.trim().is_empty() {
        return Err("--audience (ATELIER_API_AUDIENCE) is empty".into());
    }
    if audience == client_id {
        return Err(format!(
            "--audience {audience:?} equals --client-id: ID tokens would pass as API access tokens; \
             register a dedicated API audience (resource) at the provider"
        ));
    }
    Ok(())
}

/// The JOSE name of an algorithm (the variant names are exactly those).
fn alg_name(algorithm: Algorithm) -> String {
    format!("{algorithm:?}")
}

fn raw_header(token: &str) -> Result<RawHeader, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// The signing keys of a JWKS document. Each key is parsed on its own so that one key of an
/// unknown type does not hide the others; encryption and symmetric keys are skipped.
fn parse_jwks(document: &Value) -> KeyCache {
    let mut cache = KeyCache::default();
    let keys = document
        .get("keys")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for raw in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Some(algorithm) = key_algorithm(&jwk) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let cached = std::sync::Arc::new(CachedKey { key, algorithm });
        match &jwk.common.key_id {
            Some(kid) => {
                cache.by_kid.insert(kid.clone(), cached);
            }
            None => cache.anonymous.push(cached),
        }
    }
    cache
}

/// The one algorithm a key verifies: its `alg` when it names one, else the usual algorithm of
/// its type. Symmetric (`oct`) keys are never accepted.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let from_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        // Symmetric keys, and key types this crate does not know.
        _ => return None,
    };
    let Some(named) = jwk.common.key_algorithm else {
        return Some(from_type);
    };
    let algorithm = match named {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    // The named algorithm must fit the key type (an RSA key named ES256 is a broken JWKS).
    (algorithm.family() == from_type.family()).then_some(algorithm)
}

#[cfg(test)]
mod tests;
