//! The generation worker: one OS thread that owns the pipeline.
//!
//! Generation is CPU/GPU-bound and blocking, so it never runs on the async runtime. One thread
//! also means one generation at a time, which is what a single GPU can hold for Flux; jobs beyond
//! that wait in the channel (the "queued" state), up to the server's capacity. Moves of the
//! weights happen on this thread too, between jobs, so they can never overlap a generation.

use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use super::jobs::{FailureReason, Job, JobError, Outcome};
use super::metrics::InferenceMetrics;
use super::warm::{self, ModelState, Move, WarmKeeper};
use crate::outputs::ImageData;
use crate::pipeline::{
    self, ComputeDtype, DeviceChoice, LoadOptions, Pipeline, Placement, Precision,
};

/// What the HTTP side asks of the worker.
pub enum Command {
    Run(Arc<Job>),
    /// Move the weights to host memory now; answered once done.
    Offload(oneshot::Sender<Result<(), OffloadError>>),
}

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error(transparent)]
    NotIdle(#[from] warm::Error),
    #[error("moving the model to host memory failed: {0}")]
    Move(#[source] pipeline::Error),
}

/// The model as the API reports it (`GET /v1/model`, `/readyz`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelView {
    pub name: String,
    pub state: ModelState,
    pub precision: &'static str,
    pub weight_bytes: u64,
    #[serde(skip)]
    pub default_steps: u32,
    #[serde(skip)]
    pub default_guidance: f32,
}

pub struct WorkerConfig {
    pub model_dir: PathBuf,
    pub outputs_dir: PathBuf,
    pub precision: Precision,
    pub device: DeviceChoice,
    pub compute_dtype: Option<ComputeDtype>,
    pub idle_offload: Duration,
}

pub struct Spawned {
    pub commands: mpsc::Sender<Command>,
    pub model: watch::Receiver<ModelView>,
    /// Resolves if loading the model fails; the thread has ended then.
    pub load_failed: oneshot::Receiver<pipeline::Error>,
}

/// Starts the worker thread; the model starts loading at once.
pub fn spawn(config: WorkerConfig, metrics: Arc<InferenceMetrics>) -> std::io::Result<Spawned> {
    // Until the checkpoint is read, the directory name is the best name there is.
    let name = config
        .model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (model_tx, model_rx) = watch::channel(ModelView {
        name,
        state: ModelState::Loading,
        precision: config.precision.as_str(),
        weight_bytes: 0,
        default_steps: 0,
        default_guidance: 0.0,
    });
    let (commands_tx, commands_rx) = mpsc::channel();
    let (failed_tx, failed_rx) = oneshot::channel();
    thread::Builder::new().name("generator".into()).spawn(move || {
        let mut warm = WarmKeeper::new(config.idle_offload, Instant::now());
        // A GPU model loads straight onto the GPU, tensor by tensor: loading it into host
        // memory first would need the whole model there.
        let placement = match config.device {
            DeviceChoice::Cpu => Placement::Host,
            DeviceChoice::Cuda(_) => Placement::Device,
        };
        let options = LoadOptions {
            precision: config.precision,
            device: config.device,
            compute_dtype: config.compute_dtype,
            placement,
        };
        let pipeline = match Pipeline::load_with(&config.model_dir, &options) {
            Ok(pipeline) => pipeline,
            Err(e) => {
                let _ = failed_tx.send(e);
                return;
            }
        };
        warm.loaded(Instant::now());
        if placement == Placement::Device {
            warm.moved(Move::ToDevice, Instant::now());
        }
        let info = pipeline.info();
        model_tx.send_modify(|m| {
            m.name = info.name.clone();
            m.state = warm.state();
            m.weight_bytes = pipeline.weight_bytes();
            m.default_steps = info.default_steps;
            m.default_guidance = info.default_guidance;
        });
        metrics.set_model_state(warm.state());
        tracing::info!(model = %info.name, variant = %info.variant, weight_bytes = pipeline.weight_bytes(), "model loaded");
        let worker =
            Worker { pipeline, warm, outputs_dir: config.outputs_dir, model: model_tx, metrics, commands: commands_rx };
        worker.run();
    })?;
    Ok(Spawned {
        commands: commands_tx,
        model: model_rx,
        load_failed: failed_rx,
    })
}

struct Worker {
    pipeline: Pipeline,
    warm: WarmKeeper,
    outputs_dir: PathBuf,
    model: watch::Sender<ModelView>,
    metrics: Arc<InferenceMetrics>,
    commands: mpsc::Receiver<Command>,
}

