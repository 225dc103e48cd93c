//! The HTTP server of an inference pod (`serve`) and of a tenant's history (`serve-outputs`).
//!
//! Both take an already bound listener, so tests (and the binary) choose the address: the
//! operator passes `--listen $(POD_IP):8080`, tests bind `127.0.0.1:0`.

pub mod api;
pub mod auth;
pub mod history;
pub mod jobs;
pub mod metrics;
pub mod simulate;
pub mod warm;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::net::TcpListener;

use crate::pipeline::{self, ComputeDtype, DeviceChoice, Precision};
use api::AppState;
use history::HistoryState;
use jobs::{Registry, Retention};
use metrics::{InferenceMetrics, OutputsMetrics};
use worker::WorkerConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting the generator thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("loading the model: {0}")]
    ModelLoad(#[source] pipeline::Error),
    #[error("serving HTTP: {0}")]
    Http(#[source] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_dir: PathBuf,
    pub outputs_dir: PathBuf,
    pub precision: Precision,
    /// The device of the model while it is warm.
    pub device: DeviceChoice,
    /// `None` for the device's own compute dtype.
    pub compute_dtype: Option<ComputeDtype>,
    /// Jobs accepted at once, running and waiting; more get 429.
    pub concurrency: usize,
    /// Time without jobs after which the weights leave the device.
    pub idle_offload: Duration,
    /// On shutdown, how long running jobs may take to finish before they are cancelled.
    pub shutdown_grace: Duration,
    /// The tenant's token every `/v1` request must carry; `None` leaves the API open.
    pub api_token: Option<auth::ApiToken>,
}

/// Runs the inference server until `shutdown` resolves and the jobs are drained, or until the
/// model fails to load.
///
/// Shutdown (SIGTERM): readiness turns 503 and new jobs are refused at once, while HTTP keeps
/// serving so the operator can still read results. Running jobs get `shutdown_grace` to finish
/// — a finished image is worth more than a retry elsewhere that starts from zero — and are
/// cancelled after that, so the pod always ends within its termination grace period.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    serve_with(listener, config, None, shutdown).await
}

/// [`serve`] with the simulated worker of [`simulate`] instead of the model (`serve --simulate`).
pub async fn serve_simulated(
    listener: TcpListener,
    config: ServeConfig,
    simulate: simulate::SimulateConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    serve_with(listener, config, Some(simulate), shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    config: ServeConfig,
    simulate: Option<simulate::SimulateConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics = Arc::new(InferenceMetrics::new(config.concurrency));
    let outputs_dir = config.outputs_dir.clone();
    let spawned = match simulate {
        Some(simulate) => simulate::spawn(simulate, config.outputs_dir, Arc::clone(&metrics)),
        None => worker::spawn(
            WorkerConfig {
                model_dir: config.model_dir,
                outputs_dir: config.outputs_dir,
                precision: config.precision,
                device: config.device,
                compute_dtype: config.compute_dtype,
                idle_offload: config.idle_offload,
            },
            Arc::clone(&metrics),
        ),
    }
    .map_err(Error::Spawn)?;
    let state = Arc::new(AppState {
        jobs: Mutex::new(Registry::new(config.concurrency, Retention::default())),
        commands: spawned.commands,
        model: spawned.model,
        metrics,
        outputs_dir,
        draining: AtomicBool::new(false),
    });
    let app = api::router(Arc::clone(&state), config.api_token);
    let stop = drain_after(shutdown, state, config.shutdown_grace);
    tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(stop) => served.map_err(Error::Http),
        Ok(e) = spawned.load_failed => Err(Error::ModelLoad(e)),
    }
}

/// Resolves when HTTP may stop: after `shutdown`, once no job is active any more.
async fn drain_after(shutdown: impl Future<Output = ()>, state: Arc<AppState>, grace: Duration) {
    const POLL: Duration = Duration::from_millis(100);
    /// After cancelling, a job stops at its next step; this bounds a step that hangs.
    const CANCEL_WAIT: Duration = Duration::from_secs(10);

    shutdown.await;
    state.draining.store(true, Ordering::SeqCst);
    let active = || state.jobs().active();
    tracing::info!(active = active(), grace = ?grace, "shutting down: draining jobs");
    let deadline = Instant::now() + grace;
    while active() > 0 && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    if active() > 0 {
        let now = Timestamp::now();
        let jobs = state.jobs().list(now);
        for job in jobs.iter().filter(|job| !job.state().is_finished()) {
            tracing::warn!(job = %job.spec.id, "cancelling job at shutdown");
            job.cancel(now);
        }
        let deadline = Instant::now() + CANCEL_WAIT;
        while active() > 0 && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
    }
    tracing::info!("drained; stopping HTTP");
}

/// Runs the history server (`serve-outputs`) until `shutdown` resolves.
pub async fn serve_outputs(
    listener: TcpListener,
    outputs_dir: PathBuf,
    api_token: Option<auth::ApiToken>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let state = Arc::new(HistoryState {
        outputs_dir,
        metrics: OutputsMetrics::default(),
    });
    axum::serve(listener, history::router(state, api_token))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::Http)
}
