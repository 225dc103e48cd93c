//! With a token file, the job API and the history API answer only requests carrying the
//! tenant's token; health, readiness and metrics stay open for the kubelet and Prometheus.

use std::time::Duration;

use atelier_inference::server::auth::ApiToken;
use atelier_inference::server::simulate::SimulateConfig;
use atelier_inference::server::{self, ServeConfig};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;

const TOKEN: &str = "the-tenants-token-0123456789";

fn token(dir: &std::path::Path) -> ApiToken {
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    ApiToken::read(&path).unwrap()
}

/// GET `url` with `bearer` (if any): the status and the error reason, if any.
async fn get(url: &str, bearer: Option<&str>) -> (StatusCode, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let reason = body["error"]["reason"].as_str().unwrap_or_default();
    (status, reason.to_string())
}

async fn assert_only_with_the_token(url: &str) {
    let refused = (StatusCode::UNAUTHORIZED, "Unauthorized".to_string());
    assert_eq!(get(url, None).await, refused, "{url} without a token");
    assert_eq!(
        get(url, Some("the-tenants-token-01234567890")).await,
        refused
    );
    assert_eq!(
        get(url, Some("another-tenants-token-123456")).await,
        refused
    );
    assert_eq!(get(url, Some(TOKEN)).await.0, StatusCode::OK, "{url}");
}

#[tokio::test]
async fn the_job_api_needs_the_tenants_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        model_dir: "/nonexistent".into(),
        outputs_dir: dir.path().to_owned(),
        precision: "bf16".parse().unwrap(),
        device: Default::default(),
        compute_dtype: None,
        concurrency: 1,
        idle_offload: Duration::from_secs(300),
        shutdown_grace: Duration::from_secs(5),
        api_token: Some(token(dir.path())),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let simulate = SimulateConfig {
        step_delay: Duration::ZERO,
    };
    tokio::spawn(server::serve_simulated(
        listener,
        config,
        simulate,
        std::future::pending(),
    ));
    assert_only_with_the_token(&format!("{base}/v1/model")).await;
    assert_only_with_the_token(&format!("{base}/v1/jobs")).await;
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            get(&format!("{base}{open}"), None).await.0,
            StatusCode::OK,
            "{open}"
        );
    }
}

#[tokio::test]
async fn the_history_api_needs_the_tenants_token() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token = token(dir.path());
    tokio::spawn(server::serve_outputs(
        listener,
        dir.path().to_owned(),
        Some(token),
        std::future::pending(),
    ));
    assert_only_with_the_token(&format!("{base}/v1/outputs/ann%40example.com")).await;
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            get(&format!("{base}{open}"), None).await.0,
            StatusCode::OK,
            "{open}"
        );
    }
}
