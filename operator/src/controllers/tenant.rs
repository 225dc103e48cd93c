//! The Tenant controller: gives each tenant its namespace, quota, policies, volume, inference and
//! outputs servers, keeps them as desired, scales inference with the queue, and cleans up.

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_crds::conditions::{self, DEGRADED, PROGRESSING, READY};
use atelier_crds::names::{
    API_TOKEN_SECRET, INFERENCE, LABEL_COMPONENT, LABEL_TENANT, OUTPUTS, OUTPUTS_CLAIM,
    TENANT_FINALIZER,
};
use atelier_crds::{GenerationJob, Tenant, TenantPhase, TenantStatus};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    LimitRange, Namespace, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
    ResourceQuota, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::utils::PredicateConfig;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::Context;
use super::apply::{Applied, ensure};
use crate::core::backoff::retry_delay;
use crate::core::desired::{SpecError, api_token_secret, tenant_objects};
use crate::core::scaling::{
    ScalingInput, desired_replicas, replicas_for_demand, scale_down_due_in,
};

const CONTROLLER: &str = "tenant";
/// Periodic re-check even without events: catches drift in objects we do not watch.
const RESYNC: Duration = Duration::from_secs(300);
const DEBOUNCE: Duration = Duration::from_millis(500);
const MAX_CONCURRENT_RECONCILES: u16 = 16;
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    #[error("waiting for {0} jobs to stop before deleting the tenant")]
    JobsStillRunning(usize),
}

/// What the tenant controller keeps between reconciles.
struct State {
    ctx: Arc<Context>,
    /// Consecutive failed reconciles per tenant, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let tenants = Api::<Tenant>::all(client.clone());
    let owned = watcher::Config::default().labels(LABEL_TENANT);
    let state = Arc::new(State {
        ctx,
        failures: Mutex::default(),
    });
    let (reader, writer) = reflector::store::<Tenant>();
    let triggers = watcher(tenants, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(reconcile_inputs, PredicateConfig::default());
    Controller::for_stream(triggers, reader)
        // Creating a tenant's objects sends a burst of owned-object events; one reconcile
        // after the burst does the work of all of them. A bounded number of reconciles at once
        // keeps a cold start of many tenants from swamping the API server.
        .with_config(
            controller::Config::default()
                .debounce(DEBOUNCE)
                .concurrency(MAX_CONCURRENT_RECONCILES),
        )
        .owns(Api::<Namespace>::all(client.clone()), owned.clone())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<ResourceQuota>::all(client.clone()), owned.clone())
        .owns(Api::<PersistentVolumeClaim>::all(client.clone()), owned)
        .shutdown_on_signal()
        .run(reconcile, error_policy, state)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "tenant reconcile failed");
            }
        })
        .await;
}

