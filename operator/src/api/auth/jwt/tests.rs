//! The validator against local keys: every way a token can be wrong, and key rotation.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

// Two Ed25519 test keys (PKCS#8 DER) and their public halves; generated for these tests only.
const KEY_A: &str = "MC4CAQAwBQYDK2VwBCIEIKCsgCsnNhoWJ1VMn6uPoV6kpnI5A2obX0TTLZ5Tqldy";
const PUB_A: &str = "zMOoQiZwC_g7MgNpaPDspnQLoiTHhY39UFv4lu5XV8k";
const KEY_B: &str = "MC4CAQAwBQYDK2VwBCIEID8eYIN5IhiWTwuSBxdMt34PCXHkKMaBBaVemCfSMFAj";
const PUB_B: &str = "y2Q1nqEDxrlxXY8suiQMgi8TJ9EkfRdt0FAoTC3hHhU";

const ISSUER: &str = "https://idp.example.com";
const AUDIENCE: &str = "https://atelier.example.com/api";

fn jwk(kid: &str, x: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"})
}

/// A JWKS that tests can change (rotation) and that counts fetches.
#[derive(Clone)]
struct TestSource {
    jwks: Arc<std::sync::Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl TestSource {
    fn new(keys: Vec<Value>) -> Self {
        Self {
            jwks: Arc::new(std::sync::Mutex::new(json!({ "keys": keys }))),
            fetches: Arc::default(),
        }
    }

    fn set(&self, keys: Vec<Value>) {
        *self.jwks.lock().unwrap() = json!({ "keys": keys });
    }
}

impl JwksSource for TestSource {
    async fn fetch(&self) -> Result<Value, String> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(self.jwks.lock().unwrap().clone())
    }
}

fn validator(source: TestSource, max_age: Duration) -> JwtValidator<TestSource> {
    let rules = TokenRules {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        claims: ClaimNames {
            user: "email".into(),
            groups: "groups".into(),
        },
        jwks_max_age: max_age,
    };
    JwtValidator::new(rules, source)
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn good_claims() -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "u-alice", "email": "alice@example.com",
        "email_verified": true, "groups": ["team-x"], "iat": now(), "exp": now() + 300,
    })
}

