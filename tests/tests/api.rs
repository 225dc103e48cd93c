//! End-to-end tests of the API (`atelier-operator api`, the real binary) against the real test
//! control plane, the real OpenID provider (`tests/oidc/provider.mjs`, npm `oidc-provider`) and
//! the real outputs server (`atelier-inference serve-outputs`).
//!
//! No controller runs here: the tests create the tenants' namespaces and the outputs
//! EndpointSlice themselves, and write job and tenant status the way the controller would.
//!
//! Needs: `make build` (both binaries in the cargo target dir), `npm ci` in `tests/oidc`, `node`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use atelier_crds::names::{API_TOKEN_KEY, API_TOKEN_SECRET};
use atelier_crds::{GenerationJob, Tenant};
use atelier_tests::oidc::{self, OidcProvider};
use atelier_tests::{DEFAULT_TIMEOUT, TestCluster, TestProcess, paths, unique_name, wait_for};
use base64::Engine as _;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

mod common;

use common::client::{Bearer, Browser, access_token, location, origin};
use common::platform::{ApiProcess, binary, free_port, start_provider};

// ---- the shared environment ----

struct Env {
    dir: PathBuf,
    provider: OidcProvider,
    api: ApiProcess,
    /// Tenant X (team-x users, team-x-admins admins) with an outputs server.
    x: String,
    /// Tenant Y (team-y, and frank as a direct user member).
    y: String,
    /// Tenant Q (team-q) with a quota of 2 images a day.
    q: String,
    /// Tenant X's outputs server, with seeded histories of alice and bob.
    outputs_server: Arc<TestProcess>,
}

async fn env() -> &'static Env {
    static ENV: OnceCell<Env> = OnceCell::const_new();
    ENV.get_or_try_init(start_env)
        .await
        .unwrap_or_else(|error| panic!("starting the API test environment: {error:#}"))
}

async fn start_env() -> anyhow::Result<Env> {
    let cluster = TestCluster::shared().await;
    let dir = tempfile::Builder::new()
        .prefix("atelier-api-")
        .tempdir()?
        .keep();
    let port = free_port();
    let provider = start_provider(&dir, &format!("http://127.0.0.1:{port}"))?;
    let api = ApiProcess::start(
        cluster,
        &dir,
        port,
        &provider.issuer,
        &["--rate-limit-per-minute", "1000"],
    )
    .await?;
    let client = cluster.client().await;
    let x = unique_name("api-x");
    let y = unique_name("api-y");
    let q = unique_name("api-q");
    create_tenant(
        &client,
        &x,
        json!([{"group": "team-x", "role": "user"}, {"group": "team-x-admins", "role": "admin"}]),
        json!({}),
    )
    .await?;
    create_tenant(
        &client,
        &y,
        json!([{"group": "team-y", "role": "user"}, {"user": "frank@example.com", "role": "user"}]),
        json!({}),
    )
    .await?;
    create_tenant(
        &client,
        &q,
        json!([{"group": "team-q", "role": "user"}]),
        json!({"imagesPerUserPerDay": 2}),
    )
    .await?;
    let outputs_server =
        start_outputs_server(&client, &dir, &atelier_crds::tenant::namespace_for(&x)).await?;
    Ok(Env {
        dir,
        provider,
        api,
        x,
        y,
        q,
        outputs_server: Arc::new(outputs_server),
    })
}

async fn create_tenant(
    client: &Client,
    name: &str,
    members: Value,
    quota: Value,
) -> anyhow::Result<()> {
    let tenant: Tenant = serde_json::from_value(json!({
        "apiVersion": "atelier.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
        "spec": {"members": members, "quota": quota, "limits": {"maxSteps": 50, "maxImages": 4}},
    }))?;
    Api::<Tenant>::all(client.clone())
        .create(&PostParams::default(), &tenant)
        .await
        .context("creating a Tenant")?;
    // The tenant controller would create the namespace; none runs in these tests.
    let namespace: Namespace = serde_json::from_value(
        json!({"metadata": {"name": atelier_crds::tenant::namespace_for(name)}}),
    )?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(())
}

const OUTPUTS_ADDRESS: &str = "198.18.1.1";

/// Seeded histories of alice and bob, served by the real outputs server, published the way the
/// API finds it: an EndpointSlice of the `outputs` Service. The server listens on 198.18.1.1,
/// the host's address in the local kubelet's pod range, never given to a pod (the API server
/// refuses loopback addresses in EndpointSlices).
async fn start_outputs_server(
    client: &Client,
    dir: &Path,
    namespace: &str,
) -> anyhow::Result<TestProcess> {
    let port = free_port();
    // Published first: where the cluster refuses the address, nothing else is needed.
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "outputs-test", "labels": {"kubernetes.io/service-name": "outputs"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [OUTPUTS_ADDRESS], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &slice)
        .await?;
    let outputs = dir.join("outputs");
    for (user, stem, seed) in [
        ("alice", "20261129_100000_11_aaaaaaaa", 11),
        ("bob", "20261129_100001_22_bbbbbbbb", 22),
    ] {
        let user_dir = outputs.join(format!("{user}@example.com"));
        std::fs::create_dir_all(&user_dir)?;
        std::fs::write(user_dir.join(format!("{stem}.png")), png_bytes(user))?;
        let metadata = json!({"prompt": format!("{user}'s secret fox"), "seed": seed, "steps": 4, "guidance": 3.5,
            "width": 256, "height": 256, "model": "tiny", "user": format!("{user}@example.com"), "jobId": stem,
            "index": 0, "createdAt": "2026-11-29T10:00:00Z", "sha256": "00"});
        std::fs::write(
            user_dir.join(format!("{stem}.json")),
            serde_json::to_vec(&metadata)?,
        )?;
    }
    // The tenant's token, as the operator would create it; the API reads it from the Secret.
    let token = format!("api-test-token-{}", unique_name("t"));
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": API_TOKEN_SECRET},
        "stringData": {API_TOKEN_KEY: token},
    }))?;
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await?;
    let token_file = dir.join("outputs-token");
    std::fs::write(&token_file, &token)?;
    let mut command = Command::new(binary("atelier-inference")?);
    command
        .args(["serve-outputs", "--outputs-dir"])
        .arg(&outputs)
        .args(["--listen", &format!("{OUTPUTS_ADDRESS}:{port}")])
        .arg("--api-token-file")
        .arg(&token_file)
        .stdout(std::fs::File::create(dir.join("outputs.log"))?)
        .stderr(std::fs::File::create(dir.join("outputs.err.log"))?);
    let (process, _) = TestProcess::spawn(command)?;
    let http = reqwest::Client::new();
    wait_for("the outputs server", DEFAULT_TIMEOUT, || async {
        Ok(http
            .get(format!("http://{OUTPUTS_ADDRESS}:{port}/readyz"))
            .send()
            .await?
            .status()
            .is_success()
            .then_some(()))
    })
    .await?;
    Ok(process)
}

