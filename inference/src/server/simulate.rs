//! `serve --simulate`: the job API of a real inference pod without a model, for benchmarks and
//! load tests of the control plane (see `docs/inference-api.md`, *Simulate mode*).
//!
//! It replaces only the generation worker: the HTTP API, the job registry (idempotency,
//! capacity, retention), cancellation, deadlines and the outputs writer are the real ones. Jobs
//! still run one at a time on one thread, like on a GPU. A job reports its steps (each after
//! `step_delay`, zero by default) and then writes a flat-colour PNG of the requested size plus
//! its metadata with [`outputs::write_job_outputs`], atomically, exactly like a real job. The
//! model is `host` from the start; nothing is loaded, so `--model-dir` need not exist.

use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::{oneshot, watch};

use super::jobs::{FailureReason, Job, JobError, Outcome};
use super::metrics::InferenceMetrics;
use super::warm::ModelState;
use super::worker::{Command, ModelView, Spawned};
use crate::outputs::ImageData;

/// The name `GET /v1/model` reports and metadata files record.
pub const MODEL_NAME: &str = "simulated";
/// Steps of a job that names none (the real default of FLUX.1-dev is 28; a simulation wants
/// few writes).
pub const DEFAULT_STEPS: u32 = 4;
const DEFAULT_GUIDANCE: f32 = 3.5;

#[derive(Debug, Clone, Default)]
pub struct SimulateConfig {
    /// Time each denoising step takes (zero: a job is done as soon as its files are written).
    pub step_delay: Duration,
}

/// Starts the simulated worker thread; the model is ready at once.
pub fn spawn(
    config: SimulateConfig,
    outputs_dir: PathBuf,
    metrics: Arc<InferenceMetrics>,
) -> io::Result<Spawned> {
    let (model_tx, model_rx) = watch::channel(ModelView {
        name: MODEL_NAME.into(),
        state: ModelState::Host,
        precision: "simulated",
        weight_bytes: 0,
        default_steps: DEFAULT_STEPS,
        default_guidance: DEFAULT_GUIDANCE,
    });
    metrics.set_model_state(ModelState::Host);
    let (commands_tx, commands_rx) = mpsc::channel();
    // Never sent: a simulation has no model that could fail to load.
    let (_failed_tx, failed_rx) = oneshot::channel();
    thread::Builder::new()
        .name("simulator".into())
        .spawn(move || {
            // Keeps the model channel open as long as the thread runs.
            let _model = model_tx;
            tracing::info!(step_delay = ?config.step_delay, "simulate mode: no model, flat-colour images");
            for command in commands_rx {
                match command {
                    Command::Run(job) => run_job(&job, &config, &outputs_dir, &metrics),
                    Command::Offload(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        })?;
    Ok(Spawned {
        commands: commands_tx,
        model: model_rx,
        load_failed: failed_rx,
    })
}

fn run_job(job: &Job, config: &SimulateConfig, outputs_dir: &Path, metrics: &InferenceMetrics) {
    if !job.start(Timestamp::now()) {
        return;
    }
    let started = Instant::now();
    let outcome = simulate(job, config, outputs_dir, metrics);
    job.finish(outcome, Timestamp::now());
    let status = job.status();
    metrics.job_finished(status.state, started.elapsed());
    tracing::info!(
        target: "audit",
        action = "generate",
        user = %job.spec.user,
        job = %job.spec.id,
        outcome = status.state.as_str(),
        reason = ?status.error.as_ref().map(|e| e.reason),
        took = ?started.elapsed(),
        simulated = true,
    );
}

fn simulate(
    job: &Job,
    config: &SimulateConfig,
    outputs_dir: &Path,
    metrics: &InferenceMetrics,
) -> Outcome {
    let spec = &job.spec;
    let mut last_step = Instant::now();
    for step in 1..=spec.steps {
        if !config.step_delay.is_zero() {
            thread::sleep(config.step_delay);
        }
        job.progress(step, spec.steps);
        let now = Instant::now();
        metrics.step(now - last_step);
        last_step = now;
        if let ControlFlow::Break(outcome) = interrupted(job) {
            return outcome;
        }
    }
    if let ControlFlow::Break(outcome) = interrupted(job) {
        return outcome;
    }
    let pngs: Vec<(u64, Vec<u8>)> = (0..u64::from(spec.num_images))
        .map(|index| {
            let seed = spec.seed.wrapping_add(index);
            (seed, flat_png(spec.width, spec.height, seed))
        })
        .collect();
    let images: Vec<ImageData<'_>> = pngs
        .iter()
        .map(|(seed, png)| ImageData {
            png,
            width: spec.width,
            height: spec.height,
            seed: *seed,
        })
        .collect();
    spec.write_outputs(outputs_dir, MODEL_NAME, &images)
}

/// A cancel or a passed deadline stops the job, as the real worker does between steps.
fn interrupted(job: &Job) -> ControlFlow<Outcome> {
    if job.cancel_requested() {
        return ControlFlow::Break(Outcome::Failed(JobError {
            reason: FailureReason::Cancelled,
            message: "cancelled".into(),
        }));
    }
    if Instant::now() >= job.deadline {
        return ControlFlow::Break(Outcome::Failed(JobError {
            reason: FailureReason::DeadlineExceeded,
            message: format!("not finished within {}s", job.spec.timeout.as_secs()),
        }));
    }
    ControlFlow::Continue(())
}

/// A valid RGB PNG of one colour derived from the seed (flat rows deflate to almost nothing).
pub fn flat_png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let [r, g, b, ..] = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes();
    let pixels: Vec<u8> = (0..u64::from(width) * u64::from(height))
        .flat_map(|_| [r, g, b])
        .collect();
    let mut png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .expect("writing to a Vec cannot fail");
        writer
            .write_image_data(&pixels)
            .expect("the buffer has the header's size");
        writer.finish().expect("writing to a Vec cannot fail");
    }
    png
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_png_decodes_to_the_requested_size_and_one_colour() {
        let png = flat_png(48, 32, 7);
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().expect("a valid PNG");
        let mut pixels = vec![0; reader.output_buffer_size().expect("a size")];
        let frame = reader.next_frame(&mut pixels).expect("one frame");
        assert_eq!((frame.width, frame.height), (48, 32));
        let pixels = &pixels[..frame.buffer_size()];
        assert!(pixels.chunks(3).all(|p| p == &pixels[..3]));
        assert_ne!(flat_png(16, 16, 1), flat_png(16, 16, 2));
    }
}
