//! The dispatcher: for every tenant, hands queued jobs to inference pods with free capacity (in
//! queue order), follows running jobs to the end, retries jobs whose pod was lost, enforces
//! timeouts and cancels, and publishes the tenant's demand for scaling.
//!
//! Everything it needs to resume lives in `GenerationJob.status` (the assigned endpoint) and in
//! the inference pods' own job lists, so a restarted or newly elected operator re-adopts running
//! work instead of dispatching it twice.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_crds::names::{HTTP_PORT_NAME, INFERENCE};
use atelier_crds::{GenerationJob, JobOutput, JobPhase, JobProgress, Tenant, WebhookEvent};
use futures::StreamExt;
use futures::future::join_all;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Mutex, Notify};

use super::inference_client::{self, InferenceClient, Pod, RemoteJob, RemoteState, SubmitRequest};
use super::job::{finish, release_reservation, transition_event, write_status};
use super::{Context, quota, webhook};
use crate::core::queue::{QueuedJob, dispatch_order};
use crate::endpoints::{Endpoint, ready_in_slices};
use crate::pod_token::PodTokens;

/// Running jobs are polled, and everything re-examined, at least this often; new work and new
/// endpoints wake the dispatcher at once.
const TICK: Duration = Duration::from_millis(200);
/// Wake-ups closer together than this are folded into one pass.
const MIN_PASS_GAP: Duration = Duration::from_millis(10);
/// A job whose phase this process wrote is left alone until the watch shows that phase; after
/// this long the watch is trusted again (someone else may have written since).
const CACHE_LAG_LIMIT: Duration = Duration::from_secs(30);
/// A running job's pod is asked for its state at most this often.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Progress is mirrored into status at most this often per job.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How long a running job's pod may be unreachable before the job counts as lost.
const LOST_AFTER: Duration = Duration::from_secs(10);
/// Queue positions are rewritten at most this often per job.
const POSITION_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The periodic pass.
    Full,
    /// Woken by new work or a new endpoint.
    Woken,
}

/// What the dispatcher remembers between ticks. Losing it (a restart) only costs re-reading.
#[derive(Default)]
struct Memory {
    last_progress_write: HashMap<String, Instant>,
    last_position_write: HashMap<String, Instant>,
    unreachable_since: HashMap<String, Instant>,
    /// Endpoints whose job list was read for re-adoption since this process started.
    adopted_from: HashSet<SocketAddr>,
    /// Jobs this process knows to be on an inference pod: uid → pod, to cancel the remote job
    /// when its object is deleted.
    in_flight: HashMap<String, Pod>,
    /// Phases this process wrote that the watch has not shown yet (uid → phase, when). Acting on
    /// the stale copy meanwhile would dispatch a job twice or end it twice.
    written: HashMap<String, (JobPhase, Instant)>,
    last_poll: HashMap<String, Instant>,
}

pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let (tenants, tenants_writer) = reflector::store::<Tenant>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let slice_config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={INFERENCE}"));
    let wake = Arc::new(Notify::new());
    let watches = futures::future::join(
        reflector::reflector(
            tenants_writer,
            watcher(
                Api::<Tenant>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {}),
        reflector::reflector(
            slices_writer,
            watcher(Api::<EndpointSlice>::all(client.clone()), slice_config),
        )
        .default_backoff()
        .touched_objects()
        .for_each(|_| {
            wake.notify_one();
            async {}
        }),
    );
    let dispatcher = Dispatcher {
        ctx,
        tenants,
        slices,
        client: InferenceClient::new(PodTokens::new(client.clone())),
        memory: Mutex::new(Memory::default()),
        wake: wake.clone(),
    };
    tokio::select! {
        _ = watches => tracing::error!("dispatcher watches ended"),
        () = dispatcher.run() => {}
    }
}

struct Dispatcher {
    ctx: Arc<Context>,
    tenants: Store<Tenant>,
    slices: Store<EndpointSlice>,
    client: InferenceClient,
    memory: Mutex<Memory>,
    wake: Arc<Notify>,
}

impl Dispatcher {
    async fn run(&self) {
        self.ctx.jobs.wait_until_ready().await;
        for store in [
            self.tenants.wait_until_ready().await.is_ok(),
            self.slices.wait_until_ready().await.is_ok(),
        ] {
            if !store {
                return;
            }
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let pass = tokio::select! {
                _ = tick.tick() => Pass::Full,
                () = self.wake.notified() => Pass::Woken,
                () = self.ctx.jobs.queued.notified() => Pass::Woken,
            };
            self.pass(pass).await;
            tokio::time::sleep(MIN_PASS_GAP).await;
        }
    }