/// A valid 1×1 PNG that browsers can show, distinct per user: the decoder ignores what follows
/// the IEND chunk, and the outputs server serves files as they are.
fn png_bytes(user: &str) -> Vec<u8> {
    const ONE_PIXEL: [u8; 69] = [
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90,
        0x77, 0x53, 0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8,
        0xdf, 0xc0, 0x00, 0x00, 0x04, 0x01, 0x01, 0x80, 0xc5, 0x2a, 0x18, 0x5d, 0x00, 0x00, 0x00,
        0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    let mut bytes = ONE_PIXEL.to_vec();
    bytes.extend_from_slice(format!("image of {user}").as_bytes());
    bytes
}

/// Logs `user` in to the page through the provider's form; returns the browser and its CSRF
/// token.
async fn browser_login(env: &Env, user: &str) -> anyhow::Result<(Browser, String)> {
    let mut browser = Browser::new();
    let (form_url, response) = browser
        .navigate(&format!("{}/auth/login", env.api.url), None)
        .await?;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the provider's login form"
    );
    assert!(form_url.contains("/interaction/"), "{form_url}");
    let (landed, response) = browser
        .sign_in(
            &form_url,
            &format!("{user}@example.com"),
            &format!("{user}-pw"),
            None,
        )
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        landed,
        format!("{}/", env.api.url),
        "back on the page after login"
    );
    let session: Value = browser
        .send(
            reqwest::Method::GET,
            &format!("{}/auth/session", env.api.url),
            None,
            HeaderMap::new(),
        )
        .await?
        .json()
        .await?;
    assert_eq!(session["authenticated"], true, "{session}");
    let csrf = session["csrfToken"].as_str().unwrap().to_string();
    Ok((browser, csrf))
}

async fn as_user(env: &Env, user: &str) -> anyhow::Result<Bearer> {
    let token = access_token(&env.provider.issuer, user).await?;
    Ok(Bearer::new(&env.api.url, &token))
}

fn reason(body: &Value) -> &str {
    body["error"]["reason"].as_str().unwrap_or_default()
}

fn job_body() -> Value {
    json!({"prompt": "a red fox in the snow", "width": 256, "height": 256, "steps": 4})
}

// ---- tests ----

#[tokio::test]
async fn browser_login_sets_a_session_cookie_and_requires_csrf() -> anyhow::Result<()> {
    let env = env().await;
    let (mut browser, csrf) = browser_login(env, "alice").await?;
    let cookie = browser
        .set_cookies
        .iter()
        .rev()
        .find(|c| c.starts_with("atelier_session="))
        .expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let api = &env.api.url;
    let me: Value = browser
        .send(
            reqwest::Method::GET,
            &format!("{api}/api/v1/me"),
            None,
            HeaderMap::new(),
        )
        .await?
        .json()
        .await?;
    assert_eq!(me["user"], "alice@example.com");
    let x = me["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == env.x.as_str())
        .expect("member of X");
    assert_eq!(x["role"], "user");

    // A cookie alone does not change anything: the CSRF header is required.
    let url = format!("{api}/api/v1/tenants/{}/generations", env.x);
    let mut headers = HeaderMap::new();
    headers.insert(reqwest::header::CONTENT_TYPE, "application/json".parse()?);
    let refused = browser
        .http
        .post(&url)
        .headers(headers.clone())
        .header("cookie", session_cookie(&browser, api))
        .body(job_body().to_string())
        .send()
        .await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body: Value = refused.json().await?;
    assert_eq!(reason(&body), "csrf_failed");
    env.api
        .expect_audit(
            json!({"action": "authenticate", "outcome": "denied", "reason": "csrf_failed"}),
        )
        .await?;
    headers.insert("x-csrf-token", csrf.parse()?);
    let created = browser
        .http
        .post(&url)
        .headers(headers)
        .header("cookie", session_cookie(&browser, api))
        .body(job_body().to_string())
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::CREATED);
    env.api
        .expect_audit(json!({"action": "login", "outcome": "success", "user": "alice@example.com"}))
        .await?;

    // Logout ends the session here and sends the browser to the provider's end_session_endpoint.
    let logout = browser
        .send(
            reqwest::Method::POST,
            &format!("{api}/auth/logout"),
            Some(&[("csrf", &csrf)]),
            HeaderMap::new(),
        )
        .await?;
    assert_eq!(logout.status(), StatusCode::SEE_OTHER);
    let target = location(api, &logout)?;
    assert!(
        target.starts_with(&format!("{}/session/end", env.provider.issuer)),
        "{target}"
    );
    assert!(target.contains("id_token_hint="), "{target}");
    let session: Value = browser
        .send(
            reqwest::Method::GET,
            &format!("{api}/auth/session"),
            None,
            HeaderMap::new(),
        )
        .await?
        .json()
        .await?;
    assert_eq!(session["authenticated"], false);
    let after = browser
        .send(
            reqwest::Method::GET,
            &format!("{api}/api/v1/me"),
            None,
            HeaderMap::new(),
        )
        .await?;
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}

fn session_cookie(browser: &Browser, api: &str) -> String {
    let origin = origin(&reqwest::Url::parse(api).unwrap());
    format!(
        "atelier_session={}",
        browser.cookies[&origin]["atelier_session"]
    )
}

