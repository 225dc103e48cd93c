//! Load of GenerationJobs and what happened to each: one watch on every job records, on this
//! machine's monotonic clock, when each job was first seen in each phase and every
//! resourceVersion it went through (each one is a write to the job object).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_crds::{GenerationJob, JobPhase};
use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::Notify;

use crate::platform::job_manifest;

/// What the watch saw of one job.
#[derive(Clone, Debug, Default)]
pub struct JobTrack {
    pub namespace: String,
    pub name: String,
    /// When the create request was sent (set by the creator).
    pub created: Option<Instant>,
    pub queued: Option<Instant>,
    pub running: Option<Instant>,
    pub finished: Option<Instant>,
    pub phase: Option<JobPhase>,
    pub reason: Option<String>,
    pub attempts: u32,
    /// Distinct resourceVersions seen: the create and every write after it.
    pub versions: HashSet<String>,
    /// Writes after the create by what they changed: the phase, only the progress, only the
    /// queue position, anything else.
    pub phase_writes: u32,
    /// Running again on another endpoint without leaving Running (a second dispatch).
    pub redispatch_writes: u32,
    pub progress_writes: u32,
    pub position_writes: u32,
    pub other_writes: u32,
    /// The status last seen, to classify the next write.
    pub(crate) last_status: Option<atelier_crds::GenerationJobStatus>,
    /// Transitions into Running and into Succeeded (more than one of either is a duplicate).
    pub entered_running: u32,
    pub entered_succeeded: u32,
    /// Output paths of the final status.
    pub outputs: Vec<String>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, JobTrack>,
    /// Relists of the watch (after which intermediate versions may be missing).
    relists: u32,
}

/// The watch on every GenerationJob.
pub struct Tracker {
    state: Mutex<State>,
    changed: Notify,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Tracker {
    pub async fn start(client: &kube::Client) -> Arc<Self> {
        let tracker = Arc::new(Self {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            task: Mutex::new(None),
        });
        let api = Api::<GenerationJob>::all(client.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let watching = Arc::clone(&tracker);
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut events = watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::Apply(job) | Event::InitApply(job)) => watching.observe(&job),
                    Ok(Event::Init) => watching.lock().relists += 1,
                    Ok(Event::InitDone) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(Event::Delete(_)) | Err(_) => {}
                }
            }
        });
        *tracker.task.lock().expect("not poisoned") = Some(task);
        let _ = ready_rx.await;
        tracker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observe(&self, job: &GenerationJob) {
        let now = Instant::now();
        let Some(uid) = job.metadata.uid.clone() else {
            return;
        };
        let phase = job.phase();
        {
            let mut state = self.lock();
            let track = state.jobs.entry(uid).or_default();
            track.namespace = job.metadata.namespace.clone().unwrap_or_default();
            track.name = job.metadata.name.clone().unwrap_or_default();
            let status = job.status.clone().unwrap_or_default();
            if let Some(version) = &job.metadata.resource_version
                && track.versions.insert(version.clone())
                && track.versions.len() > 1
            {
                match classify(track.last_status.as_ref(), &status) {
                    Write::Phase => track.phase_writes += 1,
                    Write::Redispatch => track.redispatch_writes += 1,
                    Write::Progress => track.progress_writes += 1,
                    Write::Position => track.position_writes += 1,
                    Write::Other => track.other_writes += 1,
                }
            }
            track.last_status = Some(status);
            if track.phase != Some(phase) {
                match phase {
                    JobPhase::Queued => {
                        track.queued.get_or_insert(now);
                    }
                    JobPhase::Running => {
                        track.running.get_or_insert(now);
                        track.entered_running += 1;
                    }
                    JobPhase::Succeeded => track.entered_succeeded += 1,
                    _ => {}
                }
                if phase.is_finished() {
                    track.finished.get_or_insert(now);
                }
                track.phase = Some(phase);
            }
            let status = job.status.clone().unwrap_or_default();
            track.reason = status.reason;
            track.attempts = status.attempts;
            track.outputs = status.outputs.into_iter().map(|o| o.path).collect();
        }
        self.changed.notify_waiters();
    }

    fn set_created(&self, uid: &str, namespace: &str, name: &str, at: Instant) {
        let mut state = self.lock();
        let track = state.jobs.entry(uid.to_string()).or_default();
        track.created = Some(at);
        track.namespace = namespace.to_string();
        track.name = name.to_string();
    }

    fn is_finished(&self, uid: &str) -> bool {
        self.lock()
            .jobs
            .get(uid)
            .and_then(|t| t.phase)
            .is_some_and(JobPhase::is_finished)
    }

    /// Waits until the job is finished; false on timeout.
    pub async fn wait_finished(&self, uid: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.is_finished(uid) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.is_finished(uid);
            }
        }
    }

    /// Waits until every job of `uids` is finished; returns how many are not.
    pub async fn wait_all(&self, uids: &[String], timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            let open = uids.iter().filter(|uid| !self.is_finished(uid)).count();
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return uids.iter().filter(|uid| !self.is_finished(uid)).count();
            }
        }
    }

    /// Copies of the tracks of `uids`.
    pub fn tracks(&self, uids: &[String]) -> Vec<JobTrack> {
        let state = self.lock();
        uids.iter()
            .filter_map(|uid| state.jobs.get(uid).cloned())
            .collect()
    }

    /// Jobs of `namespace` the watch last saw Running.
    pub fn running_in(&self, namespace: &str) -> usize {
        self.lock()
            .jobs
            .values()
            .filter(|t| t.namespace == namespace && t.phase == Some(JobPhase::Running))
            .count()
    }

    /// Jobs seen so far.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn relists(&self) -> u32 {
        self.lock().relists
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
    }
}