fn sign(key_der: &str, kid: &str, claims: &Value) -> String {
    let der = base64::engine::general_purpose::STANDARD
        .decode(key_der)
        .unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

fn b64(value: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn with_claims(change: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut claims = good_claims();
    change(claims.as_object_mut().unwrap());
    claims
}

#[tokio::test]
async fn a_good_token_names_the_user_and_groups() {
    let v = validator(
        TestSource::new(vec![jwk("a", PUB_A)]),
        Duration::from_secs(300),
    );
    let identity = v.validate(&sign(KEY_A, "a", &good_claims())).await.unwrap();
    assert_eq!(
        identity,
        Identity {
            user: "alice@example.com".into(),
            groups: vec!["team-x".into()]
        }
    );
}

#[tokio::test]
async fn every_failed_check_has_its_reason() {
    let v = validator(
        TestSource::new(vec![jwk("a", PUB_A)]),
        Duration::from_secs(300),
    );
    let cases = [
        (
            with_claims(|c| drop(c.insert("exp".into(), json!(now() - 120)))),
            TokenError::Expired,
        ),
        (
            with_claims(|c| drop(c.insert("nbf".into(), json!(now() + 600)))),
            TokenError::NotYetValid,
        ),
        (
            with_claims(|c| drop(c.insert("iss".into(), json!("https://evil.example.com")))),
            TokenError::WrongIssuer,
        ),
        (
            with_claims(|c| drop(c.insert("iss".into(), json!(format!("{ISSUER}/"))))),
            TokenError::WrongIssuer,
        ),
        (
            with_claims(|c| drop(c.insert("aud".into(), json!("another-api")))),
            TokenError::WrongAudience,
        ),
        (
            with_claims(|c| drop(c.remove("aud"))),
            TokenError::MissingClaim("aud".into()),
        ),
        (
            with_claims(|c| drop(c.remove("sub"))),
            TokenError::MissingClaim("sub".into()),
        ),
        (
            with_claims(|c| drop(c.remove("exp"))),
            TokenError::MissingClaim("exp".into()),
        ),
        (
            with_claims(|c| drop(c.remove("email"))),
            TokenError::BadIdentity(ClaimError::Missing("email".into())),
        ),
        (
            with_claims(|c| drop(c.insert("email_verified".into(), json!(false)))),
            TokenError::BadIdentity(ClaimError::UnverifiedEmail),
        ),
        (
            with_claims(|c| drop(c.insert("email".into(), json!("al\tice@example.com")))),
            TokenError::BadIdentity(ClaimError::BadUserName {
                claim: "email".into(),
                problem: "contains white space",
            }),
        ),
        (
            with_claims(|c| drop(c.insert("nonce".into(), json!("n-1")))),
            TokenError::IdToken,
        ),
        (
            with_claims(|c| drop(c.insert("at_hash".into(), json!("x")))),
            TokenError::IdToken,
        ),
        (
            with_claims(|c| drop(c.insert("typ".into(), json!("ID")))),
            TokenError::IdToken,
        ),
    ];
    for (claims, expected) in cases {
        assert_eq!(
            v.validate(&sign(KEY_A, "a", &claims)).await,
            Err(expected.clone()),
            "{claims}"
        );
    }
    // Within the leeway an expired token still passes (clock skew).
    let skewed = with_claims(|c| drop(c.insert("exp".into(), json!(now() - 5))));
    assert!(v.validate(&sign(KEY_A, "a", &skewed)).await.is_ok());
    // Audience lists are fine as long as ours is among them; missing groups mean no groups.
    let listed = with_claims(|c| {
        c.insert("aud".into(), json!(["other", AUDIENCE]));
        c.remove("groups");
    });
    assert!(
        v.validate(&sign(KEY_A, "a", &listed))
            .await
            .unwrap()
            .groups
            .is_empty()
    );
}

#[tokio::test]
async fn forged_tokens_are_refused() {
    let v = validator(
        TestSource::new(vec![jwk("a", PUB_A)]),
        Duration::from_secs(300),
    );
    let claims = good_claims();
    // alg none, no signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "a"})),
        b64(&claims)
    );
    assert_eq!(
        v.validate(&none).await,
        Err(TokenError::UnsupportedAlgorithm("none".into()))
    );
    // HS256 with the public key as the secret (the classic key confusion).
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("a".into());
    let public = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(PUB_A)
        .unwrap();
    let hmac = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(&public).unwrap(),
    )
    .unwrap();
    assert_eq!(
        v.validate(&hmac).await,
        Err(TokenError::UnsupportedAlgorithm("HS256".into()))
    );
    // Signed by another key under a known kid.
    assert_eq!(
        v.validate(&sign(KEY_B, "a", &claims)).await,
        Err(TokenError::BadSignature)
    );
    // A tampered payload.
    let token = sign(KEY_A, "a", &claims);
    let parts: Vec<&str> = token.split('.').collect();
    let tampered = with_claims(|c| drop(c.insert("email".into(), json!("mallory@example.com"))));
    let forged = format!("{}.{}.{}", parts[0], b64(&tampered), parts[2]);
    assert_eq!(v.validate(&forged).await, Err(TokenError::BadSignature));
    for garbage in ["", "abc", "a.b", "a.b.c.d", "!!.e30.x"] {
        assert_eq!(
            v.validate(garbage).await,
            Err(TokenError::Malformed),
            "{garbage:?}"
        );
    }
}