#[tokio::test]
async fn failed_logins_are_refused_and_audited() -> anyhow::Result<()> {
    let env = env().await;
    let mut browser = Browser::new();
    let (form_url, _) = browser
        .navigate(&format!("{}/auth/login", env.api.url), None)
        .await?;
    let (_, response) = browser
        .sign_in(&form_url, "alice@example.com", "wrong", None)
        .await?;
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "the provider checks the password"
    );
    assert!(
        response
            .text()
            .await?
            .contains("Invalid e-mail or password")
    );
    // A callback that no login started here (forged or replayed) is refused.
    let mut stranger = Browser::new();
    let (landed, _) = stranger
        .navigate(
            &format!("{}/auth/callback?code=abc&state=def", env.api.url),
            None,
        )
        .await?;
    assert!(landed.ends_with("/?error=no_login_in_progress"), "{landed}");
    env.api
        .expect_audit(
            json!({"action": "login", "outcome": "failure", "reason": "no_login_in_progress"}),
        )
        .await?;
    // A callback with the wrong state for this browser's login.
    let (form_url, _) = browser
        .navigate(&format!("{}/auth/login", env.api.url), None)
        .await?;
    assert!(form_url.contains("/interaction/"));
    let (landed, _) = browser
        .navigate(
            &format!("{}/auth/callback?code=abc&state=forged", env.api.url),
            None,
        )
        .await?;
    assert!(landed.ends_with("/?error=state_mismatch"), "{landed}");
    env.api
        .expect_audit(json!({"action": "login", "outcome": "failure", "reason": "state_mismatch"}))
        .await?;
    Ok(())
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_reason() -> anyhow::Result<()> {
    let env = env().await;
    let issuer = &env.provider.issuer;
    let good = as_user(env, "alice").await?;
    assert_eq!(good.get("/api/v1/me").await?.0, StatusCode::OK);
    let alice = json!({"sub": "alice", "email": "alice@example.com", "email_verified": true, "groups": ["team-x"]});
    let with = |change: Value| {
        let mut claims = alice.clone();
        for (k, v) in change.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let cases = [
        ("sign", with(json!({})), None, StatusCode::OK, ""),
        (
            "sign",
            with(json!({"exp": now - 120, "iat": now - 900})),
            None,
            StatusCode::UNAUTHORIZED,
            "expired",
        ),
        (
            "sign",
            with(json!({"nbf": now + 600})),
            None,
            StatusCode::UNAUTHORIZED,
            "not_yet_valid",
        ),
        (
            "sign",
            with(json!({"aud": "another-api"})),
            None,
            StatusCode::UNAUTHORIZED,
            "wrong_audience",
        ),
        (
            "sign",
            with(json!({"iss": "https://evil.example.com"})),
            None,
            StatusCode::UNAUTHORIZED,
            "wrong_issuer",
        ),
        (
            "sign",
            with(json!({"sub": null})),
            None,
            StatusCode::UNAUTHORIZED,
            "missing_claim",
        ),
        (
            "sign",
            with(json!({"email": null})),
            None,
            StatusCode::UNAUTHORIZED,
            "missing_claim",
        ),
        (
            "sign",
            with(json!({"email_verified": false})),
            None,
            StatusCode::UNAUTHORIZED,
            "unverified_email",
        ),
        (
            "sign",
            with(json!({"email_verified": null})),
            None,
            StatusCode::UNAUTHORIZED,
            "unverified_email",
        ),
        (
            "sign",
            with(json!({"email": "al\tice@example.com"})),
            None,
            StatusCode::UNAUTHORIZED,
            "bad_user_claim",
        ),
        (
            "sign",
            with(json!({"email": ".\t."})),
            None,
            StatusCode::UNAUTHORIZED,
            "bad_user_claim",
        ),
        // Shaped like an ID token (the nonce of a login), for the API's audience.
        (
            "sign",
            with(json!({"nonce": "n-0S6_WzA2Mj"})),
            None,
            StatusCode::UNAUTHORIZED,
            "id_token_as_bearer",
        ),
        (
            "none",
            with(json!({})),
            None,
            StatusCode::UNAUTHORIZED,
            "unsupported_alg",
        ),
        (
            "hmac",
            with(json!({})),
            None,
            StatusCode::UNAUTHORIZED,
            "unsupported_alg",
        ),
        (
            "foreign",
            with(json!({})),
            Some("use-a-known-kid"),
            StatusCode::UNAUTHORIZED,
            "unknown_key",
        ),
        (
            "foreign",
            with(json!({})),
            None,
            StatusCode::UNAUTHORIZED,
            "unknown_key",
        ),
    ];
    let kids: Value = reqwest::get(format!("{issuer}/__test/keys"))
        .await?
        .json()
        .await?;
    let current_kid = kids["kids"][0].as_str().unwrap().to_string();
    let mut tokens = Vec::new();
    for (mode, claims, kid, status, expected) in cases {
        // "use-a-known-kid": a foreign key under the provider's current kid (bad signature).
        let kid = kid.map(|_| current_kid.as_str());
        let token = oidc::mint(issuer, mode, &claims, kid).await?;
        let (got, body) = Bearer::new(&env.api.url, &token).get("/api/v1/me").await?;
        let expected = if kid.is_some() {
            "bad_signature"
        } else {
            expected
        };
        assert_eq!(got, status, "{mode} {claims}: {body}");
        assert_eq!(reason(&body), expected, "{mode} {claims}: {body}");
        if !expected.is_empty() {
            env.api
                .expect_audit(
                    json!({"action": "authenticate", "outcome": "denied", "reason": expected}),
                )
                .await?;
        }
        tokens.push(token);
    }
    for garbage in ["nonsense", "a.b.c", ""] {
        let (status, body) = Bearer::new(&env.api.url, garbage).get("/api/v1/me").await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{garbage:?}: {body}");
    }
    let (status, body) = Bearer::new(&env.api.url, "")
        .http
        .get(format!("{}/api/v1/me", env.api.url))
        .send()
        .await
        .map(|r| (r.status(), r))?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body.headers()["www-authenticate"], "Bearer");
    env.api
        .expect_audit(json!({"action": "authenticate", "reason": "missing_credentials"}))
        .await?;
    // Tokens never reach the logs.
    let log = env.api.logs();
    for token in tokens.iter().chain([&good.token]) {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            signature.is_empty() || !log.contains(signature),
            "a token signature was logged"
        );
    }
    Ok(())
}