/// What in a Tenant calls for a reconcile: its spec, finalizers and deletion, and the replicas
/// its demand asks for. Every admitted job writes the quota counters in the status, and the
/// demand moves with every job; a reconcile for each of those writes would re-read all of the
/// tenant's objects to change nothing. (Owned objects still trigger reconciles of their own.)
///
/// Without demand the tenant heads for its floor (`minReplicas`) once idle, so "no demand" and
/// "demand that the floor serves" ask for the same thing: the first job of a tenant kept warm
/// at its floor, and the last one leaving it, change nothing either.
fn reconcile_inputs(tenant: &Tenant) -> Option<u64> {
    let status = tenant.status.as_ref();
    let demand = status.map_or(0, |s| s.queued + s.running);
    let inference = &tenant.spec.inference;
    let ceiling = tenant.replica_ceiling();
    let wanted = replicas_for_demand(
        demand,
        inference.concurrency,
        inference.min_replicas,
        ceiling,
    )
    .unwrap_or(inference.min_replicas.min(ceiling));
    let mut hasher = DefaultHasher::new();
    (
        tenant.metadata.generation,
        tenant.metadata.deletion_timestamp.as_ref().map(|t| t.0),
        &tenant.metadata.finalizers,
        wanted,
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

async fn reconcile(tenant: Arc<Tenant>, state: Arc<State>) -> Result<Action, Error> {
    let ctx = &state.ctx;
    let name = tenant.name_any();
    let started = Instant::now();
    let api = Api::<Tenant>::all(ctx.client.clone());
    let result = finalizer(&api, TENANT_FINALIZER, tenant, |event| async {
        match event {
            Finalizer::Apply(tenant) => apply(&tenant, ctx).await,
            Finalizer::Cleanup(tenant) => cleanup(&tenant, ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconciled(CONTROLLER, result.is_ok(), started.elapsed());
    if result.is_ok() {
        lock(&state.failures).remove(&name);
    }
    result
}

fn error_policy(tenant: Arc<Tenant>, error: &Error, state: Arc<State>) -> Action {
    let name = tenant.name_any();
    if let Error::Finalizer(inner) = error
        && let kube::runtime::finalizer::Error::CleanupFailed(Error::JobsStillRunning(_)) = &**inner
    {
        // Waiting, not failing: look again at a steady pace.
        tracing::info!(tenant = name, %error, "tenant deletion waits");
        return Action::requeue(Duration::from_secs(5));
    }
    let failures = {
        let mut failures = lock(&state.failures);
        let count = failures.entry(name.clone()).or_default();
        *count += 1;
        *count
    };
    let delay = retry_delay(&name, failures, Duration::from_secs(1), MAX_RETRY_DELAY);
    tracing::warn!(tenant = name, %error, failures, retry_in = ?delay, "tenant reconcile failed");
    Action::requeue(delay)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn apply(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let ns = tenant.namespace_name();
    let now = ctx.clock.now();
    let mut status = tenant.status.clone().unwrap_or_default();
    let generation = tenant.metadata.generation;

    if let Some(conflict) = namespace_conflict(tenant, ctx).await? {
        set_degraded(&mut status, "NamespaceConflict", &conflict, generation);
        write_status(tenant, status, ctx).await?;
        return Ok(Action::requeue(RESYNC));
    }

    let inference_api = Api::<Deployment>::namespaced(ctx.client.clone(), &ns);
    let current_replicas = inference_api
        .get_opt(INFERENCE)
        .await?
        .and_then(|d| d.spec.and_then(|s| s.replicas))
        .unwrap_or(0) as u32;
    let scaling = ScalingInput {
        min_replicas: tenant.spec.inference.min_replicas,
        ceiling: tenant.replica_ceiling(),
        concurrency: tenant.spec.inference.concurrency,
        demand: status.queued + status.running,
        current: current_replicas,
        last_active: status.last_active_time.as_ref().map(|t| t.0),
        scale_down_after: tenant.spec.inference.scale_down_after.into(),
        now,
    };
    let replicas = desired_replicas(&scaling);

    let owner = owner_reference(tenant);
    let objects = match tenant_objects(tenant, &owner, &ctx.settings, replicas) {
        Ok(objects) => objects,
        Err(error) => {
            let reason = match error {
                SpecError::GpuBudget { .. } => "InvalidGpuBudget",
                SpecError::NoModelVolume => "NoModelVolume",
                SpecError::Quantity { .. } => "InvalidQuantity",
            };
            set_degraded(&mut status, reason, &error.to_string(), generation);
            write_status(tenant, status, ctx).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };

    let client = &ctx.client;
    let mut changes = Vec::new();
    let mut track = |kind: &'static str, name: Option<String>, applied: Applied| {
        if applied != Applied::Unchanged {
            changes.push((kind, name.unwrap_or_default(), applied));
        }
    };
    track(
        "Namespace",
        objects.namespace.metadata.name.clone(),
        ensure(&Api::<Namespace>::all(client.clone()), &objects.namespace).await?,
    );
    track(
        "ResourceQuota",
        objects.resource_quota.metadata.name.clone(),
        ensure(
            &Api::<ResourceQuota>::namespaced(client.clone(), &ns),
            &objects.resource_quota,
        )
        .await?,
    );
    track(
        "LimitRange",
        objects.limit_range.metadata.name.clone(),
        ensure(
            &Api::<LimitRange>::namespaced(client.clone(), &ns),
            &objects.limit_range,
        )
        .await?,
    );
    for policy in &objects.network_policies {
        track(
            "NetworkPolicy",
            policy.metadata.name.clone(),
            ensure(
                &Api::<NetworkPolicy>::namespaced(client.clone(), &ns),
                policy,
            )
            .await?,
        );
    }
    track(
        "ServiceAccount",
        objects.service_account.metadata.name.clone(),
        ensure(
            &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
            &objects.service_account,
        )
        .await?,
    );
    for binding in &objects.role_bindings {
        track(
            "RoleBinding",
            binding.metadata.name.clone(),
            ensure(
                &Api::<RoleBinding>::namespaced(client.clone(), &ns),
                binding,
            )
            .await?,
        );
    }
    for claim in &objects.claims {
        track(
            "PersistentVolumeClaim",
            claim.metadata.name.clone(),
            ensure(
                &Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns),
                claim,
            )
            .await?,
        );
    }
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    for pruned in prune(&claims, tenant, &objects.claims).await? {
        track("PersistentVolumeClaim", Some(pruned), Applied::Pruned);
    }
    track(
        "Secret",
        Some(API_TOKEN_SECRET.to_string()),
        ensure_api_token(tenant, &owner, ctx).await?,
    );
    for service in &objects.services {
        track(
            "Service",
            service.metadata.name.clone(),
            ensure(&Api::<Service>::namespaced(client.clone(), &ns), service).await?,
        );
    }
    track(
        "Deployment",
        objects.outputs_deployment.metadata.name.clone(),
        ensure(&inference_api, &objects.outputs_deployment).await?,
    );
    track(
        "Deployment",
        objects.inference_deployment.metadata.name.clone(),
        ensure(&inference_api, &objects.inference_deployment).await?,
    );
    // Provisioning creates a dozen objects: one Event says so, rather than one per object
    // (Events are API writes too, and a cold start of many tenants is bound by them).
    // Objects created or repaired later are drift and get an Event each.
    if changes.len() > 1 && changes.iter().all(|(_, _, a)| *a == Applied::Created) {
        let created: Vec<String> = changes
            .iter()
            .map(|(kind, object, _)| format!("{kind} {object}"))
            .collect();
        publish(
            ctx,
            tenant,
            EventType::Normal,
            "Provisioned",
            format!("created in {ns}: {}", created.join(", ")),
            None,
        )
        .await;
        changes.clear();
    }
    for (kind, object, applied) in &changes {
        let (reason, verb) = match applied {
            Applied::Created => ("Created", "created"),
            Applied::Pruned => ("Pruned", "deleted, no longer desired,"),
            _ => ("Repaired", "restored the desired state of"),
        };
        let related = ObjectReference {
            kind: Some(kind.to_string()),
            namespace: (*kind != "Namespace").then(|| ns.clone()),
            name: Some(object.clone()),
            ..ObjectReference::default()
        };
        publish(
            ctx,
            tenant,
            EventType::Normal,
            reason,
            format!("{verb} {kind} {ns}/{object}"),
            Some(related),
        )
        .await;
    }

    observe_workloads(tenant, ctx, &mut status, replicas).await?;
    write_status(tenant, status, ctx).await?;
    let requeue = scale_down_due_in(&ScalingInput {
        current: replicas,
        ..scaling
    })
    .map_or(RESYNC, |due| due.min(RESYNC) + Duration::from_secs(1));
    Ok(Action::requeue(requeue))
}

/// Creates the tenant's API token once. An existing Secret is left as it is: replacing the
/// token would lock the dispatcher out of running pods until they restart.
async fn ensure_api_token(
    tenant: &Tenant,
    owner: &OwnerReference,
    ctx: &Context,
) -> Result<Applied, Error> {
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &tenant.namespace_name());
    if secrets.get_opt(API_TOKEN_SECRET).await?.is_some() {
        return Ok(Applied::Unchanged);
    }
    // 256 bits from the OS generator, base64url.
    let token = openidconnect::CsrfToken::new_random_len(32).into_secret();
    let secret = api_token_secret(tenant, owner, &token);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(Applied::Created),
        // Another reconcile created it first; its token stands.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Applied::Unchanged),
        Err(error) => Err(error.into()),
    }
}

/// Deletes the objects of `api`'s kind that this tenant owns and no longer wants (the model
/// claim once the model comes from a claim of the tenant's own); returns their names.
async fn prune<K>(api: &Api<K>, tenant: &Tenant, desired: &[K]) -> Result<Vec<String>, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let uid = tenant.metadata.uid.as_deref();
    let wanted: Vec<&str> = desired
        .iter()
        .filter_map(|o| o.meta().name.as_deref())
        .collect();
    let selector = format!("{LABEL_TENANT}={}", tenant.name_any());
    let mut pruned = Vec::new();
    for object in api.list(&ListParams::default().labels(&selector)).await? {
        let name = object.name_any();
        let owned = object
            .owner_references()
            .iter()
            .any(|o| Some(o.uid.as_str()) == uid);
        if owned && !wanted.contains(&name.as_str()) && object.meta().deletion_timestamp.is_none() {
            api.delete(&name, &Default::default()).await?;
            pruned.push(name);
        }
    }
    Ok(pruned)
}

/// A namespace of the tenant's name that someone else created is not ours to take over.
async fn namespace_conflict(tenant: &Tenant, ctx: &Context) -> Result<Option<String>, Error> {
    let ns = tenant.namespace_name();
    let Some(existing) = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&ns)
        .await?
    else {
        return Ok(None);
    };
    let uid = tenant.metadata.uid.as_deref();
    let ours = existing
        .owner_references()
        .iter()
        .any(|o| Some(o.uid.as_str()) == uid);
    Ok((!ours).then(|| {
        format!(
            "namespace {ns} already exists and does not belong to tenant {}",
            tenant.name_any()
        )
    }))
}

/// Reads replicas and pod problems into the status conditions.
async fn observe_workloads(
    tenant: &Tenant,
    ctx: &Context,
    status: &mut TenantStatus,
    desired: u32,
) -> Result<(), Error> {
    let ns = tenant.namespace_name();
    let generation = tenant.metadata.generation;
    let now = Time(ctx.clock.now());
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), &ns);
    let ready_of = |d: Option<Deployment>| {
        d.and_then(|d| d.status).map_or((0, 0), |s| {
            (
                s.replicas.unwrap_or(0) as u32,
                s.ready_replicas.unwrap_or(0) as u32,
            )
        })
    };
    let (replicas, ready) = ready_of(deployments.get_opt(INFERENCE).await?);
    let (_, outputs_ready) = ready_of(deployments.get_opt(OUTPUTS).await?);
    status.namespace = Some(ns.clone());
    status.replicas = replicas;
    status.ready_replicas = ready;
    status.gpus_in_use = replicas * tenant.spec.gpus.per_replica;

    let problem = pod_problem(tenant, ctx).await?;
    let conditions = &mut status.conditions;
    match &problem {
        Some((reason, message)) => {
            conditions::set_condition(
                conditions,
                DEGRADED,
                true,
                reason,
                message.clone(),
                generation,
                &now,
            );
        }
        None => {
            conditions::set_condition(
                conditions,
                DEGRADED,
                false,
                "AsExpected",
                "",
                generation,
                &now,
            );
        }
    }
    let rolling_out = ready < desired || outputs_ready < 1;
    let progress_message = format!(
        "{ready}/{desired} inference replicas ready, outputs server {}",
        if outputs_ready > 0 {
            "ready"
        } else {
            "starting"
        }
    );
    conditions::set_condition(
        conditions,
        PROGRESSING,
        rolling_out,
        if rolling_out {
            "RollingOut"
        } else {
            "Complete"
        },
        progress_message,
        generation,
        &now,
    );
    let serving = outputs_ready > 0 && problem.is_none();
    let (reason, message) = if serving {
        (
            "Ready",
            format!("namespace {ns} provisioned; {ready} inference replicas ready"),
        )
    } else {
        ("NotReady", "waiting for the tenant's pods".to_string())
    };
    conditions::set_condition(
        conditions, READY, serving, reason, message, generation, &now,
    );
    status.phase = Some(if problem.is_some() {
        TenantPhase::Degraded
    } else if serving {
        TenantPhase::Ready
    } else {
        TenantPhase::Pending
    });
    status.observed_generation = generation;
    Ok(())
}

