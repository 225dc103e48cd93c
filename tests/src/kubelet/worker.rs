//! One pod's life on this kubelet: address, volumes, identity and environment, its
//! containers, its status, and its deletion.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::container::ContainerRun;
use super::env::{EnvVars, References, container_env};
use super::network::PodNetwork;
use super::process::{Launch, image_binary_name, resolve_program};
use super::status::{
    ContainerRecord, HOST_IP, PodView, now, phase, pod_status, waiting, written_part,
};
use super::{Shared, container_log_path, identity, volumes};

/// What the API says about a pod.
#[derive(Clone)]
pub(crate) enum PodUpdate {
    Present(Box<Pod>),
    /// Deleted from the API (or missing from a relist) without us finishing it.
    Gone,
}

/// Grace period of the containers when the kubelet itself shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(16);

pub(crate) async fn run(
    shared: Arc<Shared>,
    mut updates: watch::Receiver<PodUpdate>,
    mut shutdown: watch::Receiver<bool>,
    finished: mpsc::UnboundedSender<String>,
) {
    let PodUpdate::Present(pod) = updates.borrow_and_update().clone() else {
        return;
    };
    let uid = pod.uid().unwrap_or_default();
    let mut worker = PodWorker::new(shared, *pod);
    worker.run(&mut updates, &mut shutdown).await;
    let _ = finished.send(uid);
}

