//! The GenerationJob controller: admission (limits and quota, reserved in the Tenant), cancel of
//! queued jobs, and TTL after finish. Dispatch and progress of admitted jobs belong to the
//! dispatcher, which owns the GPU side of a job's life.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_crds::conditions::{self, ADMITTED, COMPLETE};
use atelier_crds::{GenerationJob, GenerationJobStatus, JobPhase, Tenant};
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};

use super::{Context, quota};
use crate::core::admission::{Decision, reason};

const CONTROLLER: &str = "generationjob";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The tenant a job belongs to, from its namespace `atelier-<tenant>`.
pub fn tenant_of(job: &GenerationJob) -> Option<&str> {
    job.metadata.namespace.as_deref()?.strip_prefix("atelier-")
}

pub async fn run(ctx: Arc<Context>) {
    let jobs = Api::<GenerationJob>::all(ctx.client.clone());
    let (reader, writer) = reflector::store::<GenerationJob>();
    let index = ctx.clone();
    // The job index (admission counts, the dispatcher) follows this watch too.
    let triggers = watcher(jobs, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |event| {
            index.jobs.observe(event);
            release_when_deleted_waiting(event, &index);
        })
        .applied_objects();
    Controller::for_stream(triggers, reader)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "job reconcile failed");
            }
        })
        .await;
}

fn error_policy(job: Arc<GenerationJob>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(job = job.name_any(), %error, "job reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(job: Arc<GenerationJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match job.phase() {
        JobPhase::Pending => admit(&job, &ctx).await,
        JobPhase::Queued if job.spec.cancel => cancel_queued(&job, &ctx).await,
        phase if phase.is_finished() => expire(&job, &ctx).await,
        _ => Ok(Action::await_change()),
    };
    ctx.metrics
        .reconciled(CONTROLLER, result.is_ok(), started.elapsed());
    result
}

async fn admit(job: &GenerationJob, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.clock.now();
    if job.spec.cancel {
        // An admission whose Queued write was refused (the job changed: this cancel) holds a
        // reservation already.
        release_reservation(job, ctx).await;
        finish(
            job,
            ctx,
            JobPhase::Cancelled,
            "Cancelled",
            "cancelled before admission",
            None,
        )
        .await?;
        return Ok(Action::await_change());
    }
    let Some(tenant_name) = tenant_of(job) else {
        finish(
            job,
            ctx,
            JobPhase::Rejected,
            reason::TENANT_NOT_FOUND,
            "GenerationJobs belong in a tenant namespace atelier-<tenant>",
            None,
        )
        .await?;
        return Ok(Action::await_change());
    };
    ctx.jobs.wait_until_ready().await;
    let tenants = Api::<Tenant>::all(ctx.client.clone());
    let is_waiting = |uid: &str| ctx.jobs.with_index(|index| index.is_waiting(uid));
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    let Some((decision, day)) =
        quota::admit(&tenants, tenant_name, uid, &job.spec, is_waiting, now).await?
    else {
        finish(
            job,
            ctx,
            JobPhase::Rejected,
            reason::TENANT_NOT_FOUND,
            &format!("tenant {tenant_name} does not exist"),
            None,
        )
        .await?;
        return Ok(Action::await_change());
    };
    match decision {
        Decision::Reject { reason, message } => {
            finish(job, ctx, JobPhase::Rejected, reason, &message, None).await?;
        }
        Decision::Admit => {
            let mut status = job.status.clone().unwrap_or_default();
            status.phase = Some(JobPhase::Queued);
            status.reason = Some("Admitted".into());
            status.message = Some(format!(
                "{} image(s) reserved in the quota of {day}",
                job.spec.num_images
            ));
            status.quota_day = Some(day);
            status.seed = Some(job.spec.seed.unwrap_or_else(|| u64::from(rand_seed())));
            status.admitted_time = Some(Time(now));
            status.observed_generation = job.metadata.generation;
            conditions::set_condition(
                &mut status.conditions,
                ADMITTED,
                true,
                "Admitted",
                "quota reserved",
                job.metadata.generation,
                &Time(now),
            );
            // Only over the job as admitted: a job changed since (cancelled) is read again,
            // and its retried admission finds the reservation already made.
            write_status_at(job, ctx, &status, job.metadata.resource_version.as_deref()).await?;
            tracing::info!(job = job.name_any(), user = job.spec.user, "admitted");
            transition_event(
                ctx,
                job,
                EventType::Normal,
                "Admitted",
                format!(
                    "queued for a GPU; {} image(s) reserved",
                    job.spec.num_images
                ),
            )
            .await;
            ctx.metrics
                .job_transitions
                .get_or_create(&super::metrics::TransitionLabels {
                    phase: "Queued",
                    reason: "Admitted".into(),
                })
                .inc();
        }
    }
    Ok(Action::await_change())
}

/// A queued job that is cancelled leaves the queue and gives its reservation back.
async fn cancel_queued(job: &GenerationJob, ctx: &Context) -> Result<Action, Error> {
    release_reservation(job, ctx).await;
    finish(
        job,
        ctx,
        JobPhase::Cancelled,
        "Cancelled",
        "cancelled while queued",
        None,
    )
    .await?;
    Ok(Action::await_change())
}