#[tokio::test]
async fn missing_groups_claim_means_no_group_membership() -> anyhow::Result<()> {
    let env = env().await;
    let frank = as_user(env, "frank").await?;
    let (status, me) = frank.get("/api/v1/me").await?;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["groups"], json!([]));
    let names: Vec<&str> = me["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![env.y.as_str()],
        "only the tenant naming frank directly"
    );
    let (status, body) = frank
        .get(&format!("/api/v1/tenants/{}/generations", env.x))
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "NotAMember")
    );
    env.api.expect_audit(json!({"action": "list", "outcome": "denied", "reason": "NotAMember", "user": "frank@example.com", "tenant": env.x})).await?;
    Ok(())
}

#[tokio::test]
async fn users_cannot_see_each_others_jobs_or_images() -> anyhow::Result<()> {
    let env = env().await;
    let (alice, bob, carol, dave, erin) = (
        as_user(env, "alice").await?,
        as_user(env, "bob").await?,
        as_user(env, "carol").await?,
        as_user(env, "dave").await?,
        as_user(env, "erin").await?,
    );
    let x = &env.x;
    let jobs = format!("/api/v1/tenants/{x}/generations");

    // The body cannot choose the user; the job is filed under the token's user.
    let (status, body) = alice
        .post(&jobs, json!({"prompt": "fox", "user": "bob@example.com"}))
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::BAD_REQUEST, "InvalidRequest"),
        "{body}"
    );
    let (status, job) = alice.post(&jobs, job_body()).await?;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["user"], "alice@example.com");
    assert_eq!(job["phase"], "Pending");
    let name = job["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("gen-"));
    env.api.expect_audit(json!({"action": "generate", "outcome": "success", "user": "alice@example.com", "object": name})).await?;
    let stored = Api::<GenerationJob>::namespaced(
        TestCluster::shared().await.client().await,
        &atelier_crds::tenant::namespace_for(x),
    )
    .get(&name)
    .await?;
    assert_eq!(stored.spec.user, "alice@example.com");

    // Bob sees nothing of alice's.
    let (_, list) = bob.get(&jobs).await?;
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["user"] == "bob@example.com"),
        "{list}"
    );
    assert_eq!(
        bob.get(&format!("{jobs}/{name}")).await?.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        bob.get(&format!("{jobs}/{name}/events")).await?.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        bob.delete(&format!("{jobs}/{name}")).await?.0,
        StatusCode::NOT_FOUND
    );
    env.api.expect_audit(json!({"action": "cancel", "outcome": "denied", "reason": "NotOwner", "user": "bob@example.com", "object": name})).await?;
    let (status, body) = bob.get(&format!("{jobs}?user=alice@example.com")).await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "AdminRequired")
    );

    // Images: each user sees only their own history; guessing a file name does not help.
    let images = format!("/api/v1/tenants/{x}/images");
    let alice_file = format!("{images}/20261129_100000_11_aaaaaaaa.png");
    // Refused before the outputs server is asked.
    let (status, body) = bob
        .get(&format!("{alice_file}?user=alice@example.com"))
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "AdminRequired")
    );
    let (status, _) = bob.get(&format!("{images}?user=alice@example.com")).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for traversal in [
        "..%2Falice@example.com%2F20261129_100000_11_aaaaaaaa.png",
        "%2E%2E",
        "x.png",
    ] {
        let (status, _) = bob.get(&format!("{images}/{traversal}")).await?;
        assert!(
            matches!(status, StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND),
            "{traversal}: {status}"
        );
    }
    let (status, _) = bob.get(&format!("{images}?before=../../etc")).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, page) = alice.get(&images).await?;
    assert_eq!(status, StatusCode::OK, "{page}");
    let files: Vec<&str> = page["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec!["20261129_100000_11_aaaaaaaa.png"]);
    assert_eq!(
        page["images"][0]["metadata"]["prompt"],
        "alice's secret fox"
    );
    let png = alice
        .http
        .get(format!("{}{alice_file}", env.api.url))
        .bearer_auth(&alice.token)
        .send()
        .await?;
    assert_eq!(png.status(), StatusCode::OK);
    assert_eq!(png.headers()["content-type"], "image/png");
    assert_eq!(png.bytes().await?.as_ref(), png_bytes("alice").as_slice());
    let (_, page) = bob.get(&images).await?;
    assert!(
        page.to_string().contains("bbbbbbbb") && !page.to_string().contains("aaaaaaaa"),
        "{page}"
    );
    assert_eq!(
        bob.get(&alice_file).await?.0,
        StatusCode::NOT_FOUND,
        "not in bob's folder"
    );

    // Members of another tenant get 403; the platform admin and the tenant admin get in.
    let (status, body) = dave.get(&jobs).await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "NotAMember")
    );
    let (status, _) = dave
        .get(&format!("/api/v1/tenants/{}/generations", env.y))
        .await?;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = alice
        .get(&format!("/api/v1/tenants/{}/generations", env.y))
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "NotAMember")
    );
    let (status, list) = erin.get(&jobs).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["name"] == name.as_str())
    );
    let (status, list) = carol.get(&format!("{jobs}?user=alice@example.com")).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["user"] == "alice@example.com")
    );
    assert_eq!(
        carol.get(&format!("{jobs}/{name}")).await?.0,
        StatusCode::OK
    );
    let url = format!("{}{alice_file}?user=alice%40example.com", env.api.url);
    let png = carol.http.get(url).bearer_auth(&carol.token).send().await?;
    assert_eq!(png.status(), StatusCode::OK);
    assert_eq!(png.bytes().await?.as_ref(), png_bytes("alice").as_slice());
    let (status, cancelled) = carol.delete(&format!("{jobs}/{name}")).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(cancelled["cancelRequested"], true);
    env.api.expect_audit(json!({"action": "cancel", "outcome": "success", "user": "carol@example.com", "object": name})).await?;

    // Alice cancels her own.
    let (_, own) = alice.post(&jobs, job_body()).await?;
    let (status, cancelled) = alice
        .delete(&format!("{jobs}/{}", own["name"].as_str().unwrap()))
        .await?;
    assert_eq!(
        (status, &cancelled["cancelRequested"]),
        (StatusCode::ACCEPTED, &json!(true))
    );
    Ok(())
}