    /// One pass, O(tenants + unfinished jobs + slices) however many finished jobs are kept.
    /// Woken passes, many per second under load, only move work; the periodic pass also
    /// refreshes metrics and cancels orphans.
    async fn pass(&self, pass: Pass) {
        if pass == Pass::Full {
            self.cancel_orphans().await;
        }
        self.memory
            .lock()
            .await
            .written
            // Entries of finished and deleted jobs age out here.
            .retain(|_, (_, at)| at.elapsed() < CACHE_LAG_LIMIT);
        let slices = self.slices.state();
        let mut slices_by_namespace: HashMap<&str, Vec<&EndpointSlice>> = HashMap::new();
        for slice in &slices {
            if let Some(namespace) = &slice.metadata.namespace {
                slices_by_namespace
                    .entry(namespace.as_str())
                    .or_default()
                    .push(slice);
            }
        }
        join_all(self.tenants.state().into_iter().map(|tenant| {
            let namespace = tenant.namespace_name();
            let jobs = self
                .ctx
                .jobs
                .with_index(|index| index.unfinished(&namespace));
            let endpoints = ready_in_slices(
                slices_by_namespace
                    .remove(namespace.as_str())
                    .unwrap_or_default(),
                HTTP_PORT_NAME,
            );
            async move {
                let jobs = self.caught_up(jobs).await;
                self.tenant_tick(&tenant, jobs, endpoints, pass).await
            }
        }))
        .await;
    }

    /// The jobs whose watched copy shows at least what this process last wrote to them.
    async fn caught_up(&self, jobs: Vec<Arc<GenerationJob>>) -> Vec<Arc<GenerationJob>> {
        let mut memory = self.memory.lock().await;
        if memory.written.is_empty() {
            return jobs;
        }
        jobs.into_iter()
            .filter(|job| {
                let uid = job.metadata.uid.as_deref().unwrap_or_default();
                match memory.written.get(uid) {
                    Some((phase, _)) if *phase != job.phase() => false,
                    Some(_) => {
                        memory.written.remove(uid);
                        true
                    }
                    None => true,
                }
            })
            .collect()
    }

    async fn wrote(&self, job: &GenerationJob, phase: JobPhase) {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        self.memory
            .lock()
            .await
            .written
            .insert(uid, (phase, Instant::now()));
    }

    /// Remote jobs whose GenerationJob was deleted are cancelled, so the GPU is not wasted.
    async fn cancel_orphans(&self) {
        let orphans: Vec<(String, Pod)> = {
            let mut memory = self.memory.lock().await;
            let orphans = self.ctx.jobs.with_index(|index| {
                memory
                    .in_flight
                    .iter()
                    .filter(|(uid, _)| !index.contains(uid))
                    .map(|(u, pod)| (u.clone(), pod.clone()))
                    .collect::<Vec<_>>()
            });
            for (uid, _) in &orphans {
                memory.in_flight.remove(uid);
            }
            orphans
        };
        for (uid, pod) in orphans {
            tracing::info!(uid, endpoint = %pod.address, "job object deleted; cancelling its generation");
            let _ = self.client.cancel(&pod, &uid).await;
        }
    }

    async fn tenant_tick(
        &self,
        tenant: &Tenant,
        jobs: Vec<Arc<GenerationJob>>,
        endpoints: Vec<Endpoint>,
        pass: Pass,
    ) {
        let tenant_name = tenant.name_any();
        let running: Vec<&Arc<GenerationJob>> = jobs
            .iter()
            .filter(|j| j.phase() == JobPhase::Running)
            .collect();
        let still_running = join_all(
            running
                .iter()
                .map(|job| self.follow(tenant, job, &endpoints)),
        )
        .await;
        // Slots freed in this pass are offered to queued jobs in this pass too.
        let running: Vec<&Arc<GenerationJob>> = running
            .into_iter()
            .zip(still_running)
            .filter_map(|(job, runs)| runs.then_some(job))
            .collect();

        let queued: Vec<&Arc<GenerationJob>> = jobs
            .iter()
            .filter(|j| j.phase() == JobPhase::Queued && !j.spec.cancel)
            .collect();
        let mut dispatched = 0;
        if !queued.is_empty() && !endpoints.is_empty() {
            dispatched = self.dispatch(tenant, &running, &queued, &endpoints).await;
        }
        let queued_count = queued.len().saturating_sub(dispatched) as u32;
        let running_count = running.len() as u32 + dispatched as u32;
        if pass == Pass::Full {
            self.export_metrics(tenant, &tenant_name, queued_count);
        }
        let status = tenant.status.clone().unwrap_or_default();
        if status.queued != queued_count || status.running != running_count {
            let tenants = Api::<Tenant>::all(self.ctx.client.clone());
            if let Err(error) = quota::publish_demand(
                &tenants,
                &tenant_name,
                queued_count,
                running_count,
                self.ctx.clock.now(),
            )
            .await
            {
                tracing::warn!(tenant = tenant_name, %error, "could not publish demand");
            }
        }
    }