/// The first reason a tenant pod cannot run, in the pods' own words.
async fn pod_problem(tenant: &Tenant, ctx: &Context) -> Result<Option<(String, String)>, Error> {
    let ns = tenant.namespace_name();
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(LABEL_COMPONENT))
        .await?;
    for pod in &pods.items {
        let Some(status) = &pod.status else { continue };
        for condition in status.conditions.iter().flatten() {
            if condition.type_ == "PodScheduled"
                && condition.status == "False"
                && condition.reason.as_deref() == Some("Unschedulable")
            {
                return Ok(Some((
                    "Unschedulable".into(),
                    format!(
                        "pod {}: {}",
                        pod.name_any(),
                        condition.message.clone().unwrap_or_default()
                    ),
                )));
            }
        }
        for container in status.container_statuses.iter().flatten() {
            let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
            if let Some(waiting) = waiting
                && matches!(
                    waiting.reason.as_deref(),
                    Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName")
                )
            {
                return Ok(Some((
                    "ImagePullFailed".into(),
                    format!(
                        "pod {}: {}",
                        pod.name_any(),
                        waiting.message.clone().unwrap_or_default()
                    ),
                )));
            }
        }
    }
    // Pods refused by the ResourceQuota never exist; their ReplicaSet says why.
    let replica_sets =
        Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default().labels(LABEL_COMPONENT))
            .await?;
    for rs in &replica_sets.items {
        for condition in rs.status.iter().flat_map(|s| s.conditions.iter().flatten()) {
            let message = condition.message.clone().unwrap_or_default();
            if condition.type_ == "ReplicaFailure"
                && condition.status == "True"
                && message.contains("exceeded quota")
            {
                return Ok(Some(("QuotaExceeded".into(), message)));
            }
        }
    }
    Ok(None)
}