#[tokio::test]
async fn quota_is_checked_at_once_and_reset_by_admins() -> anyhow::Result<()> {
    let env = env().await;
    let client = TestCluster::shared().await.client().await;
    let (gina, erin) = (as_user(env, "gina").await?, as_user(env, "erin").await?);
    let q = &env.q;
    // The controller counts reservations in the status; pretend gina used her 2 images today
    // (the day as the API counts it, in the tenant's time zone).
    let (_, me) = gina.get("/api/v1/me").await?;
    let today = me["tenants"][0]["quota"]["day"]
        .as_str()
        .unwrap()
        .to_string();
    let tenants = Api::<Tenant>::all(client.clone());
    let status = json!({"status": {"usageDay": today, "usage": [{"user": "gina@example.com", "images": 2}, {"user": "other@example.com", "images": 1}]}});
    tenants
        .patch_status(q, &PatchParams::default(), &Patch::Merge(&status))
        .await?;

    let jobs = format!("/api/v1/tenants/{q}/generations");
    let (status, body) = gina.post(&jobs, job_body()).await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "QuotaExceeded"),
        "{body}"
    );
    env.api.expect_audit(json!({"action": "generate", "outcome": "denied", "reason": "QuotaExceeded", "user": "gina@example.com"})).await?;
    let (_, me) = gina.get("/api/v1/me").await?;
    assert_eq!(me["tenants"][0]["quota"]["remaining"], 0);

    let reset = format!("/api/v1/tenants/{q}/quota/reset");
    let (status, body) = gina
        .post(&reset, json!({"user": "gina@example.com"}))
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "AdminRequired")
    );
    env.api
        .expect_audit(
            json!({"action": "quota_reset", "outcome": "denied", "user": "gina@example.com"}),
        )
        .await?;
    let (status, body) = erin
        .post(&reset, json!({"user": "gina@example.com"}))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["removedImages"], 2);
    env.api.expect_audit(json!({"action": "quota_reset", "outcome": "success", "user": "erin@example.com", "object": "gina@example.com"})).await?;
    let usage = tenants.get_status(q).await?.status.unwrap().usage;
    assert_eq!(usage.len(), 1, "only gina's entry is gone: {usage:?}");
    let (status, body) = gina.post(&jobs, job_body()).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Ok(())
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() -> anyhow::Result<()> {
    let env = env().await;
    let cluster = TestCluster::shared().await;
    // Its own API process with a tiny budget, so that other tests are not limited.
    let limited = ApiProcess::start(
        cluster,
        &env.dir,
        free_port(),
        &env.provider.issuer,
        &["--rate-limit-per-minute", "3"],
    )
    .await?;
    let hank = Bearer::new(
        &limited.url,
        &access_token(&env.provider.issuer, "hank").await?,
    );
    for _ in 0..3 {
        assert_eq!(hank.get("/api/v1/me").await?.0, StatusCode::OK);
    }
    let response = hank
        .http
        .get(format!("{}/api/v1/me", limited.url))
        .bearer_auth(&hank.token)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=20).contains(&retry), "{retry}");
    let body: Value = response.json().await?;
    assert_eq!(reason(&body), "RateLimited");
    // Another user has their own budget.
    let alice = Bearer::new(
        &limited.url,
        &access_token(&env.provider.issuer, "alice").await?,
    );
    assert_eq!(alice.get("/api/v1/me").await?.0, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn key_rotation_needs_no_restart() -> anyhow::Result<()> {
    let env = env().await;
    let cluster = TestCluster::shared().await;
    // A provider and API of their own: rotating the shared provider's keys would disturb the
    // other tests.
    let port = free_port();
    let provider = start_provider(&env.dir, &format!("http://127.0.0.1:{port}"))?;
    let api = ApiProcess::start(
        cluster,
        &env.dir,
        port,
        &provider.issuer,
        &["--jwks-max-age-seconds", "2"],
    )
    .await?;
    let own = Env {
        outputs_server: env.outputs_server.clone(),
        dir: env.dir.clone(),
        provider,
        api,
        x: env.x.clone(),
        y: env.y.clone(),
        q: env.q.clone(),
    };
    let old = Bearer::new(
        &own.api.url,
        &access_token(&own.provider.issuer, "alice").await?,
    );
    assert_eq!(old.get("/api/v1/me").await?.0, StatusCode::OK);

    let http = reqwest::Client::new();
    http.post(format!("{}/__test/rotate", own.provider.issuer))
        .send()
        .await?
        .error_for_status()?;
    let new = Bearer::new(
        &own.api.url,
        &access_token(&own.provider.issuer, "alice").await?,
    );
    assert_ne!(kid(&new.token), kid(&old.token));
    // The unknown kid makes the API fetch the keys again (at most every few seconds).
    wait_for(
        "the new key to be accepted",
        Duration::from_secs(20),
        || async { Ok((new.get("/api/v1/me").await?.0 == StatusCode::OK).then_some(())) },
    )
    .await?;
    assert_eq!(
        old.get("/api/v1/me").await?.0,
        StatusCode::OK,
        "the old key is still published"
    );

    http.post(format!("{}/__test/retire", own.provider.issuer))
        .send()
        .await?
        .error_for_status()?;
    let refused = wait_for(
        "the retired key to be refused",
        Duration::from_secs(20),
        || async {
            let (status, body) = old.get("/api/v1/me").await?;
            Ok((status == StatusCode::UNAUTHORIZED).then_some(body))
        },
    )
    .await?;
    assert_eq!(reason(&refused), "unknown_key");
    assert_eq!(new.get("/api/v1/me").await?.0, StatusCode::OK);
    Ok(())
}

fn kid(token: &str) -> String {
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn events_follow_a_job_until_it_finishes() -> anyhow::Result<()> {
    let env = env().await;
    let alice = as_user(env, "alice").await?;
    let jobs = format!("/api/v1/tenants/{}/generations", env.x);
    let (_, job) = alice.post(&jobs, job_body()).await?;
    let name = job["name"].as_str().unwrap().to_string();
    let mut stream = alice
        .http
        .get(format!("{}{jobs}/{name}/events", env.api.url))
        .bearer_auth(&alice.token)
        .send()
        .await?
        .error_for_status()?;
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    // Play the controller: running with progress, then done with an output.
    let api = Api::<GenerationJob>::namespaced(
        TestCluster::shared().await.client().await,
        &atelier_crds::tenant::namespace_for(&env.x),
    );
    let mut seen = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + DEFAULT_TIMEOUT;
    let mut step = 0;
    while tokio::time::Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(2), stream.chunk()).await;
        if let Ok(chunk) = chunk {
            let Some(chunk) = chunk? else { break };
            seen.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = seen.find("\n\n") {
                let event: String = seen.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|line| line.strip_prefix("data: ")) {
                    events.push(serde_json::from_str::<Value>(data)?);
                }
            }
        }
        let status = match step {
            0 => json!({"phase": "Running", "progress": {"step": 2, "totalSteps": 4}}),
            1 => {
                json!({"phase": "Succeeded", "progress": {"step": 4, "totalSteps": 4}, "outputs": [{
                "path": "/outputs/alice@example.com/20261129_100000_11_aaaaaaaa.png", "sha256": "00",
                "width": 256, "height": 256, "bytes": 10}]})
            }
            _ => continue,
        };
        if events.len() > step {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await?;
            step += 1;
        }
    }
    let phases: Vec<&str> = events
        .iter()
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        vec!["Pending", "Running", "Succeeded"],
        "{events:?}"
    );
    assert_eq!(events[1]["progress"], json!({"step": 2, "totalSteps": 4}));
    assert_eq!(
        events[2]["outputs"][0]["url"],
        format!(
            "/api/v1/tenants/{}/images/20261129_100000_11_aaaaaaaa.png?user=alice%40example.com",
            env.x
        )
    );
    Ok(())
}