    fn export_metrics(&self, tenant: &Tenant, tenant_name: &str, queued: u32) {
        if tenant.metadata.deletion_timestamp.is_some() {
            // Its series go with it (the tenant controller drops them too, at cleanup).
            self.ctx.metrics.forget_tenant(tenant_name);
            return;
        }
        let by_phase = self
            .ctx
            .jobs
            .with_index(|index| index.phase_counts(&tenant.namespace_name()));
        let metrics = &self.ctx.metrics;
        metrics
            .queue_depth
            .get_or_create(&super::metrics::TenantLabel {
                tenant: tenant_name.to_string(),
            })
            .set(i64::from(queued));
        for (phase, count) in JobPhase::ALL.into_iter().zip(by_phase) {
            metrics
                .jobs
                .get_or_create(&super::metrics::TenantPhaseLabels {
                    tenant: tenant_name.to_string(),
                    phase: phase.as_str(),
                })
                .set(count);
        }
    }

    /// Hands queued jobs to endpoints with free slots, in queue order. Returns how many started.
    async fn dispatch(
        &self,
        tenant: &Tenant,
        running: &[&Arc<GenerationJob>],
        queued: &[&Arc<GenerationJob>],
        endpoints: &[Endpoint],
    ) -> usize {
        self.adopt(&tenant.namespace_name(), queued, endpoints)
            .await;
        let now = self.ctx.clock.now();
        let recent = self
            .ctx
            .jobs
            .with_index(|index| index.recent_images(&tenant.namespace_name(), now));
        let candidates: Vec<QueuedJob<'_>> = queued
            .iter()
            .map(|job| QueuedJob {
                name: job.metadata.name.as_deref().unwrap_or_default(),
                user: &job.spec.user,
                priority: job.spec.priority,
                created: job
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(now, |t| t.0),
                images: job.spec.num_images,
            })
            .collect();
        let order = dispatch_order(&candidates, &recent);

        let concurrency = tenant.spec.inference.concurrency.max(1) as usize;
        let mut free: Vec<(Endpoint, usize)> = endpoints
            .iter()
            .map(|endpoint| {
                let address = endpoint.address.to_string();
                let busy = running
                    .iter()
                    .filter(|j| {
                        j.status
                            .as_ref()
                            .and_then(|s| s.assigned_endpoint.as_deref())
                            == Some(address.as_str())
                    })
                    .count();
                (endpoint.clone(), concurrency.saturating_sub(busy))
            })
            .collect();
        let by_name: HashMap<&str, &Arc<GenerationJob>> = queued
            .iter()
            .map(|j| (j.metadata.name.as_deref().unwrap_or_default(), *j))
            .collect();
        let mut started = 0;
        let mut waiting_position = 0u32;
        for candidate in &order {
            let job = by_name[candidate.name];
            free.sort_by_key(|(_, slots)| std::cmp::Reverse(*slots));
            let mut placed = false;
            for (endpoint, slots) in free.iter_mut().filter(|(_, slots)| *slots > 0) {
                match self.start(tenant, job, endpoint).await {
                    Ok(()) => {
                        *slots -= 1;
                        placed = true;
                        break;
                    }
                    Err(inference_client::Error::AtCapacity) => *slots = 0,
                    Err(error) => {
                        tracing::warn!(job = job.name_any(), endpoint = %endpoint.address, %error, "dispatch failed");
                        *slots = 0;
                    }
                }
            }
            if placed {
                started += 1;
            } else {
                waiting_position += 1;
                self.show_position(job, waiting_position).await;
            }
        }
        started
    }