/// What one write of a job changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Phase,
    Redispatch,
    Progress,
    Position,
    Other,
}

/// Classifies the write that turned `before` into `after` (pure).
pub fn classify(
    before: Option<&atelier_crds::GenerationJobStatus>,
    after: &atelier_crds::GenerationJobStatus,
) -> Write {
    let Some(before) = before else {
        return Write::Phase;
    };
    if before.phase != after.phase {
        return Write::Phase;
    }
    if before.assigned_endpoint.is_some()
        && after.assigned_endpoint.is_some()
        && before.assigned_endpoint != after.assigned_endpoint
    {
        return Write::Redispatch;
    }
    let mut same = before.clone();
    same.progress = after.progress;
    if same == *after && before.progress != after.progress {
        return Write::Progress;
    }
    let mut same = before.clone();
    same.queue_position = after.queue_position;
    if same == *after && before.queue_position != after.queue_position {
        return Write::Position;
    }
    Write::Other
}

/// Where jobs go: tenant namespaces and users, taken round-robin.
#[derive(Clone, Debug)]
pub struct Target {
    pub namespaces: Vec<String>,
    /// Jobs the tenants' inference pods accept at once (replicas × concurrency, summed).
    pub slots: usize,
    pub users_per_tenant: usize,
    pub steps: u32,
}

impl Target {
    /// Namespace and user of the `i`-th job: tenants first, so consecutive jobs spread.
    pub fn of(&self, i: usize) -> (&str, String) {
        let tenants = self.namespaces.len().max(1);
        let namespace = &self.namespaces[i % tenants];
        let user = (i / tenants) % self.users_per_tenant.max(1);
        (namespace, format!("user{user}@example.com"))
    }
}

/// Creates the `i`-th job; returns its UID.
async fn create(
    client: &kube::Client,
    tracker: &Tracker,
    target: &Target,
    i: usize,
) -> anyhow::Result<String> {
    let (namespace, user) = target.of(i);
    let api = Api::<GenerationJob>::namespaced(client.clone(), namespace);
    let sent = Instant::now();
    let created = api
        .create(
            &PostParams::default(),
            &job_manifest(&user, target.steps, i as u64),
        )
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();
    tracker.set_created(
        &uid,
        namespace,
        created.metadata.name.as_deref().unwrap_or_default(),
        sent,
    );
    Ok(uid)
}

/// How jobs are offered.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// `window` jobs in flight: each worker creates a job, waits until it finished, repeats.
    ClosedLoop { window: usize },
    /// One job every `1/rate` seconds, whatever happens to the earlier ones.
    Paced { rate: f64 },
    /// All at once, `parallel` creates at a time.
    Burst { parallel: usize },
}

impl Load {
    pub fn describe(&self) -> String {
        match self {
            Load::ClosedLoop { window } => format!("closed loop, {window} in flight"),
            Load::Paced { rate } => format!("paced, {rate} jobs/s offered"),
            Load::Burst { parallel } => format!("burst ({parallel} parallel creates)"),
        }
    }
}

