//! The `JobIndex` that admission and the dispatcher read, fed by the events of the job
//! controller's own GenerationJob watch (one watch for both). A relist (after a watch gap)
//! builds a fresh index and swaps it in whole, so jobs deleted during the gap do not linger.

use std::sync::Mutex;

use atelier_crds::{GenerationJob, JobPhase};
use kube::runtime::watcher::Event;
use tokio::sync::{Notify, watch};

use crate::core::job_index::JobIndex;

#[derive(Default)]
struct Indexes {
    current: JobIndex,
    /// Built from a relist in progress, swapped in when it is complete.
    relisted: Option<JobIndex>,
}

pub struct WatchedJobs {
    indexes: Mutex<Indexes>,
    /// Woken whenever a job is seen in the queue.
    pub queued: Notify,
    ready: watch::Sender<bool>,
}

impl Default for WatchedJobs {
    fn default() -> Self {
        Self {
            indexes: Mutex::default(),
            queued: Notify::new(),
            ready: watch::Sender::new(false),
        }
    }
}

impl WatchedJobs {
    /// Runs `use_index` on the current index; never held across an await.
    pub fn with_index<T>(&self, use_index: impl FnOnce(&mut JobIndex) -> T) -> T {
        use_index(&mut self.lock().current)
    }

    /// Returns once the first complete list of jobs is in the index.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        // Only fails when the sender, which lives in `self`, is gone.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Takes in one event of a watch of every GenerationJob.
    pub fn observe(&self, event: &Event<GenerationJob>) {
        let mut indexes = self.lock();
        match event {
            Event::Init => indexes.relisted = Some(JobIndex::default()),
            Event::InitApply(job) => {
                if let Some(index) = indexes.relisted.as_mut() {
                    index.apply(job);
                }
            }
            Event::InitDone => {
                if let Some(index) = indexes.relisted.take() {
                    indexes.current = index;
                }
                self.ready.send_replace(true);
                self.queued.notify_one();
            }
            Event::Apply(job) => {
                indexes.current.apply(job);
                if job.phase() == JobPhase::Queued {
                    self.queued.notify_one();
                }
            }
            Event::Delete(job) => {
                if let Some(uid) = job.metadata.uid.as_deref() {
                    indexes.current.forget(uid);
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Indexes> {
        self.indexes.lock().expect("no user of the index panics")
    }
}