#[tokio::test]
async fn admins_see_status_usage_and_manage_presets() -> anyhow::Result<()> {
    let env = env().await;
    let (alice, bob, carol) = (
        as_user(env, "alice").await?,
        as_user(env, "bob").await?,
        as_user(env, "carol").await?,
    );
    let base = format!("/api/v1/tenants/{}", env.x);
    let (_, job) = bob.post(&format!("{base}/generations"), job_body()).await?;
    let api = Api::<GenerationJob>::namespaced(
        TestCluster::shared().await.client().await,
        &atelier_crds::tenant::namespace_for(&env.x),
    );
    let name = job["name"].as_str().unwrap();
    let done = json!({"status": {"phase": "Succeeded", "startTime": "2026-11-29T10:00:00Z", "completionTime": "2026-11-29T10:00:30Z",
        "outputs": [{"path": "/outputs/bob@example.com/x.png", "sha256": "00", "width": 256, "height": 256, "bytes": 1}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&done))
        .await?;

    let (status, body) = alice.get(&format!("{base}/status")).await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "AdminRequired")
    );
    let (status, view) = carol.get(&format!("{base}/status")).await?;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert!(
        view["queue"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["phase"] != "Succeeded")
    );
    let (status, usage) = carol
        .get(&format!("{base}/usage?from=2026-11-29&to=2026-11-29"))
        .await?;
    assert_eq!(status, StatusCode::OK);
    let row = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == "bob@example.com")
        .expect("bob's row")
        .clone();
    assert_eq!(
        (row["images"].as_u64(), row["gpuSeconds"].as_f64()),
        (Some(1), Some(30.0))
    );
    let csv = carol
        .http
        .get(format!(
            "{}{base}/usage?format=csv&from=2026-11-29&to=2026-11-29",
            env.api.url
        ))
        .bearer_auth(&carol.token)
        .send()
        .await?;
    assert!(
        csv.headers()["content-type"]
            .to_str()?
            .starts_with("text/csv")
    );
    let csv = csv.text().await?;
    assert!(
        csv.starts_with("day,user,jobs,images,gpu_seconds\n")
            && csv.contains("2026-11-29,bob@example.com,"),
        "{csv}"
    );
    let (status, restarted) = carol.post(&format!("{base}/restart"), json!({})).await?;
    assert_eq!(
        (status, &restarted["deleted"]),
        (StatusCode::OK, &json!([]))
    );
    env.api
        .expect_audit(
            json!({"action": "restart", "outcome": "success", "user": "carol@example.com"}),
        )
        .await?;
    let (status, offloaded) = carol.post(&format!("{base}/offload"), json!({})).await?;
    assert_eq!(
        (status, &offloaded["models"]),
        (StatusCode::OK, &json!([])),
        "no inference pod runs"
    );

    // Presets: own ones stay private, tenant ones are published by admins.
    let fast = json!({"steps": 4, "width": 512, "height": 512});
    let (status, presets) = alice
        .call(
            reqwest::Method::PUT,
            &format!("{base}/presets/mine/fast"),
            Some(fast.clone()),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{presets}");
    assert_eq!(presets["mine"][0], json!({"name": "fast", "params": fast}));
    let (_, bobs) = bob.get(&format!("{base}/presets")).await?;
    assert_eq!(bobs["mine"], json!([]));
    let (status, _) = alice
        .call(
            reqwest::Method::PUT,
            &format!("{base}/presets/tenant/house"),
            Some(fast.clone()),
        )
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = carol
        .call(
            reqwest::Method::PUT,
            &format!("{base}/presets/tenant/house"),
            Some(fast.clone()),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let (_, bobs) = bob.get(&format!("{base}/presets")).await?;
    assert_eq!(bobs["tenant"][0]["name"], "house");
    let (status, presets) = alice.delete(&format!("{base}/presets/mine/fast")).await?;
    assert_eq!((status, &presets["mine"]), (StatusCode::OK, &json!([])));
    Ok(())
}

#[tokio::test]
async fn the_openapi_document_is_valid() -> anyhow::Result<()> {
    let env = env().await;
    let document: Value = reqwest::get(format!("{}/api/openapi.json", env.api.url))
        .await?
        .json()
        .await?;
    for path in [
        "/api/v1/me",
        "/api/v1/tenants/{tenant}/generations",
        "/api/v1/tenants/{tenant}/generations/{name}",
        "/api/v1/tenants/{tenant}/generations/{name}/events",
        "/api/v1/tenants/{tenant}/images",
        "/api/v1/tenants/{tenant}/images/{file}",
        "/api/v1/tenants/{tenant}/quota/reset",
        "/api/v1/tenants/{tenant}/usage",
        "/api/v1/tenants/{tenant}/presets",
    ] {
        assert!(document["paths"].get(path).is_some(), "{path} missing");
    }
    let file = env.dir.join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&document)?)?;
    let output = Command::new("node")
        .arg(paths::workspace_root().join("tests/oidc/validate-openapi.mjs"))
        .arg(&file)
        .output()?;
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn health_metrics_and_the_page() -> anyhow::Result<()> {
    let env = env().await;
    let get = |path: &str| reqwest::get(format!("{}{path}", env.api.url));
    assert_eq!(get("/healthz").await?.text().await?, "ok");
    assert_eq!(get("/readyz").await?.status(), StatusCode::OK);
    let page = get("/").await?;
    assert!(
        page.headers()["content-security-policy"]
            .to_str()?
            .contains("default-src 'self'")
    );
    assert!(page.text().await?.contains("/static/app.js"));
    assert_eq!(get("/static/app.js").await?.status(), StatusCode::OK);
    let _ = Bearer::new(&env.api.url, "not-a-token")
        .get("/api/v1/me")
        .await?;
    let metrics = get("/metrics").await?.text().await?;
    assert!(
        metrics.contains(
            "atelier_api_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("atelier_api_auth_failures_total{reason=\"malformed_token\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("atelier_api_request_duration_seconds_bucket"));
    Ok(())
}

/// The page in headless Chromium (`tests/browser/page.mjs`): login through the provider's form,
/// a generation followed live, the image, "My images", reusing parameters, logout. No
/// controller or inference pod runs here, so this test plays them: it moves the job to Running
/// with progress and then to Succeeded with an image of the outputs server.
/// With the provider down the API still starts and serves; logins and tokens it cannot check
/// get clear answers instead of hanging or crashing.
#[tokio::test]
async fn a_provider_outage_is_reported_clearly() -> anyhow::Result<()> {
    let env = env().await;
    let cluster = TestCluster::shared().await;
    // Nothing listens on this port.
    let issuer = format!("http://127.0.0.1:{}", free_port());
    let api = ApiProcess::start(cluster, &env.dir, free_port(), &issuer, &[]).await?;
    let mut browser = Browser::new();
    let response = browser
        .send(
            reqwest::Method::GET,
            &format!("{}/auth/login", api.url),
            None,
            HeaderMap::new(),
        )
        .await?;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        location(&api.url, &response)?,
        format!("{}/?error=provider_unavailable", api.url)
    );
    api.expect_audit(
        json!({"action": "login", "outcome": "failure", "reason": "provider_unavailable"}),
    )
    .await?;
    let token = oidc::mint(
        &env.provider.issuer,
        "sign",
        &json!({"sub": "alice", "email": "alice@example.com"}),
        None,
    )
    .await?;
    let (status, body) = Bearer::new(&api.url, &token).get("/api/v1/me").await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable"),
        "{body}"
    );
    Ok(())
}

/// Issue 16, items 1 and 2: what the demo let through. A token for alice's address that the
/// provider never verified, and one whose e-mail is `al<TAB>ice@...` (which the URL parser
/// made alice's folder), both reach nothing; the same token with alice's verified address
/// reads her history (so the refusals are about the identity, not the route).
#[tokio::test]
async fn unverified_or_unprintable_identities_reach_no_ones_images() -> anyhow::Result<()> {
    let env = env().await;
    let images = format!("/api/v1/tenants/{}/images", env.x);
    let as_claims = |claims: Value| {
        let images = images.clone();
        async move {
            let token = oidc::mint(&env.provider.issuer, "sign", &claims, None).await?;
            Bearer::new(&env.api.url, &token).get(&images).await
        }
    };
    let alice = |email: &str, verified: Value| json!({"sub": "mallory", "email": email, "email_verified": verified, "groups": ["team-x"]});
    let (status, page) = as_claims(alice("alice@example.com", json!(true))).await?;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        page["images"][0]["metadata"]["prompt"], "alice's secret fox",
        "{page}"
    );
    for (claims, expected) in [
        (alice("alice@example.com", json!(false)), "unverified_email"),
        (alice("alice@example.com", Value::Null), "unverified_email"),
        (alice("al\tice@example.com", json!(true)), "bad_user_claim"),
        (alice("alice@example.com\n", json!(true)), "bad_user_claim"),
        (alice(".\t.", json!(true)), "bad_user_claim"),
    ] {
        let (status, body) = as_claims(claims.clone()).await?;
        assert_eq!(
            (status, reason(&body)),
            (StatusCode::UNAUTHORIZED, expected),
            "{claims}: {body}"
        );
        assert!(!body.to_string().contains("secret fox"));
    }
    // An admin cannot name such a user either.
    let carol = as_user(env, "carol").await?;
    let (status, body) = carol
        .get(&format!(
            "{images}?user={}",
            query_value("al\tice@example.com")
        ))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    Ok(())
}