    /// Once per endpoint after start-up: jobs the pod already holds are adopted, not resent.
    async fn adopt(&self, namespace: &str, queued: &[&Arc<GenerationJob>], endpoints: &[Endpoint]) {
        for endpoint in endpoints {
            let pod = Pod {
                namespace: namespace.to_string(),
                address: endpoint.address,
            };
            if self
                .memory
                .lock()
                .await
                .adopted_from
                .contains(&endpoint.address)
            {
                continue;
            }
            let Ok(remote) = self.client.list(&pod).await else {
                continue;
            };
            self.memory
                .lock()
                .await
                .adopted_from
                .insert(endpoint.address);
            for remote_job in remote
                .iter()
                .filter(|r| matches!(r.state, RemoteState::Queued | RemoteState::Running))
            {
                if let Some(job) = queued
                    .iter()
                    .find(|j| j.metadata.uid.as_deref() == Some(remote_job.id.as_str()))
                {
                    tracing::info!(job = job.name_any(), endpoint = %endpoint.address, "re-adopting a job the inference pod already runs");
                    if let Err(error) = self.mark_running(job, endpoint).await {
                        tracing::warn!(%error, "could not record an adopted job");
                    }
                } else if !self
                    .ctx
                    .jobs
                    .with_index(|index| index.is_unfinished(&remote_job.id))
                {
                    tracing::info!(
                        uid = remote_job.id,
                        "cancelling a generation whose job no longer waits for it"
                    );
                    let _ = self.client.cancel(&pod, &remote_job.id).await;
                }
            }
        }
    }

    async fn start(
        &self,
        tenant: &Tenant,
        job: &GenerationJob,
        endpoint: &Endpoint,
    ) -> Result<(), inference_client::Error> {
        let status = job.status.clone().unwrap_or_default();
        let request = SubmitRequest {
            id: job.metadata.uid.clone().unwrap_or_default(),
            user: job.spec.user.clone(),
            prompt: job.spec.prompt.clone(),
            width: job.spec.width,
            height: job.spec.height,
            steps: job.spec.steps,
            guidance: job.spec.guidance,
            seed: status.seed.or(job.spec.seed).unwrap_or_default(),
            num_images: job.spec.num_images,
            timeout_seconds: timeout_of(tenant, job).as_secs(),
        };
        let pod = Pod {
            namespace: tenant.namespace_name(),
            address: endpoint.address,
        };
        self.client.submit(&pod, &request).await?;
        if let Err(error) = self.mark_running(job, endpoint).await {
            // The pod has the job; the next tick's adoption or poll will record it.
            tracing::warn!(job = job.name_any(), %error, "dispatched but could not record Running");
            self.memory
                .lock()
                .await
                .adopted_from
                .remove(&endpoint.address);
        }
        Ok(())
    }

    async fn mark_running(&self, job: &GenerationJob, endpoint: &Endpoint) -> kube::Result<()> {
        let now = self.ctx.clock.now();
        let mut status = job.status.clone().unwrap_or_default();
        status.phase = Some(JobPhase::Running);
        status.reason = Some("Dispatched".into());
        status.message = Some(format!(
            "running on {}",
            endpoint.pod.as_deref().unwrap_or("an inference pod")
        ));
        status.attempts += 1;
        status.start_time = Some(Time(now));
        status.assigned_endpoint = Some(endpoint.address.to_string());
        status.assigned_pod = endpoint.pod.clone();
        status.progress = Some(JobProgress {
            step: 0,
            total_steps: job.spec.steps,
        });
        status.queue_position = None;
        write_status(job, &self.ctx, &status).await?;
        self.wrote(job, JobPhase::Running).await;
        tracing::info!(job = job.name_any(), user = job.spec.user, endpoint = %endpoint.address, attempt = status.attempts, "dispatched");
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let pod = Pod {
            namespace: job.namespace().unwrap_or_default(),
            address: endpoint.address,
        };
        self.memory.lock().await.in_flight.insert(uid, pod);
        if let Some(created) = &job.metadata.creation_timestamp {
            self.ctx
                .metrics
                .admission_wait
                .observe(now.duration_since(created.0).as_secs_f64().max(0.0));
        }
        transition_event(
            &self.ctx,
            job,
            kube::runtime::events::EventType::Normal,
            "Started",
            format!("attempt {} on {}", status.attempts, endpoint.address),
        )
        .await;
        webhook::notify(&self.ctx, job, WebhookEvent::Started, "Running");
        Ok(())
    }