struct PodWorker {
    shared: Arc<Shared>,
    pod: Pod,
    namespace: String,
    name: String,
    uid: String,
    pod_dir: PathBuf,
    pod_ip: Option<String>,
    /// Set while the pod holds an address (none for `hostNetwork` pods).
    network: Option<PodNetwork>,
    start_time: Option<Time>,
    records: Arc<Mutex<Vec<ContainerRecord>>>,
    changed: Arc<Notify>,
    containers: Option<RunningContainers>,
    /// Whether the pod's node is Ready (see [`Shared::node_ready`]).
    node_ready: Option<watch::Receiver<bool>>,
    /// Terminal before this kubelet saw it (e.g. across a kubelet restart): never rerun.
    ended_elsewhere: bool,
    /// The status last written, to write only changes.
    written: Option<PodStatus>,
    /// When to try again something that failed (starting, writing the status).
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

struct RunningContainers {
    stop: watch::Sender<Option<Duration>>,
    tasks: Vec<JoinHandle<()>>,
}

impl PodWorker {
    fn new(shared: Arc<Shared>, pod: Pod) -> Self {
        let uid = pod.uid().unwrap_or_default();
        let records = pod
            .spec
            .iter()
            .flat_map(|spec| &spec.containers)
            .map(|container| {
                ContainerRecord::new(
                    &container.name,
                    container.image.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        let ended_elsewhere = matches!(
            pod.status
                .as_ref()
                .and_then(|status| status.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        let node = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.clone())
            .unwrap_or_default();
        Self {
            node_ready: shared.node_ready.get(&node).cloned(),
            pod_dir: shared.config.root.join("pods").join(&uid),
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid,
            shared,
            pod,
            pod_ip: None,
            network: None,
            start_time: None,
            records: Arc::new(Mutex::new(records)),
            changed: Arc::new(Notify::new()),
            containers: None,
            ended_elsewhere,
            written: None,
            retry_at: None,
            retry_delay: Duration::from_secs(1),
        }
    }

    async fn run(
        &mut self,
        updates: &mut watch::Receiver<PodUpdate>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        loop {
            let update = updates.borrow_and_update().clone();
            match update {
                PodUpdate::Gone => {
                    self.stop(self.grace_period()).await;
                    self.clean_up();
                    return;
                }
                PodUpdate::Present(pod) => self.pod = *pod,
            }
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.stop(self.grace_period()).await;
                self.write_status().await;
                self.clean_up();
                self.delete().await;
                return;
            }
            if *shutdown.borrow() {
                self.stop(SHUTDOWN_GRACE).await;
                self.release_ip();
                return;
            }
            if self.ended_elsewhere {
                self.retry_at = None;
            } else {
                self.progress().await;
            }
            let manager_gone = tokio::select! {
                changed = updates.changed() => changed.is_err(),
                () = self.changed.notified() => false,
                () = sleep_until(self.retry_at) => false,
                () = readiness_change(&mut self.node_ready) => false,
                _ = shutdown.wait_for(|stop| *stop) => false,
            };
            if manager_gone {
                // Only when the kubelet is shutting down.
                self.stop(SHUTDOWN_GRACE).await;
                self.release_ip();
                return;
            }
        }
    }

    /// Starts the containers if they are not running yet, releases the address once they have
    /// all ended, and writes the status.
    async fn progress(&mut self) {
        let due = self.retry_at.is_none_or(|at| at <= Instant::now());
        // Woken early (a pod update, often our own status write): keep the pending retry.
        if due {
            self.retry_at = None;
        }
        if self.containers.is_none() && due {
            match self.start().await {
                Ok(()) => self.retry_delay = Duration::from_secs(1),
                Err(error) => {
                    tracing::debug!(
                        "pod {}/{} cannot start yet: {error:#}",
                        self.namespace,
                        self.name
                    );
                    self.retry_later();
                }
            }
        }
        let records = self.records();
        if self.containers.is_some() && matches!(phase(&records), "Succeeded" | "Failed") {
            self.release_ip();
        }
        if !self.write_status().await {
            self.retry_later();
        }
    }

    fn retry_later(&mut self) {
        let at = Instant::now() + self.retry_delay;
        self.retry_at = Some(self.retry_at.map_or(at, |current| current.min(at)));
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
    }

    fn records(&self) -> Vec<ContainerRecord> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_waiting(&self, index: usize, reason: &str, message: String) {
        let mut records = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        records[index].state = waiting(reason, Some(message));
    }

    /// Prepares the pod and starts its containers; on failure the containers stay waiting with
    /// the reason (ContainerCreating, ErrImagePull, CreateContainerConfigError).
    async fn start(&mut self) -> anyhow::Result<()> {
        let host_network = self.pod.spec.as_ref().and_then(|spec| spec.host_network) == Some(true);
        let pod_ip = match &self.pod_ip {
            Some(ip) => ip.clone(),
            None if host_network => HOST_IP.to_string(),
            None => {
                let address = self.lock_ips().allocate(&self.uid)?;
                match PodNetwork::create(address) {
                    Ok(network) => self.network = Some(network),
                    Err(error) => {
                        self.release_ip();
                        return Err(error.context(format!("the network of pod IP {address}")));
                    }
                }
                address.to_string()
            }
        };
        self.pod_ip = Some(pod_ip.clone());
        self.start_time.get_or_insert_with(|| Time(now()));
        let container_count = self.records().len();
        let prepared = self.prepare_pod(&pod_ip).await;
        let (volumes, kubeconfig) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                for index in 0..container_count {
                    self.set_waiting(index, "ContainerCreating", format!("{error:#}"));
                }
                return Err(error);
            }
        };
        let containers: Vec<Container> = self
            .pod
            .spec
            .iter()
            .flat_map(|spec| spec.containers.clone())
            .collect();
        let mut launches = Vec::new();
        let mut failure = None;
        for (index, container) in containers.iter().enumerate() {
            match self
                .launch(container, &pod_ip, &volumes, kubeconfig.as_ref())
                .await
            {
                Ok(launch) => launches.push(launch),
                Err((reason, error)) => {
                    self.set_waiting(index, reason, format!("{error:#}"));
                    failure = Some(error);
                }
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        let restart_policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|spec| spec.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let (stop, _) = watch::channel(None);
        let tasks = containers
            .into_iter()
            .zip(launches)
            .enumerate()
            .map(|(index, (container, launch))| {
                let run = ContainerRun {
                    shared: self.shared.clone(),
                    namespace: self.namespace.clone(),
                    pod: self.name.clone(),
                    index,
                    container,
                    launch,
                    restart_policy: restart_policy.clone(),
                    pod_ip: pod_ip.clone(),
                    records: self.records.clone(),
                    changed: self.changed.clone(),
                    stop: stop.subscribe(),
                };
                tokio::spawn(run.run())
            })
            .collect();
        self.containers = Some(RunningContainers { stop, tasks });
        Ok(())
    }

    fn lock_ips(&self) -> std::sync::MutexGuard<'_, super::ips::IpPool> {
        self.shared
            .ips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pod's volumes and, unless it opts out, its kubeconfig.
    async fn prepare_pod(
        &self,
        pod_ip: &str,
    ) -> anyhow::Result<(HashMap<String, PathBuf>, Option<PathBuf>)> {
        let client = &self.shared.client;
        let volumes = volumes::prepare(client, &self.pod, pod_ip, &self.pod_dir).await?;
        let kubeconfig = identity::write_pod_kubeconfig(
            client,
            &self.shared.api_access,
            &self.pod,
            &self.pod_dir,
        )
        .await
        .context("pod identity")?;
        Ok((volumes, kubeconfig))
    }

    /// How to run one container, or the waiting reason why it cannot run.
    async fn launch(
        &self,
        container: &Container,
        pod_ip: &str,
        volumes: &HashMap<String, PathBuf>,
        kubeconfig: Option<&PathBuf>,
    ) -> Result<Launch, (&'static str, anyhow::Error)> {
        let bin_dir = &self.shared.config.bin_dir;
        let image = container.image.as_deref().unwrap_or_default();
        let image_binary = bin_dir.join(image_binary_name(image));
        if !image_binary.is_file() {
            let error = anyhow::anyhow!(
                "image {image:?}: no binary {} (build it first)",
                image_binary.display()
            );
            return Err(("ErrImagePull", error));
        }
        let config_error = |error: anyhow::Error| ("CreateContainerConfigError", error);
        let mut base = EnvVars::default();
        base.set(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            }),
        );
        base.set("HOME", "/root");
        base.set("HOSTNAME", &self.name);
        if let Ok(library_path) = std::env::var("LD_LIBRARY_PATH") {
            base.set("LD_LIBRARY_PATH", library_path);
        }
        if let Some(kubeconfig) = kubeconfig {
            base.set("KUBECONFIG", kubeconfig.to_string_lossy());
        }
        let references = References::new(&self.shared.client, &self.namespace);
        let env = container_env(&references, &self.pod, container, pod_ip, base)
            .await
            .map_err(config_error)?;
        let command: Vec<String> = container
            .command
            .iter()
            .flatten()
            .map(|part| env.expand(part))
            .collect();
        let args = container.args.iter().flatten().map(|arg| env.expand(arg));
        let (program, mut leading) = resolve_program(bin_dir, &image_binary, &command)
            .map_err(|error| ("CreateContainerError", error))?;
        leading.extend(args);
        let mounts = volumes::container_mounts(container, volumes).map_err(config_error)?;
        Ok(Launch {
            program,
            args: leading,
            env: env.into_vec(),
            mounts,
            working_dir: container.working_dir.as_ref().map(PathBuf::from),
            network: self.network.as_ref().map(PodNetwork::namespace),
            log_path: container_log_path(
                &self.shared.config.root,
                &self.namespace,
                &self.name,
                &container.name,
            ),
        })
    }

    /// Writes the status if it changed; false if that failed.
    async fn write_status(&mut self) -> bool {
        if self
            .node_ready
            .as_ref()
            .is_some_and(|ready| !*ready.borrow())
        {
            return true;
        }
        let records = self.records();
        let status = pod_status(
            &PodView {
                pod: &self.pod,
                pod_ip: self.pod_ip.as_deref(),
                start_time: self.start_time.as_ref(),
                containers: &records,
                previous: self.written.as_ref(),
            },
            now(),
        );
        // Skip the write only if the API shows it too: someone else (the node lifecycle
        // controller marking pods of an unreachable node NotReady) may have changed it.
        let observed = self.pod.status.as_ref().map(written_part);
        if self.written.as_ref() == Some(&status) && observed.as_ref() == Some(&status) {
            return true;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        // The UID makes the patch fail rather than touch a new pod of the same name.
        let patch = json!({"metadata": {"uid": self.uid}, "status": status});
        match api
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {
                self.written = Some(status);
                true
            }
            Err(error) => {
                tracing::debug!(
                    "writing the status of pod {}/{}: {error}",
                    self.namespace,
                    self.name
                );
                false
            }
        }
    }

    /// A deleted pod's grace period, capped to keep tests fast.
    fn grace_period(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or(self
                .pod
                .spec
                .as_ref()
                .and_then(|spec| spec.termination_grace_period_seconds))
            .unwrap_or(30);
        Duration::from_secs(seconds.max(0).unsigned_abs()).min(self.shared.config.max_grace_period)
    }

    async fn stop(&mut self, grace: Duration) {
        if let Some(containers) = self.containers.take() {
            containers.stop.send_replace(Some(grace));
            for task in containers.tasks {
                let _ = task.await;
            }
        }
    }

    /// Removes the pod's network (its containers have ended) and frees its address.
    fn release_ip(&mut self) {
        self.network = None;
        self.lock_ips().release(&self.uid);
    }

    fn clean_up(&mut self) {
        self.release_ip();
        if let Err(error) = std::fs::remove_dir_all(&self.pod_dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {error}", self.pod_dir.display());
        }
    }

    /// The kubelet's last word on a deleted pod: remove the object now that its processes are
    /// gone.
    async fn delete(&self) {
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        for _ in 0..10 {
            match api.delete(&self.name, &params).await {
                Ok(_) => return,
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => return,
                Err(error) => {
                    tracing::debug!("deleting pod {}/{}: {error}", self.namespace, self.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

async fn readiness_change(ready: &mut Option<watch::Receiver<bool>>) {
    if let Some(ready) = ready.as_mut()
        && ready.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