fn query_value(value: &str) -> String {
    reqwest::Url::parse_with_params("http://x/", &[("v", value)])
        .unwrap()
        .query()
        .unwrap()
        .trim_start_matches("v=")
        .to_string()
}

/// Issue 16, item 1 at the browser login: the provider says the address is unverified.
#[tokio::test]
async fn an_unverified_email_cannot_log_in() -> anyhow::Result<()> {
    let env = env().await;
    let mut browser = Browser::new();
    let (form_url, _) = browser
        .navigate(&format!("{}/auth/login", env.api.url), None)
        .await?;
    let (landed, _) = browser
        .sign_in(&form_url, "mallory@example.com", "mallory-pw", None)
        .await?;
    assert!(landed.ends_with("/?error=unverified_email"), "{landed}");
    env.api
        .expect_audit(
            json!({"action": "login", "outcome": "failure", "reason": "unverified_email"}),
        )
        .await?;
    let session: Value = browser
        .send(
            reqwest::Method::GET,
            &format!("{}/auth/session", env.api.url),
            None,
            HeaderMap::new(),
        )
        .await?
        .json()
        .await?;
    assert_eq!(session["authenticated"], false, "{session}");
    Ok(())
}

/// Issue 16, items 4 and 7: a token with critical header extensions is refused (RFC 7515),
/// and so is a token for the API's audience that carries ID-token claims.
#[tokio::test]
async fn critical_headers_and_id_tokens_are_refused() -> anyhow::Result<()> {
    let env = env().await;
    let claims = json!({"sub": "alice", "email": "alice@example.com", "email_verified": true, "groups": ["team-x"]});
    let issuer = &env.provider.issuer;
    let plain = oidc::mint_with_header(issuer, &claims, &json!({})).await?;
    let (status, body) = Bearer::new(&env.api.url, &plain).get("/api/v1/me").await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let critical =
        oidc::mint_with_header(issuer, &claims, &json!({"crit": ["exp"], "exp": 0})).await?;
    let (status, body) = Bearer::new(&env.api.url, &critical)
        .get("/api/v1/me")
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::UNAUTHORIZED, "critical_header"),
        "{body}"
    );
    let mut id_token = claims.clone();
    id_token["at_hash"] = json!("77QmUPtjPfzWtF2AnpK9RQ");
    let id_token = oidc::mint(issuer, "sign", &id_token, None).await?;
    let (status, body) = Bearer::new(&env.api.url, &id_token)
        .get("/api/v1/me")
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::UNAUTHORIZED, "id_token_as_bearer"),
        "{body}"
    );
    env.api
        .expect_audit(
            json!({"action": "authenticate", "outcome": "denied", "reason": "id_token_as_bearer"}),
        )
        .await?;
    Ok(())
}