/// Deletes a finished job once its TTL has passed; its images stay on the volume.
async fn expire(job: &GenerationJob, ctx: &Context) -> Result<Action, Error> {
    let (Some(ttl), Some(done)) = (
        &job.spec.ttl_after_finished,
        job.status.as_ref().and_then(|s| s.completion_time.as_ref()),
    ) else {
        return Ok(Action::await_change());
    };
    let ttl: Duration = (*ttl).into();
    let expires = done.0 + jiff::SignedDuration::try_from(ttl).unwrap_or_default();
    let now = ctx.clock.now();
    if expires > now {
        let wait = now.duration_until(expires).unsigned_abs();
        return Ok(Action::requeue(wait + Duration::from_millis(100)));
    }
    let api = Api::<GenerationJob>::namespaced(
        ctx.client.clone(),
        job.metadata.namespace.as_deref().unwrap_or_default(),
    );
    match api.delete(&job.name_any(), &Default::default()).await {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Action::await_change()),
        Err(error) => Err(error.into()),
    }
}

/// Gives back the job's reserved images (when it holds a reservation of today), once however
/// often it is called. A failure is logged: the images stay counted until the day rolls over.
pub async fn release_reservation(job: &GenerationJob, ctx: &Context) {
    let (Some(tenant), Some(uid)) = (tenant_of(job), job.metadata.uid.as_deref()) else {
        return;
    };
    let tenants = Api::<Tenant>::all(ctx.client.clone());
    if let Err(error) = quota::release(&tenants, tenant, uid).await {
        tracing::error!(job = job.name_any(), tenant, %error, "could not give back the job's reserved images");
    }
}

/// A job deleted before it ran gives its reservation back.
fn release_when_deleted_waiting(event: &watcher::Event<GenerationJob>, ctx: &Arc<Context>) {
    if let watcher::Event::Delete(job) = event
        && matches!(job.phase(), JobPhase::Pending | JobPhase::Queued)
    {
        let (job, ctx) = (job.clone(), ctx.clone());
        tokio::spawn(async move { release_reservation(&job, &ctx).await });
    }
}

/// Moves a job to a final phase with a reason, condition and Event; returns the status written.
pub async fn finish(
    job: &GenerationJob,
    ctx: &Context,
    phase: JobPhase,
    reason: &str,
    message: &str,
    update: Option<&(dyn Fn(&mut GenerationJobStatus) + Sync)>,
) -> kube::Result<GenerationJobStatus> {
    let now = Time(ctx.clock.now());
    let mut status = job.status.clone().unwrap_or_default();
    status.phase = Some(phase);
    status.reason = Some(reason.to_string());
    status.message = Some(message.to_string());
    status.queue_position = None;
    status.completion_time = Some(now.clone());
    status.observed_generation = job.metadata.generation;
    if let Some(update) = update {
        update(&mut status);
    }
    let succeeded = phase == JobPhase::Succeeded;
    if phase == JobPhase::Rejected {
        conditions::set_condition(
            &mut status.conditions,
            ADMITTED,
            false,
            reason,
            message,
            job.metadata.generation,
            &now,
        );
    }
    conditions::set_condition(
        &mut status.conditions,
        COMPLETE,
        succeeded,
        reason,
        message,
        job.metadata.generation,
        &now,
    );
    write_status(job, ctx, &status).await?;
    let type_ = if succeeded || phase == JobPhase::Cancelled {
        EventType::Normal
    } else {
        EventType::Warning
    };
    transition_event(
        ctx,
        job,
        type_,
        reason,
        format!("{}: {message}", phase.as_str()),
    )
    .await;
    ctx.metrics
        .job_transitions
        .get_or_create(&super::metrics::TransitionLabels {
            phase: phase.as_str(),
            reason: reason.to_string(),
        })
        .inc();
    if let (Some(start), true) = (status.start_time.as_ref(), phase.is_finished()) {
        ctx.metrics
            .run_time
            .observe(now.0.duration_since(start.0).as_secs_f64().max(0.0));
    }
    Ok(status)
}

/// Writes a job's whole status with a merge patch.
pub async fn write_status(
    job: &GenerationJob,
    ctx: &Context,
    status: &GenerationJobStatus,
) -> kube::Result<()> {
    write_status_at(job, ctx, status, None).await
}

/// Writes a job's whole status with a merge patch; with a `resource_version`, only if the job
/// is still at that version (409 Conflict otherwise).
async fn write_status_at(
    job: &GenerationJob,
    ctx: &Context,
    status: &GenerationJobStatus,
    resource_version: Option<&str>,
) -> kube::Result<()> {
    let api = Api::<GenerationJob>::namespaced(
        ctx.client.clone(),
        job.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let mut body = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
    // A merge patch keeps fields it does not mention: clear the optional ones explicitly.
    for cleared in [
        "queuePosition",
        "progress",
        "assignedPod",
        "assignedEndpoint",
    ] {
        body.as_object_mut()
            .expect("a status is an object")
            .entry(cleared)
            .or_insert(serde_json::Value::Null);
    }
    let mut patch = serde_json::json!({ "status": body });
    if let Some(version) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    api.patch_status(
        &job.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

pub async fn transition_event(
    ctx: &Context,
    job: &GenerationJob,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Transition".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        tracing::warn!(%error, "could not publish an event");
    }
}

/// A random seed for jobs that name none, within the range a user may type.
fn rand_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Timestamp::now()) as u32
}
