//! One watch of every GenerationJob, feeding the `JobIndex` that admission and the dispatcher
//! read. A relist (after a watch gap) builds a fresh index and swaps it in whole, so jobs deleted
//! during the gap do not linger.

use std::sync::{Arc, Mutex};

use atelier_crds::{GenerationJob, JobPhase};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use tokio::sync::{Notify, watch};

use crate::core::job_index::JobIndex;

pub struct WatchedJobs {
    index: Mutex<JobIndex>,
    /// Woken whenever a job is seen in the queue.
    pub queued: Notify,
    ready: watch::Sender<bool>,
}

impl Default for WatchedJobs {
    fn default() -> Self {
        Self {
            index: Mutex::default(),
            queued: Notify::new(),
            ready: watch::Sender::new(false),
        }
    }
}

impl WatchedJobs {
    /// Runs `read` on the index; never held across an await.
    pub fn with_index<T>(&self, use_index: impl FnOnce(&mut JobIndex) -> T) -> T {
        use_index(&mut self.index.lock().expect("no reader panics"))
    }

    /// Returns once the first complete list of jobs is in the index.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        // Only fails when the sender, which lives in `self`, is gone.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// Follows the watch for as long as the process runs.
    pub async fn follow(&self, client: kube::Client) {
        let mut relisted: Option<JobIndex> = None;
        let mut events = watcher(
            Api::<GenerationJob>::all(client),
            watcher::Config::default(),
        )
        .default_backoff()
        .boxed();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(%error, "GenerationJob watch failed; retrying");
                    continue;
                }
            };
            match event {
                Event::Init => relisted = Some(JobIndex::default()),
                Event::InitApply(job) => {
                    if let Some(index) = relisted.as_mut() {
                        index.apply(Arc::new(job));
                    }
                }
                Event::InitDone => {
                    if let Some(index) = relisted.take() {
                        *self.index.lock().expect("no reader panics") = index;
                    }
                    self.ready.send_replace(true);
                    self.queued.notify_one();
                }
                Event::Apply(job) => {
                    let queued = job.phase() == JobPhase::Queued;
                    self.with_index(|index| index.apply(Arc::new(job)));
                    if queued {
                        self.queued.notify_one();
                    }
                }
                Event::Delete(job) => {
                    if let Some(uid) = job.metadata.uid.as_deref() {
                        self.with_index(|index| index.forget(uid));
                    }
                }
            }
        }
    }
}