/// Issue 16, item 6: with `--trusted-proxy-header`, the header counts only on connections from
/// `--trusted-proxy-cidrs`; from a trusted proxy, a missing or garbage header is no address.
/// Two API processes of their own: one whose proxies are elsewhere (so this test's connection
/// from 127.0.0.1 is a pod talking to the API directly), one that trusts 127.0.0.0/8.
#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() -> anyhow::Result<()> {
    let env = env().await;
    let cluster = TestCluster::shared().await;
    let client = cluster.client().await;
    let (office, loopback) = (unique_name("api-office"), unique_name("api-loop"));
    for (name, cidrs) in [
        (&office, json!(["192.0.2.0/24"])),
        (&loopback, json!(["127.0.0.0/8"])),
    ] {
        let tenant: Tenant = serde_json::from_value(json!({
            "apiVersion": "atelier.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"members": [{"group": "team-x", "role": "user"}], "allowedSourceCidrs": cidrs},
        }))?;
        Api::<Tenant>::all(client.clone())
            .create(&PostParams::default(), &tenant)
            .await?;
    }
    let token = access_token(&env.provider.issuer, "alice").await?;
    let (office_name, loopback_name) = (office.as_str(), loopback.as_str());
    let me = |api: &str, forwarded: Option<&str>| {
        let request = reqwest::Client::new()
            .get(format!("{api}/api/v1/me"))
            .bearer_auth(&token);
        let request = match forwarded {
            Some(value) => request.header("x-forwarded-for", value),
            None => request,
        };
        async move {
            let me: Value = request.send().await?.error_for_status()?.json().await?;
            let allowed = |tenant: &str| {
                me["tenants"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|t| t["name"] == tenant)
                    .map(|t| t["sourceAllowed"].clone())
            };
            anyhow::Ok((allowed(office_name), allowed(loopback_name)))
        }
    };
    // An API that honours X-Forwarded-For from `proxies`, once its tenant watch has both tenants.
    let trusting = |proxies: &'static str| async move {
        let api = ApiProcess::start(
            cluster,
            &env.dir,
            free_port(),
            &env.provider.issuer,
            &[
                "--trusted-proxy-header",
                "X-Forwarded-For",
                "--trusted-proxy-cidrs",
                proxies,
            ],
        )
        .await?;
        wait_for(
            "the API to see the new tenants",
            DEFAULT_TIMEOUT,
            || async {
                let seen = me(&api.url, None).await?;
                Ok((seen.0.is_some() && seen.1.is_some()).then_some(()))
            },
        )
        .await?;
        anyhow::Ok(api)
    };
    let trust_elsewhere = trusting("10.99.0.0/16").await?;
    assert_eq!(
        me(&trust_elsewhere.url, Some("192.0.2.7")).await?,
        (Some(json!(false)), Some(json!(true))),
        "a forged header from a peer that is no proxy changes nothing"
    );
    let trust_loopback = trusting("127.0.0.0/8").await?;
    assert_eq!(
        me(&trust_loopback.url, Some("6.6.6.6, 192.0.2.7")).await?,
        (Some(json!(true)), Some(json!(false))),
        "the proxy's entry counts"
    );
    for missing in [None, Some("garbage")] {
        assert_eq!(
            me(&trust_loopback.url, missing).await?,
            (Some(json!(false)), Some(json!(false))),
            "{missing:?} from the proxy: no address, so no restricted tenant (not the proxy's own address)"
        );
    }
    let (status, body) = Bearer::new(&trust_loopback.url, &token)
        .get(&format!("/api/v1/tenants/{loopback}/images"))
        .await?;
    assert_eq!(
        (status, reason(&body)),
        (StatusCode::FORBIDDEN, "SourceNotAllowed"),
        "{body}"
    );
    Ok(())
}
