//! Client of the inference pods' job API (docs/inference-api.md). The job UID is the idempotency
//! key, so repeating a submission after a lost answer never generates twice.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

#[derive(Clone)]
pub struct InferenceClient {
    http: reqwest::Client,
}

impl Default for InferenceClient {
    fn default() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .build()
            .expect("a plain HTTP client always builds");
        Self { http }
    }
}

impl InferenceClient {
    pub async fn submit(
        &self,
        endpoint: SocketAddr,
        job: &SubmitRequest,
    ) -> Result<RemoteJob, Error> {
        let response = self
            .http
            .post(format!("http://{endpoint}/v1/jobs"))
            .json(job)
            .send()
            .await?;
        read(response, &job.id).await
    }

    pub async fn get(&self, endpoint: SocketAddr, id: &str) -> Result<RemoteJob, Error> {
        let response = self
            .http
            .get(format!("http://{endpoint}/v1/jobs/{id}"))
            .send()
            .await?;
        read(response, id).await
    }

    pub async fn cancel(&self, endpoint: SocketAddr, id: &str) -> Result<RemoteJob, Error> {
        let response = self
            .http
            .delete(format!("http://{endpoint}/v1/jobs/{id}"))
            .send()
            .await?;
        read(response, id).await
    }

    /// Every job the pod holds, for re-adoption after an operator restart.
    pub async fn list(&self, endpoint: SocketAddr) -> Result<Vec<RemoteJob>, Error> {
        let response = self
            .http
            .get(format!("http://{endpoint}/v1/jobs"))
            .send()
            .await?;
        let response = response.error_for_status()?;
        Ok(response.json::<JobList>().await?.jobs)
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
