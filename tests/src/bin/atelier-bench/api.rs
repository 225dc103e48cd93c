//! The REST API under load: `atelier-operator api` against the test control plane and the test
//! OpenID provider (npm `oidc-provider`, `tests/oidc/provider.mjs`), driven by a small load
//! generator (fixed concurrency, keep-alive connections on loopback), and JWT validation on its
//! own (the API's own validator, in a loop).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use atelier_operator::api::auth::claims::ClaimNames;
use atelier_operator::api::auth::jwt::{JwksSource, JwtValidator, TokenRules};
use atelier_tests::TestProcess;
use atelier_tests::oidc::{self, OidcProvider};
use serde::Serialize;
use serde_json::{Value, json};

use crate::platform::{Platform, USERS_GROUP, real_bin_dir};
use crate::stats::Summary;

const AUDIENCE: &str = "https://atelier.bench/api";

/// One endpoint under load.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointLoad {
    pub endpoint: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: usize,
    pub errors: usize,
    pub requests_per_second: f64,
    pub latency_ms: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiBench {
    pub tenants_visible: usize,
    pub endpoints: Vec<EndpointLoad>,
    /// One `JwtValidator::validate` (RS256, cached key), microseconds.
    pub jwt_validate_us: Summary,
    pub api_cpu_seconds: f64,
    pub api_peak_rss_mib: f64,
}

/// The test OpenID provider with one user of the benchmark's tenants.
fn start_provider(work: &Path) -> anyhow::Result<OidcProvider> {
    let config = json!({
        "audience": AUDIENCE,
        "clients": [{
            "client_id": "atelier-api",
            "client_secret": "bench-secret",
            "redirect_uris": ["http://127.0.0.1:9/auth/callback"],
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
        }],
        "users": [{ "id": "user0", "email": "user0@example.com", "password": "pw", "groups": [USERS_GROUP] }],
    });
    OidcProvider::start(&work.join("oidc.json"), &config)
}

struct FixedJwks(Value);

impl JwksSource for FixedJwks {
    async fn fetch(&self) -> Result<Value, String> {
        Ok(self.0.clone())
    }
}

/// `GET url` with the token at `concurrency` for `duration`.
async fn load(
    http: &reqwest::Client,
    label: &str,
    url: &str,
    token: &str,
    concurrency: usize,
    duration: Duration,
) -> EndpointLoad {
    let started = Instant::now();
    let deadline = started + duration;
    let workers = (0..concurrency).map(|_| {
        let (http, url, token) = (http.clone(), url.to_string(), token.to_string());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let ok = match http.get(&url).bearer_auth(&token).send().await {
                    Ok(response) if response.status().is_success() => {
                        response.bytes().await.is_ok()
                    }
                    _ => false,
                };
                if ok {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        })
    });
    let mut latencies = Vec::new();
    let mut errors = 0;
    for (l, e) in futures::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
    {
        latencies.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    let result = EndpointLoad {
        endpoint: label.to_string(),
        concurrency,
        seconds,
        requests: latencies.len(),
        errors,
        requests_per_second: latencies.len() as f64 / seconds,
        latency_ms: Summary::of_durations(&latencies),
    };
    crate::say!(
        "{label}: {:.0} req/s, p99 {:.1} ms, {} errors",
        result.requests_per_second,
        result.latency_ms.p99,
        errors
    );
    result
}

/// Runs the API benchmark against tenants and jobs that already exist: `tenant` must have a
/// job `job` of `user0@example.com`.
pub async fn run(
    platform: &Platform,
    tenant: &str,
    job: &str,
    tenants_visible: usize,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<ApiBench> {
    let provider = start_provider(&platform.work)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(platform.work.join("api.log"))?;
    let mut command = Command::new(real_bin_dir().join("atelier-operator"));
    command
        .args(["api", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--issuer-url",
            &provider.issuer,
            "--client-id",
            "atelier-api",
        ])
        .args([
            "--audience",
            AUDIENCE,
            "--public-url",
            &url,
            "--insecure-cookies",
        ])
        // The per-user limit (300/min by default) would turn the benchmark into 429s.
        .args(["--rate-limit-per-minute", "1000000000"])
        .env("ATELIER_OIDC_CLIENT_SECRET", "bench-secret")
        .env("KUBECONFIG", platform.cluster.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let (api, _) = TestProcess::spawn(command).context("starting atelier-operator api")?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!(
                "the API did not get ready; see {}",
                platform.work.join("api.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = json!({
        "sub": "user0", "email": "user0@example.com", "email_verified": true, "groups": [USERS_GROUP],
        "iat": now, "exp": now + 3600,
    });
    let token = oidc::mint(&provider.issuer, "sign", &claims, None).await?;
    // The first request fetches the JWKS; it is not measured.
    let first = http
        .get(format!("{url}/api/v1/me"))
        .bearer_auth(&token)
        .send()
        .await?;
    if !first.status().is_success() {
        bail!("GET /api/v1/me: {} {}", first.status(), first.text().await?);
    }
    let cpu_before = crate::procs::cpu_seconds(api.id()).unwrap_or(0.0);
    let mut endpoints = Vec::new();
    for (label, path) in [
        (
            "GET /healthz (no auth, no Kubernetes)",
            "/healthz".to_string(),
        ),
        ("GET /api/v1/me", "/api/v1/me".to_string()),
        (
            "GET /api/v1/tenants/{t}/generations/{id}",
            format!("/api/v1/tenants/{tenant}/generations/{job}"),
        ),
    ] {
        endpoints.push(
            load(
                &http,
                label,
                &format!("{url}{path}"),
                &token,
                concurrency,
                duration,
            )
            .await,
        );
    }
    let api_cpu = crate::procs::cpu_seconds(api.id()).unwrap_or(0.0) - cpu_before;
    let api_peak = crate::procs::peak_rss(api.id()).unwrap_or(0);
    drop(api);

    let validator = JwtValidator::new(
        TokenRules {
            issuer: provider.issuer.clone(),
            audience: AUDIENCE.into(),
            claims: ClaimNames {
                user: "email".into(),
                groups: "groups".into(),
            },
            jwks_max_age: Duration::from_secs(3600),
        },
        FixedJwks(provider.jwks().await?),
    );
    validator
        .validate(&token)
        .await
        .map_err(|e| anyhow::anyhow!("the benchmark token is refused: {e}"))?;
    let mut validations = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let started = Instant::now();
        let _ = std::hint::black_box(validator.validate(&token).await);
        validations.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(ApiBench {
        tenants_visible,
        endpoints,
        jwt_validate_us: Summary::of(&validations),
        api_cpu_seconds: api_cpu,
        api_peak_rss_mib: api_peak as f64 / f64::from(1u32 << 20),
    })
}