impl Worker {
    /// Serves commands until every sender is gone (the server stopped), offloading the model
    /// when the warm keeper says so.
    fn run(mut self) {
        loop {
            let command = match self.warm.deadline() {
                Some(due) => self
                    .commands
                    .recv_timeout(due.saturating_duration_since(Instant::now())),
                None => self
                    .commands
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match command {
                Ok(Command::Run(job)) => self.run_job(&job),
                Ok(Command::Offload(reply)) => {
                    let result = match self.warm.offload_now() {
                        Ok(Some(to)) => self.apply(to).map_err(OffloadError::Move),
                        Ok(None) => Ok(()),
                        Err(e) => Err(e.into()),
                    };
                    let _ = reply.send(result);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(to) = self.warm.poll(Instant::now()) {
                        tracing::info!("offloading the idle model to host memory");
                        if let Err(e) = self.apply(to) {
                            tracing::error!(error = %e, "idle offload failed");
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Performs a move and records the new state everywhere it is reported.
    fn apply(&mut self, to: Move) -> Result<(), pipeline::Error> {
        let placement = match to {
            Move::ToDevice => Placement::Device,
            Move::ToHost => Placement::Host,
        };
        let started = Instant::now();
        self.pipeline.move_to(placement)?;
        self.warm.moved(to, Instant::now());
        let state = self.warm.state();
        self.model.send_modify(|m| m.state = state);
        self.metrics.set_model_state(state);
        self.metrics.model_moved(to);
        tracing::info!(state = state.as_str(), took = ?started.elapsed(), "model moved");
        Ok(())
    }

    fn run_job(&mut self, job: &Job) {
        if !job.start(Timestamp::now()) {
            // Cancelled while it waited in the channel.
            return;
        }
        let started = Instant::now();
        let outcome = if started >= job.deadline {
            failed(
                FailureReason::DeadlineExceeded,
                "the deadline passed while the job was queued",
            )
        } else {
            let needs_move = self.warm.job_started();
            let outcome = match needs_move.map(|to| self.apply(to)) {
                Some(Err(e)) => failed(
                    FailureReason::GenerationFailed,
                    format!("moving the model to the device: {e}"),
                ),
                _ => self.generate(job),
            };
            self.warm.job_finished(Instant::now());
            outcome
        };
        job.finish(outcome, Timestamp::now());
        let status = job.status();
        self.metrics.job_finished(status.state, started.elapsed());
        let spec = &job.spec;
        tracing::info!(
            target: "audit",
            action = "generate",
            user = %spec.user,
            job = %spec.id,
            outcome = status.state.as_str(),
            reason = ?status.error.as_ref().map(|e| e.reason),
            took = ?started.elapsed(),
        );
    }

    fn generate(&self, job: &Job) -> Outcome {
        let spec = &job.spec;
        let request = spec.request();
        let mut last_step = Instant::now();
        let mut on_step = |step: u32, total: u32| {
            job.progress(step, total);
            let now = Instant::now();
            self.metrics.step(now - last_step);
            last_step = now;
            if job.cancel_requested() || now >= job.deadline {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        // A panic must fail this job, not kill the only thread that runs jobs.
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            self.pipeline.generate(&request, &mut on_step)
        }));
        // Checked after the run too: a cancel or the deadline can land after the last step
        // (during decoding), and then the images must not be written either.
        if job.cancel_requested() {
            return failed(FailureReason::Cancelled, "cancelled");
        }
        if Instant::now() >= job.deadline {
            return failed(
                FailureReason::DeadlineExceeded,
                format!("not finished within {}s", spec.timeout.as_secs()),
            );
        }
        let images = match result {
            Ok(Ok(images)) => images,
            Ok(Err(pipeline::Error::InvalidRequest(message))) => {
                return failed(FailureReason::InvalidRequest, message);
            }
            Ok(Err(e)) => return failed(FailureReason::GenerationFailed, e.to_string()),
            Err(_) => return failed(FailureReason::GenerationFailed, "the generator panicked"),
        };
        let data: Vec<ImageData<'_>> = images
            .iter()
            .map(|image| ImageData {
                png: &image.png,
                width: image.width,
                height: image.height,
                seed: image.seed,
            })
            .collect();
        spec.write_outputs(&self.outputs_dir, &self.pipeline.info().name, &data)
    }
}

fn failed(reason: FailureReason, message: impl Into<String>) -> Outcome {
    Outcome::Failed(JobError {
        reason,
        message: message.into(),
    })
}