    async fn show_position(&self, job: &GenerationJob, position: u32) {
        let current = job.status.as_ref().and_then(|s| s.queue_position);
        if current == Some(position) {
            return;
        }
        let uid = job.metadata.uid.clone().unwrap_or_default();
        {
            let mut memory = self.memory.lock().await;
            if memory
                .last_position_write
                .get(&uid)
                .is_some_and(|at| at.elapsed() < POSITION_EVERY)
                && current.is_some()
            {
                return;
            }
            memory.last_position_write.insert(uid, Instant::now());
        }
        let mut status = job.status.clone().unwrap_or_default();
        status.queue_position = Some(position);
        if let Err(error) = write_status(job, &self.ctx, &status).await {
            tracing::debug!(%error, "could not update a queue position");
        }
    }

    /// Follows one running job: cancel, timeout, progress, completion, or loss of its pod.
    /// Returns whether the job still holds its slot on the pod.
    async fn follow(&self, tenant: &Tenant, job: &GenerationJob, endpoints: &[Endpoint]) -> bool {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let status = job.status.clone().unwrap_or_default();
        let Some(endpoint) = status
            .assigned_endpoint
            .as_deref()
            .and_then(|e| e.parse::<SocketAddr>().ok())
        else {
            self.lost(tenant, job, "the job has no recorded inference pod")
                .await;
            return false;
        };
        let pod = Pod {
            namespace: tenant.namespace_name(),
            address: endpoint,
        };
        self.memory
            .lock()
            .await
            .in_flight
            .insert(uid.clone(), pod.clone());
        if job.spec.cancel {
            let _ = self.client.cancel(&pod, &uid).await;
            self.forget(&uid).await;
            // Cancelled before its result, the job wrote no image: the quota gets it back.
            release_reservation(job, &self.ctx).await;
            self.end(
                job,
                JobPhase::Cancelled,
                "Cancelled",
                "cancelled while running",
                None,
            )
            .await;
            return false;
        }
        let now = self.ctx.clock.now();
        if let Some(start) = &status.start_time {
            let limit = timeout_of(tenant, job);
            if now.duration_since(start.0).unsigned_abs() > limit {
                let _ = self.client.cancel(&pod, &uid).await;
                self.forget(&uid).await;
                release_reservation(job, &self.ctx).await;
                self.end(
                    job,
                    JobPhase::Failed,
                    "DeadlineExceeded",
                    &format!("no result within {}s", limit.as_secs()),
                    None,
                )
                .await;
                return false;
            }
        }
        {
            let mut memory = self.memory.lock().await;
            if memory
                .last_poll
                .get(&uid)
                .is_some_and(|at| at.elapsed() < POLL_EVERY)
            {
                return true;
            }
            memory.last_poll.insert(uid.clone(), Instant::now());
        }
        match self.client.get(&pod, &uid).await {
            Ok(remote) => {
                self.memory.lock().await.unreachable_since.remove(&uid);
                self.observe(tenant, job, remote).await
            }
            Err(inference_client::Error::NotFound(_)) => {
                self.lost(
                    tenant,
                    job,
                    "the inference pod no longer knows the job (restarted)",
                )
                .await;
                false
            }
            Err(error) => {
                let listed = endpoints.iter().any(|e| e.address == endpoint);
                let since = *self
                    .memory
                    .lock()
                    .await
                    .unreachable_since
                    .entry(uid.clone())
                    .or_insert_with(Instant::now);
                // Refused means no process listens there any more. A timeout (an overloaded pod,
                // one briefly not Ready) may hide a generation still running: requeueing it at
                // once would make a second image, so that waits for LOST_AFTER, and the old pod
                // is told to stop in case it is still at work.
                let gone = matches!(&error, inference_client::Error::Unreachable(e) if e.is_connect() && !e.is_timeout());
                if (gone && !listed) || since.elapsed() > LOST_AFTER {
                    if !gone {
                        let client = self.client.clone();
                        let uid = uid.clone();
                        tokio::spawn(async move { client.cancel(&pod, &uid).await });
                    }
                    self.lost(
                        tenant,
                        job,
                        &format!("inference pod {endpoint} lost: {error}"),
                    )
                    .await;
                    return false;
                }
                true
            }
        }
    }

