//! The job registry: every job this process accepted, its live status, and the rules that make
//! submission idempotent and bounded.
//!
//! Each job's status sits in a `watch` channel, so the generation worker (a plain thread)
//! publishes progress with a synchronous send while HTTP handlers read the latest value or
//! stream every change (`/events`). State transitions happen inside the channel's lock, which
//! makes "cancel a queued job" and "start that job" race-free without another mutex.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::watch;

use crate::outputs::{self, ImageData, JobInfo, OutputFile};
use crate::pipeline::GenerateRequest;

/// A validated request, with defaults filled in. Two submissions with the same id are the same
/// job exactly when their specs are equal.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub id: String,
    pub user: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
    pub num_images: u32,
    pub timeout: Duration,
}

impl JobSpec {
    /// Writes the job's images under `outputs_dir` (see [`outputs::write_job_outputs`]) and
    /// turns the result into the job's outcome; the real worker and the simulated one both end here.
    pub fn write_outputs(
        &self,
        outputs_dir: &Path,
        model: &str,
        images: &[ImageData<'_>],
    ) -> Outcome {
        let info = JobInfo {
            job_id: &self.id,
            user: &self.user,
            prompt: &self.prompt,
            steps: self.steps,
            guidance: self.guidance,
            model,
            created_at: Timestamp::now(),
        };
        match outputs::write_job_outputs(outputs_dir, &info, self.seed, images) {
            Ok(files) => Outcome::Succeeded(files),
            Err(e) => {
                tracing::error!(job = %self.id, error = %e, "writing outputs failed");
                Outcome::Failed(JobError {
                    reason: FailureReason::OutputWriteFailed,
                    message: e.to_string(),
                })
            }
        }
    }

    /// What the pipeline is asked to generate for this job.
    pub fn request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            num_images: self.num_images,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Why a job did not succeed; the operator maps these onto its `GenerationJob` conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FailureReason {
    DeadlineExceeded,
    OutputWriteFailed,
    Cancelled,
    InvalidRequest,
    GenerationFailed,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobError {
    pub reason: FailureReason,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    /// Denoising steps completed so far.
    pub step: u32,
    pub total_steps: u32,
    pub seed: u64,
    pub outputs: Vec<OutputFile>,
    pub error: Option<JobError>,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(Vec<OutputFile>),
    /// `FailureReason::Cancelled` ends in state `cancelled`, every other reason in `failed`.
    Failed(JobError),
}

#[derive(Debug)]
pub struct Job {
    pub spec: JobSpec,
    /// The job must be finished by then, queueing included: the operator's timeout is about
    /// how long it waits for this pod, not how long the GPU works.
    pub deadline: Instant,
    cancel: AtomicBool,
    status: watch::Sender<JobStatus>,
}

impl Job {
    fn new(spec: JobSpec, now: Timestamp, clock: Instant) -> Self {
        let status = JobStatus {
            id: spec.id.clone(),
            state: JobState::Queued,
            step: 0,
            total_steps: spec.steps,
            seed: spec.seed,
            outputs: Vec::new(),
            error: None,
            created_at: now,
            started_at: None,
            finished_at: None,
        };
        Job {
            deadline: clock + spec.timeout,
            spec,
            cancel: AtomicBool::new(false),
            status: watch::channel(status).0,
        }
    }

    pub fn status(&self) -> JobStatus {
        self.status.borrow().clone()
    }

    pub fn state(&self) -> JobState {
        self.status.borrow().state
    }

    /// Every status change from now on (the current value counts as unseen).
    pub fn subscribe(&self) -> watch::Receiver<JobStatus> {
        let mut rx = self.status.subscribe();
        rx.mark_changed();
        rx
    }

    /// Asks the job to stop. A queued job is cancelled at once; a running one stops at its next
    /// denoising step (the worker polls [`Job::cancel_requested`]); a finished one is left alone.
    pub fn cancel(&self, now: Timestamp) {
        self.cancel.store(true, Ordering::SeqCst);
        self.status.send_if_modified(|s| {
            if s.state != JobState::Queued {
                return false;
            }
            s.state = JobState::Cancelled;
            s.error = Some(JobError {
                reason: FailureReason::Cancelled,
                message: "cancelled while queued".into(),
            });
            s.finished_at = Some(now);
            true
        });
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Queued → running. False when the job was cancelled first; the worker then skips it.
    pub fn start(&self, now: Timestamp) -> bool {
        self.status.send_if_modified(|s| {
            if s.state != JobState::Queued {
                return false;
            }
            s.state = JobState::Running;
            s.started_at = Some(now);
            true
        })
    }

    pub fn progress(&self, step: u32, total_steps: u32) {
        self.status.send_if_modified(|s| {
            if s.state != JobState::Running || (s.step, s.total_steps) == (step, total_steps) {
                return false;
            }
            s.step = step;
            s.total_steps = total_steps;
            true
        });
    }

    /// Records the end of the job; the first outcome wins.
    pub fn finish(&self, outcome: Outcome, now: Timestamp) {
        self.status.send_if_modified(|s| {
            if s.state.is_finished() {
                return false;
            }
            match outcome {
                Outcome::Succeeded(outputs) => {
                    s.state = JobState::Succeeded;
                    s.outputs = outputs;
                }
                Outcome::Failed(error) => {
                    s.state = match error.reason {
                        FailureReason::Cancelled => JobState::Cancelled,
                        _ => JobState::Failed,
                    };
                    s.error = Some(error);
                }
            }
            s.finished_at = Some(now);
            true
        });
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("job {0} already exists with a different request")]
    Conflict(String),
    #[error("at capacity: {0} job(s) accepted, no more until one finishes")]
    AtCapacity(usize),
}

/// How long finished jobs stay readable, so the operator can collect results (also after its
/// own restart, through `GET /v1/jobs`).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age: Duration,
    pub max_finished: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(3600),
            max_finished: 1000,
        }
    }
}

pub enum Submitted {
    Created(Arc<Job>),
    /// The same request was submitted before; nothing new happens.
    Existing(Arc<Job>),
}

#[derive(Debug)]
pub struct Registry {
    jobs: HashMap<String, Arc<Job>>,
    capacity: usize,
    retention: Retention,
}

impl Registry {
    pub fn new(capacity: usize, retention: Retention) -> Self {
        Registry {
            jobs: HashMap::new(),
            capacity,
            retention,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Accepts a job unless it exists already (idempotent on id) or the process is full.
    pub fn submit(
        &mut self,
        spec: JobSpec,
        now: Timestamp,
        clock: Instant,
    ) -> Result<Submitted, Error> {
        self.prune(now);
        if let Some(job) = self.jobs.get(&spec.id) {
            return if job.spec == spec {
                Ok(Submitted::Existing(Arc::clone(job)))
            } else {
                Err(Error::Conflict(spec.id))
            };
        }
        if self.active() >= self.capacity {
            return Err(Error::AtCapacity(self.capacity));
        }
        let job = Arc::new(Job::new(spec, now, clock));
        self.jobs.insert(job.spec.id.clone(), Arc::clone(&job));
        Ok(Submitted::Created(job))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.get(id).cloned()
    }

    /// All jobs held, oldest first.
    pub fn list(&mut self, now: Timestamp) -> Vec<Arc<Job>> {
        self.prune(now);
        let mut jobs: Vec<Arc<Job>> = self.jobs.values().cloned().collect();
        jobs.sort_by_key(|job| job.status.borrow().created_at);
        jobs
    }

    /// Jobs queued or running: what counts against the capacity.
    pub fn active(&self) -> usize {
        self.jobs
            .values()
            .filter(|job| !job.state().is_finished())
            .count()
    }

    pub fn count(&self, state: JobState) -> usize {
        self.jobs
            .values()
            .filter(|job| job.state() == state)
            .count()
    }

    /// Forgets finished jobs older than the retention age, then the oldest beyond the count.
    fn prune(&mut self, now: Timestamp) {
        let max_age = jiff::SignedDuration::try_from(self.retention.max_age)
            .unwrap_or(jiff::SignedDuration::MAX);
        let mut finished: Vec<(Timestamp, String)> = Vec::new();
        self.jobs.retain(|id, job| {
            let finished_at = job.status.borrow().finished_at;
            match finished_at {
                Some(at) if now.duration_since(at) > max_age => false,
                Some(at) => {
                    finished.push((at, id.clone()));
                    true
                }
                None => true,
            }
        });
        if finished.len() > self.retention.max_finished {
            finished.sort();
            let excess = finished.len() - self.retention.max_finished;
            for (_, id) in &finished[..excess] {
                self.jobs.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> JobSpec {
        JobSpec {
            id: id.into(),
            user: "alice@example.com".into(),
            prompt: "a red fox".into(),
            width: 256,
            height: 256,
            steps: 4,
            guidance: 3.5,
            seed: 42,
            num_images: 1,
            timeout: Duration::from_secs(600),
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn created(result: Result<Submitted, Error>) -> Arc<Job> {
        match result {
            Ok(Submitted::Created(job)) => job,
            Ok(Submitted::Existing(_)) => panic!("expected a new job"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn submit_is_idempotent_on_id() {
        let mut reg = Registry::new(1, Retention::default());
        let clock = Instant::now();
        let job = created(reg.submit(spec("a"), t(0), clock));
        assert_eq!(job.status().state, JobState::Queued);
        // Same request: the same job, even though the process is at capacity now.
        match reg.submit(spec("a"), t(1), clock) {
            Ok(Submitted::Existing(again)) => assert!(Arc::ptr_eq(&job, &again)),
            _ => panic!("expected the existing job"),
        }
        let mut other = spec("a");
        other.prompt = "a blue fox".into();
        assert_eq!(
            reg.submit(other, t(2), clock).err(),
            Some(Error::Conflict("a".into()))
        );
        // Also after it finished: never a second generation for the same id.
        job.finish(Outcome::Succeeded(Vec::new()), t(3));
        assert!(matches!(
            reg.submit(spec("a"), t(4), clock),
            Ok(Submitted::Existing(_))
        ));
    }

    #[test]
    fn capacity_counts_queued_and_running_jobs() {
        let mut reg = Registry::new(2, Retention::default());
        let clock = Instant::now();
        let a = created(reg.submit(spec("a"), t(0), clock));
        let b = created(reg.submit(spec("b"), t(0), clock));
        assert!(a.start(t(1)));
        assert_eq!(
            reg.submit(spec("c"), t(1), clock).err(),
            Some(Error::AtCapacity(2))
        );
        assert_eq!(reg.count(JobState::Queued), 1);
        assert_eq!(reg.count(JobState::Running), 1);
        b.cancel(t(2));
        assert_eq!(reg.active(), 1);
        created(reg.submit(spec("c"), t(2), clock));
        assert_eq!(reg.active(), 2);
    }

    #[test]
    fn cancel_wins_over_start_only_while_queued() {
        let queued = Job::new(spec("a"), t(0), Instant::now());
        queued.cancel(t(1));
        assert_eq!(queued.state(), JobState::Cancelled);
        assert!(!queued.start(t(2)), "a cancelled job must not start");
        assert_eq!(
            queued.status().error.unwrap().reason,
            FailureReason::Cancelled
        );

        let running = Job::new(spec("b"), t(0), Instant::now());
        assert!(running.start(t(1)));
        running.cancel(t(2));
        // Still running until the worker notices at the next step.
        assert_eq!(running.state(), JobState::Running);
        assert!(running.cancel_requested());
        running.finish(
            Outcome::Failed(JobError {
                reason: FailureReason::Cancelled,
                message: "cancelled".into(),
            }),
            t(3),
        );
        assert_eq!(running.state(), JobState::Cancelled);
        // Finished is final.
        running.finish(Outcome::Succeeded(Vec::new()), t(4));
        running.cancel(t(5));
        let status = running.status();
        assert_eq!(
            (status.state, status.finished_at),
            (JobState::Cancelled, Some(t(3)))
        );
    }

    #[test]
    fn progress_and_failure_states() {
        let job = Job::new(spec("a"), t(0), Instant::now());
        let mut rx = job.subscribe();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        job.progress(1, 4);
        assert!(
            !rx.has_changed().unwrap(),
            "no progress before the job runs"
        );
        job.start(t(1));
        job.progress(2, 4);
        assert_eq!(rx.borrow_and_update().step, 2);
        job.finish(
            Outcome::Failed(JobError {
                reason: FailureReason::DeadlineExceeded,
                message: "too slow".into(),
            }),
            t(2),
        );
        let status = job.status();
        assert_eq!(status.state, JobState::Failed);
        assert_eq!(status.started_at, Some(t(1)));
    }

    #[test]
    fn finished_jobs_are_pruned_by_age_and_count() {
        let retention = Retention {
            max_age: Duration::from_secs(60),
            max_finished: 2,
        };
        let mut reg = Registry::new(10, retention);
        let clock = Instant::now();
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            created(reg.submit(spec(id), t(0), clock))
                .finish(Outcome::Succeeded(Vec::new()), t(i as i64));
        }
        let running = created(reg.submit(spec("r"), t(0), clock));
        running.start(t(0));
        // Four finished, two allowed: the oldest two go; the running job always stays.
        let ids: Vec<String> = reg.list(t(10)).iter().map(|j| j.spec.id.clone()).collect();
        assert_eq!(ids.len(), 3);
        assert!(reg.get("a").is_none() && reg.get("b").is_none());
        assert!(reg.get("c").is_some() && reg.get("d").is_some());
        // An hour later only the running job remains.
        reg.list(t(3600));
        assert!(reg.get("c").is_none() && reg.get("d").is_none() && reg.get("r").is_some());
    }
}