fn set_degraded(status: &mut TenantStatus, reason: &str, message: &str, generation: Option<i64>) {
    let now = Time(Timestamp::now());
    conditions::set_condition(
        &mut status.conditions,
        DEGRADED,
        true,
        reason,
        message,
        generation,
        &now,
    );
    conditions::set_condition(
        &mut status.conditions,
        READY,
        false,
        reason,
        message,
        generation,
        &now,
    );
    status.phase = Some(TenantPhase::Degraded);
    status.observed_generation = generation;
}

/// Writes the fields this controller owns, only when they changed. A merge patch leaves the quota
/// fields (written by the job controller) alone.
async fn write_status(tenant: &Tenant, status: TenantStatus, ctx: &Context) -> Result<(), Error> {
    let current = tenant.status.clone().unwrap_or_default();
    let mine = |s: &TenantStatus| {
        (
            s.phase,
            s.conditions.clone(),
            s.observed_generation,
            s.namespace.clone(),
            s.replicas,
            s.ready_replicas,
            s.gpus_in_use,
        )
    };
    if mine(&current) == mine(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": {
        "phase": status.phase,
        "conditions": status.conditions,
        "observedGeneration": status.observed_generation,
        "namespace": status.namespace,
        "replicas": status.replicas,
        "readyReplicas": status.ready_replicas,
        "gpusInUse": status.gpus_in_use,
    }});
    Api::<Tenant>::all(ctx.client.clone())
        .patch_status(
            &tenant.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    let ready = conditions::is_true(&status.conditions, READY);
    for condition in [READY, PROGRESSING, DEGRADED] {
        let labels = super::metrics::TenantConditionLabels {
            tenant: tenant.name_any(),
            condition,
        };
        let value = i64::from(conditions::is_true(&status.conditions, condition));
        ctx.metrics
            .tenant_conditions
            .get_or_create(&labels)
            .set(value);
    }
    tracing::info!(tenant = tenant.name_any(), phase = ?status.phase, ready, "tenant status updated");
    Ok(())
}