    /// Mirrors the pod's view of a running job; returns whether it still runs.
    async fn observe(&self, tenant: &Tenant, job: &GenerationJob, remote: RemoteJob) -> bool {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        match remote.state {
            RemoteState::Queued | RemoteState::Running => {
                let progress = JobProgress {
                    step: remote.step,
                    total_steps: remote.total_steps.max(job.spec.steps),
                };
                let status = job.status.clone().unwrap_or_default();
                if status.progress == Some(progress) {
                    return true;
                }
                {
                    let mut memory = self.memory.lock().await;
                    if memory
                        .last_progress_write
                        .get(&uid)
                        .is_some_and(|at| at.elapsed() < PROGRESS_EVERY)
                    {
                        return true;
                    }
                    memory
                        .last_progress_write
                        .insert(uid.clone(), Instant::now());
                }
                let mut status = status;
                status.progress = Some(progress);
                if let Err(error) = write_status(job, &self.ctx, &status).await {
                    tracing::debug!(%error, "could not mirror progress");
                }
                true
            }
            RemoteState::Succeeded => {
                self.forget(&uid).await;
                let outputs: Vec<JobOutput> = remote
                    .outputs
                    .iter()
                    .map(|o| JobOutput {
                        path: format!("/outputs/{}", o.path),
                        sha256: o.sha256.clone(),
                        width: o.width,
                        height: o.height,
                        bytes: o.bytes,
                    })
                    .collect();
                let message = format!("{} image(s) written", outputs.len());
                let total = job.spec.steps;
                self.end(
                    job,
                    JobPhase::Succeeded,
                    "Succeeded",
                    &message,
                    Some(&move |s: &mut atelier_crds::GenerationJobStatus| {
                        s.outputs = outputs.clone();
                        s.progress = Some(JobProgress {
                            step: total,
                            total_steps: total,
                        });
                    }),
                )
                .await;
                false
            }
            RemoteState::Failed => {
                self.forget(&uid).await;
                let (reason, message) = remote.error.map_or(
                    (
                        "GenerationFailed".to_string(),
                        "the inference pod reported a failure".to_string(),
                    ),
                    |e| (e.reason, e.message),
                );
                release_reservation(job, &self.ctx).await;
                self.end(job, JobPhase::Failed, &reason, &message, None)
                    .await;
                false
            }
            RemoteState::Cancelled => {
                self.lost(
                    tenant,
                    job,
                    "the inference pod cancelled the job (shutting down)",
                )
                .await;
                false
            }
        }
    }

    /// The job's pod is gone: run it again, or fail once the retries are spent.
    async fn lost(&self, tenant: &Tenant, job: &GenerationJob, why: &str) {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        self.forget(&uid).await;
        let status = job.status.clone().unwrap_or_default();
        if status.attempts > tenant.spec.limits.max_retries {
            release_reservation(job, &self.ctx).await;
            let message = format!("{why}; {} attempts made", status.attempts);
            return self
                .end(job, JobPhase::Failed, "RetriesExhausted", &message, None)
                .await;
        }
        let mut status = status;
        status.phase = Some(JobPhase::Queued);
        status.reason = Some("Retrying".into());
        status.message = Some(why.to_string());
        status.assigned_endpoint = None;
        status.assigned_pod = None;
        status.progress = None;
        if let Err(error) = write_status(job, &self.ctx, &status).await {
            tracing::warn!(%error, "could not requeue a lost job");
            return;
        }
        self.wrote(job, JobPhase::Queued).await;
        tracing::warn!(
            job = job.name_any(),
            why,
            "requeued a job whose inference pod was lost"
        );
        transition_event(
            &self.ctx,
            job,
            kube::runtime::events::EventType::Warning,
            "Retrying",
            why.to_string(),
        )
        .await;
    }

    async fn end(
        &self,
        job: &GenerationJob,
        phase: JobPhase,
        reason: &str,
        message: &str,
        update: Option<&(dyn Fn(&mut atelier_crds::GenerationJobStatus) + Sync)>,
    ) {
        match finish(job, &self.ctx, phase, reason, message, update).await {
            Ok(status) => {
                self.wrote(job, phase).await;
                // The receiver wants the outputs that were just recorded.
                let finished = GenerationJob {
                    status: Some(status),
                    ..job.clone()
                };
                webhook::notify(
                    &self.ctx,
                    &finished,
                    WebhookEvent::Completed,
                    phase.as_str(),
                )
            }
            Err(error) => {
                tracing::warn!(job = job.name_any(), %error, "could not record the end of a job")
            }
        }
    }

    async fn forget(&self, uid: &str) {
        let mut memory = self.memory.lock().await;
        memory.in_flight.remove(uid);
        memory.last_progress_write.remove(uid);
        memory.unreachable_since.remove(uid);
        memory.last_position_write.remove(uid);
        memory.last_poll.remove(uid);
    }
}

fn timeout_of(tenant: &Tenant, job: &GenerationJob) -> Duration {
    job.spec
        .timeout
        .map_or_else(|| tenant.spec.limits.default_timeout.into(), Into::into)
}