/// Offers `count` jobs as `load` says and returns their UIDs once all are finished (or
/// `timeout` passed since the last create; a zero `timeout` returns once they are created).
pub async fn run(
    client: &kube::Client,
    tracker: &Arc<Tracker>,
    target: &Target,
    count: usize,
    load: Load,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let uids = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    match load {
        Load::ClosedLoop { window } => {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let workers = (0..window.max(1)).map(|_| {
                let (client, tracker, target) =
                    (client.clone(), Arc::clone(tracker), target.clone());
                let (next, uids, errors) =
                    (Arc::clone(&next), Arc::clone(&uids), Arc::clone(&errors));
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= count {
                            return;
                        }
                        match create(&client, &tracker, &target, i).await {
                            Ok(uid) => {
                                uids.lock().expect("not poisoned").push(uid.clone());
                                tracker.wait_finished(&uid, timeout).await;
                            }
                            Err(error) => errors
                                .lock()
                                .expect("not poisoned")
                                .push(format!("{error:#}")),
                        }
                    }
                })
            });
            futures::future::join_all(workers).await;
        }
        Load::Paced { rate } => {
            let start = tokio::time::Instant::now();
            let mut creates = Vec::with_capacity(count);
            for i in 0..count {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
                let (client, tracker, target) =
                    (client.clone(), Arc::clone(tracker), target.clone());
                let (uids, errors) = (Arc::clone(&uids), Arc::clone(&errors));
                creates.push(tokio::spawn(async move {
                    match create(&client, &tracker, &target, i).await {
                        Ok(uid) => uids.lock().expect("not poisoned").push(uid),
                        Err(error) => errors
                            .lock()
                            .expect("not poisoned")
                            .push(format!("{error:#}")),
                    }
                }));
            }
            futures::future::join_all(creates).await;
        }
        Load::Burst { parallel } => {
            futures::stream::iter(0..count)
                .for_each_concurrent(parallel.max(1), |i| {
                    let (uids, errors) = (Arc::clone(&uids), Arc::clone(&errors));
                    async move {
                        match create(client, tracker, target, i).await {
                            Ok(uid) => uids.lock().expect("not poisoned").push(uid),
                            Err(error) => errors
                                .lock()
                                .expect("not poisoned")
                                .push(format!("{error:#}")),
                        }
                    }
                })
                .await;
        }
    }
    let errors = errors.lock().expect("not poisoned").clone();
    if !errors.is_empty() {
        crate::say!("{} job creates failed, first: {}", errors.len(), errors[0]);
    }
    let uids = uids.lock().expect("not poisoned").clone();
    if timeout.is_zero() {
        return Ok(uids);
    }
    let open = tracker.wait_all(&uids, timeout).await;
    if open > 0 {
        crate::say!("{open} jobs not finished {timeout:?} after the last create");
    }
    Ok(uids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_classified_by_what_they_change() {
        use atelier_crds::{GenerationJobStatus, JobProgress};
        let queued = GenerationJobStatus {
            phase: Some(JobPhase::Queued),
            ..Default::default()
        };
        let positioned = GenerationJobStatus {
            queue_position: Some(3),
            ..queued.clone()
        };
        let running = GenerationJobStatus {
            phase: Some(JobPhase::Running),
            progress: Some(JobProgress {
                step: 0,
                total_steps: 4,
            }),
            ..Default::default()
        };
        let stepped = GenerationJobStatus {
            progress: Some(JobProgress {
                step: 2,
                total_steps: 4,
            }),
            ..running.clone()
        };
        let messaged = GenerationJobStatus {
            message: Some("x".into()),
            ..running.clone()
        };
        let on_a = GenerationJobStatus {
            assigned_endpoint: Some("198.18.0.2:8080".into()),
            ..running.clone()
        };
        let on_b = GenerationJobStatus {
            assigned_endpoint: Some("198.18.0.3:8080".into()),
            ..running.clone()
        };
        assert_eq!(classify(None, &queued), Write::Phase);
        assert_eq!(classify(Some(&queued), &positioned), Write::Position);
        assert_eq!(classify(Some(&positioned), &running), Write::Phase);
        assert_eq!(classify(Some(&running), &stepped), Write::Progress);
        assert_eq!(classify(Some(&running), &messaged), Write::Other);
        assert_eq!(classify(Some(&on_a), &on_b), Write::Redispatch);
    }

    #[test]
    fn jobs_spread_over_tenants_then_users() {
        let target = Target {
            namespaces: vec!["a".into(), "b".into()],
            slots: 2,
            users_per_tenant: 3,
            steps: 4,
        };
        let picks: Vec<(String, String)> = (0..7)
            .map(|i| {
                let (ns, user) = target.of(i);
                (ns.to_string(), user)
            })
            .collect();
        assert_eq!(picks[0], ("a".into(), "user0@example.com".into()));
        assert_eq!(picks[1], ("b".into(), "user0@example.com".into()));
        assert_eq!(picks[2], ("a".into(), "user1@example.com".into()));
        assert_eq!(picks[6], ("a".into(), "user0@example.com".into()));
    }
}