/// Before the namespace goes: cancel running jobs, keep the output data if asked, then delete.
/// A namespace of the tenant's name that is not ours (`NamespaceConflict`) is left untouched:
/// its jobs, volume and the namespace itself belong to someone else.
async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    ctx.metrics.forget_tenant(&tenant.name_any());
    let ns = tenant.namespace_name();
    if let Some(conflict) = namespace_conflict(tenant, ctx).await? {
        tracing::info!(tenant = tenant.name_any(), %conflict, "deleting the tenant leaves the namespace alone");
        return Ok(Action::await_change());
    }
    let jobs = Api::<GenerationJob>::namespaced(ctx.client.clone(), &ns);
    let active: Vec<GenerationJob> = match jobs.list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|j| !j.phase().is_finished())
            .collect(),
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(error) => return Err(error.into()),
    };
    if !active.is_empty() {
        for job in &active {
            if !job.spec.cancel {
                let patch = serde_json::json!({ "spec": { "cancel": true } });
                jobs.patch(
                    &job.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            }
        }
        return Err(Error::JobsStillRunning(active.len()));
    }
    if tenant.spec.storage.retain_on_delete {
        retain_output_volume(tenant, ctx).await?;
    }
    let namespaces = Api::<Namespace>::all(ctx.client.clone());
    if let Some(namespace) = namespaces.get_opt(&ns).await?
        && namespace.metadata.deletion_timestamp.is_none()
    {
        namespaces.delete(&ns, &Default::default()).await?;
        publish(
            ctx,
            tenant,
            EventType::Normal,
            "Deleting",
            format!("deleting namespace {ns}"),
            None,
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Switches the outputs volume to `Retain` and labels it with the tenant, so the images outlive
/// the namespace; docs/operations.md explains how to mount it again.
async fn retain_output_volume(tenant: &Tenant, ctx: &Context) -> Result<(), Error> {
    let ns = tenant.namespace_name();
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns);
    let Some(volume) = claims
        .get_opt(OUTPUTS_CLAIM)
        .await?
        .and_then(|c| c.spec)
        .and_then(|s| s.volume_name)
    else {
        return Ok(());
    };
    let patch = serde_json::json!({
        "metadata": { "labels": { LABEL_TENANT: tenant.name_any(), "atelier.dev/retained-from": ns } },
        "spec": { "persistentVolumeReclaimPolicy": "Retain" },
    });
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch(&volume, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    publish(
        ctx,
        tenant,
        EventType::Normal,
        "VolumeRetained",
        format!("kept PersistentVolume {volume} with the tenant's images"),
        None,
    )
    .await;
    Ok(())
}

fn owner_reference(tenant: &Tenant) -> OwnerReference {
    tenant
        .controller_owner_ref(&())
        .expect("a Tenant from the API server has a name and uid")
}

/// Publishes an Event on the tenant; `related` names the object it is about, which also keeps
/// the recorder from folding events about different objects into one series.
async fn publish(
    ctx: &Context,
    tenant: &Tenant,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: related,
    };
    if let Err(error) = ctx.recorder.publish(&event, &tenant.object_ref(&())).await {
        tracing::warn!(%error, "could not publish an event");
    }
}

#[cfg(test)]
mod tests {
    use atelier_crds::UserUsage;
    use serde_json::json;

    use super::*;

    fn tenant(min_replicas: u32, queued: u32, running: u32) -> Tenant {
        let spec = json!({
            "members": [{ "group": "team-a", "role": "user" }],
            "gpus": { "max": 4 },
            "inference": { "model": { "volumeName": "flux-weights" }, "minReplicas": min_replicas, "concurrency": 2 },
        });
        let mut tenant = Tenant::new("team-a", serde_json::from_value(spec).unwrap());
        tenant.metadata.generation = Some(1);
        tenant.status = Some(TenantStatus {
            queued,
            running,
            ..TenantStatus::default()
        });
        tenant
    }

    #[test]
    fn quota_counters_and_demand_within_a_replica_do_not_trigger_reconciles() {
        let idle = reconcile_inputs(&tenant(1, 0, 0));
        let mut counted = tenant(1, 0, 0);
        counted.status.as_mut().unwrap().usage = vec![UserUsage {
            user: "ann".into(),
            images: 3,
        }];
        assert_eq!(reconcile_inputs(&counted), idle);
        // One replica runs two jobs: one or two jobs ask for the same replicas.
        assert_eq!(
            reconcile_inputs(&tenant(1, 1, 0)),
            reconcile_inputs(&tenant(1, 0, 2))
        );
        // The replica kept warm serves the first job and stays when the last one leaves.
        assert_eq!(reconcile_inputs(&tenant(1, 0, 1)), idle);
    }

    #[test]
    fn spec_deletion_and_replica_demand_trigger_reconciles() {
        let base = tenant(0, 0, 0);
        let mut respec = base.clone();
        respec.metadata.generation = Some(2);
        let mut deleted = base.clone();
        deleted.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let mut finalized = base.clone();
        finalized.metadata.finalizers = Some(vec![TENANT_FINALIZER.into()]);
        for (what, changed) in [
            ("a spec change", respec),
            ("a deletion", deleted),
            ("a finalizer", finalized),
            (
                "the first job of a tenant at zero replicas",
                tenant(0, 1, 0),
            ),
        ] {
            assert_ne!(
                reconcile_inputs(&changed),
                reconcile_inputs(&base),
                "{what}"
            );
        }
        // A third job needs a second replica; when the jobs leave a tenant above its floor,
        // the idle clock starts.
        assert_ne!(
            reconcile_inputs(&tenant(1, 3, 0)),
            reconcile_inputs(&tenant(1, 2, 0))
        );
        assert_ne!(
            reconcile_inputs(&tenant(1, 0, 3)),
            reconcile_inputs(&tenant(1, 0, 0))
        );
    }
}
