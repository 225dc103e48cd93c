//! Prometheus metrics of both server modes, in the text exposition format.
//!
//! Values that mirror state held elsewhere (jobs by state, queue depth, model state, memory) are
//! refreshed when scraped rather than kept in sync on every change: a scrape is rare, and the
//! job registry stays the single source of truth.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::jobs::{self, JobState};
use super::warm::{ModelState, Move};

const PREFIX: &str = "atelier_inference";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MoveLabels {
    to: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

fn state(state: &str) -> StateLabels {
    StateLabels {
        state: state.to_owned(),
    }
}

fn move_labels(to: Move) -> MoveLabels {
    let to = match to {
        Move::ToDevice => "device",
        Move::ToHost => "host",
    };
    MoveLabels { to: to.to_owned() }
}

/// Resident set size of this process, from `/proc/self/status` (Linux only; `None` elsewhere).
fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn encode_registry(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

/// Metrics of `serve`.
#[derive(Debug)]
pub struct InferenceMetrics {
    registry: Registry,
    steps: Counter,
    steps_per_second: Gauge<f64, AtomicU64>,
    generation_seconds: Histogram,
    model_state: Family<StateLabels, Gauge>,
    model_moves: Family<MoveLabels, Counter>,
    jobs: Family<StateLabels, Gauge>,
    jobs_finished: Family<StateLabels, Counter>,
    queue_depth: Gauge,
    capacity: Gauge,
    resident_memory: Gauge,
}

impl InferenceMetrics {
    pub fn new(capacity: usize) -> Self {
        let mut metrics = InferenceMetrics {
            registry: Registry::with_prefix(PREFIX),
            steps: Counter::default(),
            steps_per_second: Gauge::default(),
            // 1 s .. ~17 min: tiny CPU jobs to large batches on a slow GPU.
            generation_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            model_state: Family::default(),
            model_moves: Family::default(),
            jobs: Family::default(),
            jobs_finished: Family::default(),
            queue_depth: Gauge::default(),
            capacity: Gauge::default(),
            resident_memory: Gauge::default(),
        };
        let r = &mut metrics.registry;
        r.register("steps", "Denoising steps completed", metrics.steps.clone());
        r.register(
            "steps_per_second",
            "Denoising speed of the latest step",
            metrics.steps_per_second.clone(),
        );
        r.register(
            "generation_seconds",
            "Wall time of successful jobs, from start to written outputs",
            metrics.generation_seconds.clone(),
        );
        r.register(
            "model_state",
            "1 for the state the model is in (loading, host, device), 0 for the others",
            metrics.model_state.clone(),
        );
        r.register(
            "model_moves",
            "Moves of the model to the device (before a job) and back to host memory (when idle)",
            metrics.model_moves.clone(),
        );
        r.register(
            "jobs",
            "Jobs held by this process, by state",
            metrics.jobs.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs that ended, by final state",
            metrics.jobs_finished.clone(),
        );
        r.register(
            "queue_depth",
            "Accepted jobs waiting for the generator",
            metrics.queue_depth.clone(),
        );
        r.register(
            "capacity",
            "Jobs this process accepts at once",
            metrics.capacity.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            metrics.resident_memory.clone(),
        );
        metrics
            .capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        // Every series exists from the start, so a dashboard never sees gaps before first use.
        for s in JobState::ALL.iter().filter(|s| s.is_finished()) {
            let _ = metrics.jobs_finished.get_or_create(&state(s.as_str()));
        }
        for to in [Move::ToDevice, Move::ToHost] {
            let _ = metrics.model_moves.get_or_create(&move_labels(to));
        }
        metrics.set_model_state(ModelState::Loading);
        metrics
    }

    /// One denoising step done, `took` after the previous one.
    pub fn step(&self, took: Duration) {
        self.steps.inc();
        let secs = took.as_secs_f64();
        if secs > 0.0 {
            self.steps_per_second.set(1.0 / secs);
        }
    }

    pub fn set_model_state(&self, current: ModelState) {
        for s in ModelState::ALL {
            self.model_state
                .get_or_create(&state(s.as_str()))
                .set(i64::from(s == current));
        }
    }

    pub fn model_moved(&self, to: Move) {
        self.model_moves.get_or_create(&move_labels(to)).inc();
    }

    pub fn job_finished(&self, final_state: JobState, took: Duration) {
        self.jobs_finished
            .get_or_create(&state(final_state.as_str()))
            .inc();
        if final_state == JobState::Succeeded {
            self.generation_seconds.observe(took.as_secs_f64());
        }
    }

    pub fn encode(&self, jobs: &jobs::Registry) -> String {
        for s in JobState::ALL {
            let count = i64::try_from(jobs.count(s)).unwrap_or(i64::MAX);
            self.jobs.get_or_create(&state(s.as_str())).set(count);
            if s == JobState::Queued {
                self.queue_depth.set(count);
            }
        }
        self.resident_memory
            .set(resident_memory_bytes().unwrap_or(0));
        encode_registry(&self.registry)
    }
}

/// What `serve-outputs` served.
#[derive(Debug, Clone, Copy)]
pub enum OutputsRequest {
    List,
    File,
}

/// Metrics of `serve-outputs`.
#[derive(Debug)]
pub struct OutputsMetrics {
    registry: Registry,
    requests: Family<KindLabels, Counter>,
    resident_memory: Gauge,
}

impl Default for OutputsMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let requests = Family::<KindLabels, Counter>::default();
        let resident_memory = Gauge::default();
        registry.register(
            "outputs_requests",
            "History requests served, by kind",
            requests.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            resident_memory.clone(),
        );
        OutputsMetrics {
            registry,
            requests,
            resident_memory,
        }
    }
}

impl OutputsMetrics {
    pub fn request(&self, kind: OutputsRequest) {
        let kind = match kind {
            OutputsRequest::List => "list",
            OutputsRequest::File => "file",
        };
        self.requests
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        self.resident_memory
            .set(resident_memory_bytes().unwrap_or(0));
        encode_registry(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_metrics_text() {
        let metrics = InferenceMetrics::new(2);
        metrics.step(Duration::from_millis(250));
        metrics.set_model_state(ModelState::Device);
        metrics.model_moved(Move::ToDevice);
        metrics.job_finished(JobState::Succeeded, Duration::from_secs(3));
        let text = metrics.encode(&jobs::Registry::new(2, jobs::Retention::default()));
        for line in [
            "atelier_inference_steps_total 1",
            "atelier_inference_steps_per_second 4.0",
            "atelier_inference_generation_seconds_count 1",
            "atelier_inference_model_state{state=\"device\"} 1",
            "atelier_inference_model_state{state=\"host\"} 0",
            "atelier_inference_model_moves_total{to=\"device\"} 1",
            "atelier_inference_model_moves_total{to=\"host\"} 0",
            "atelier_inference_jobs{state=\"queued\"} 0",
            "atelier_inference_jobs_finished_total{state=\"succeeded\"} 1",
            "atelier_inference_jobs_finished_total{state=\"failed\"} 0",
            "atelier_inference_queue_depth 0",
            "atelier_inference_capacity 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("atelier_inference_process_resident_memory_bytes "))
            .expect("rss line");
        assert!(rss.parse::<i64>().unwrap() > 0);
    }
}
