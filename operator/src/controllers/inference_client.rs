//! Client of the inference pods' job API (docs/inference-api.md). The job UID is the idempotency
//! key, so repeating a submission after a lost answer never generates twice.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pod_token::{PodTokens, TokenError};

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubmitRequest {
    pub id: String,
    pub user: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f64,
    pub seed: u64,
    pub num_images: u32,
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RemoteState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteJob {
    pub id: String,
    pub state: RemoteState,
    #[serde(default)]
    pub step: u32,
    #[serde(default)]
    pub total_steps: u32,
    #[serde(default)]
    pub outputs: Vec<RemoteOutput>,
    #[serde(default)]
    pub error: Option<RemoteError>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteOutput {
    pub path: String,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RemoteError {
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: RemoteError,
}

#[derive(Debug, Deserialize)]
struct JobList {
    jobs: Vec<RemoteJob>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("inference pod unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("inference pod is at capacity")]
    AtCapacity,
    #[error("inference pod does not know job {0}")]
    NotFound(String),
    #[error("inference pod refused the job ({reason}): {message}")]
    Refused {
        status: u16,
        reason: String,
        message: String,
    },
}

/// An inference pod: its tenant namespace (whose token it requires) and its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pod {
    pub namespace: String,
    pub address: SocketAddr,
}

#[derive(Clone)]
pub struct InferenceClient {
    http: reqwest::Client,
    tokens: PodTokens,
}

impl InferenceClient {
    pub fn new(tokens: PodTokens) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .build()
            .expect("a plain HTTP client always builds");
        Self { http, tokens }
    }

    pub async fn submit(&self, pod: &Pod, job: &SubmitRequest) -> Result<RemoteJob, Error> {
        let request = self.http.post(format!("http://{}/v1/jobs", pod.address));
        let response = self.send(pod, request.json(job)).await?;
        read(response, &job.id).await
    }

    pub async fn get(&self, pod: &Pod, id: &str) -> Result<RemoteJob, Error> {
        let request = self
            .http
            .get(format!("http://{}/v1/jobs/{id}", pod.address));
        read(self.send(pod, request).await?, id).await
    }

    pub async fn cancel(&self, pod: &Pod, id: &str) -> Result<RemoteJob, Error> {
        let request = self
            .http
            .delete(format!("http://{}/v1/jobs/{id}", pod.address));
        read(self.send(pod, request).await?, id).await
    }

    /// Every job the pod holds, for re-adoption after an operator restart.
    pub async fn list(&self, pod: &Pod) -> Result<Vec<RemoteJob>, Error> {
        let request = self.http.get(format!("http://{}/v1/jobs", pod.address));
        let response = self.send(pod, request).await?.error_for_status()?;
        Ok(response.json::<JobList>().await?.jobs)
    }

    /// Sends `request` with the tenant's token; a refused token is read again next time.
    async fn send(
        &self,
        pod: &Pod,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        let token = self.tokens.get(&pod.namespace).await?;
        let response = request.bearer_auth(&*token).send().await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            self.tokens.forget(&pod.namespace);
        }
        Ok(response)
    }
}

async fn read(response: reqwest::Response, id: &str) -> Result<RemoteJob, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response.json().await?);
    }
    match status.as_u16() {
        404 => Err(Error::NotFound(id.to_string())),
        429 => Err(Error::AtCapacity),
        code => {
            let body: Option<ErrorBody> = response.json().await.ok();
            let (reason, message) = body.map_or_else(
                || ("Unknown".to_string(), format!("HTTP {code}")),
                |b| (b.error.reason, b.error.message),
            );
            Err(Error::Refused {
                status: code,
                reason,
                message,
            })
        }
    }
}