#[tokio::test]
async fn symmetric_keys_in_the_jwks_are_never_used() {
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(b"shared-secret-shared-secret-1234");
    let source = TestSource::new(vec![
        json!({"kty": "oct", "k": secret, "kid": "h", "alg": "HS256"}),
    ]);
    let v = validator(source, Duration::from_secs(300));
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("h".into());
    let token = jsonwebtoken::encode(
        &header,
        &good_claims(),
        &EncodingKey::from_secret(b"shared-secret-shared-secret-1234").unwrap(),
    )
    .unwrap();
    assert!(v.validate(&token).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn rotation_needs_no_restart_and_removed_keys_expire() {
    let source = TestSource::new(vec![jwk("a", PUB_A)]);
    let v = validator(source.clone(), Duration::from_secs(60));
    let old = sign(KEY_A, "a", &good_claims());
    let new = sign(KEY_B, "b", &good_claims());
    assert!(v.validate(&old).await.is_ok());
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);

    // Unknown kid right after a fetch: refused without another fetch (rate limit).
    assert_eq!(v.validate(&new).await, Err(TokenError::UnknownKey));
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);

    // The provider publishes the new key; after the rate-limit interval the unknown kid
    // re-fetches, and both keys are trusted.
    source.set(vec![jwk("b", PUB_B), jwk("a", PUB_A)]);
    tokio::time::advance(UNKNOWN_KID_REFETCH_INTERVAL).await;
    assert!(v.validate(&new).await.is_ok());
    assert!(v.validate(&old).await.is_ok());
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2);

    // The provider removes the old key: once the cache is older than max-age, old tokens fail.
    source.set(vec![jwk("b", PUB_B)]);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(v.validate(&old).await, Err(TokenError::UnknownKey));
    assert!(v.validate(&new).await.is_ok());
}

#[tokio::test]
async fn an_unreachable_provider_is_not_the_callers_fault() {
    struct Down;
    impl JwksSource for Down {
        async fn fetch(&self) -> Result<Value, String> {
            Err("connection refused".into())
        }
    }
    let rules = TokenRules {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        claims: ClaimNames {
            user: "email".into(),
            groups: "groups".into(),
        },
        jwks_max_age: Duration::from_secs(60),
    };
    let v = JwtValidator::new(rules, Down);
    let error = v
        .validate(&sign(KEY_A, "a", &good_claims()))
        .await
        .unwrap_err();
    assert_eq!(error.reason(), "keys_unavailable");
}

/// A token with a hand-made JOSE header (fields `Header` does not have).
fn sign_with_header(key_der: &str, header: &Value, claims: &Value) -> String {
    let der = base64::engine::general_purpose::STANDARD
        .decode(key_der)
        .unwrap();
    let input = format!("{}.{}", b64(header), b64(claims));
    let signature = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_ed_der(&der),
        Algorithm::EdDSA,
    )
    .unwrap();
    format!("{input}.{signature}")
}

#[tokio::test]
async fn critical_header_extensions_are_refused() {
    let v = validator(
        TestSource::new(vec![jwk("a", PUB_A)]),
        Duration::from_secs(300),
    );
    let plain = json!({"alg": "EdDSA", "kid": "a"});
    assert!(
        v.validate(&sign_with_header(KEY_A, &plain, &good_claims()))
            .await
            .is_ok()
    );
    for crit in [json!(["b64"]), json!(["exp"]), json!([])] {
        let header = json!({"alg": "EdDSA", "kid": "a", "crit": crit, "b64": true, "exp": 1});
        let error = v
            .validate(&sign_with_header(KEY_A, &header, &good_claims()))
            .await
            .unwrap_err();
        assert_eq!(error.reason(), "critical_header", "{header}");
    }
}

#[tokio::test]
async fn an_rfc_9068_access_token_is_no_id_token() {
    let v = validator(
        TestSource::new(vec![jwk("a", PUB_A)]),
        Duration::from_secs(300),
    );
    let claims = with_claims(|c| drop(c.insert("nonce".into(), json!("n-1"))));
    let access = json!({"alg": "EdDSA", "kid": "a", "typ": "at+jwt"});
    assert!(
        v.validate(&sign_with_header(KEY_A, &access, &claims))
            .await
            .is_ok()
    );
    let id = json!({"alg": "EdDSA", "kid": "a", "typ": "JWT"});
    assert_eq!(
        v.validate(&sign_with_header(KEY_A, &id, &claims)).await,
        Err(TokenError::IdToken)
    );
}

#[test]
fn the_api_audience_is_not_the_login_client() {
    assert!(check_audience("https://atelier.example.com/api", "atelier").is_ok());
    assert!(check_audience("atelier", "atelier").is_err());
    assert!(check_audience(" ", "atelier").is_err());
}
