//! A local kubelet that runs pod containers as local processes.
//!
//! It registers Nodes and keeps them Ready ([`node`]), and for every pod bound to one of them
//! ([`pods`], [`worker`]): gives it an address 198.18.1.N ([`ips`]) in a network namespace of
//! its own ([`network`]), prepares its volumes ([`volumes`]), environment ([`env`]) and ServiceAccount
//! identity ([`identity`]), runs each container's binary (the image's name looked up in the bin dir) in its own mount namespace
//! ([`process`]) with restarts and probes ([`container`], [`probes`]), reports the pod status
//! ([`status`]) and finishes deletions.

mod container;
mod env;
mod identity;
mod ips;
mod network;
mod node;
mod pods;
mod probes;
mod process;
mod status;
mod volumes;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use node::NodeConfig;

/// How the kubelet runs.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    pub nodes: Vec<NodeConfig>,
    /// Pod directories (`pods/<uid>`) and container logs (`logs/<ns>_<pod>_<container>.log`).
    pub root: PathBuf,
    /// Where image names are looked up as binaries.
    pub bin_dir: PathBuf,
    /// The kubeconfig whose server URL and CA the pods' own kubeconfigs use.
    pub kubeconfig: PathBuf,
    /// Upper bound on `terminationGracePeriodSeconds`, to keep tests fast.
    pub max_grace_period: Duration,
}

impl KubeletConfig {
    pub fn new(kubeconfig: &Path, root: &Path, bin_dir: &Path, nodes: Vec<NodeConfig>) -> Self {
        Self {
            nodes,
            root: root.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
            max_grace_period: Duration::from_secs(10),
        }
    }
}

/// Where a container's stdout and stderr go.
pub fn container_log_path(root: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    root.join("logs")
        .join(format!("{namespace}_{pod}_{container}.log"))
}

/// The process ids of the running containers, by pod (namespace, name) and container name.
#[derive(Default)]
pub(crate) struct ProcessTable(Mutex<HashMap<(String, String), BTreeMap<String, u32>>>);

impl ProcessTable {
    fn entries(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), BTreeMap<String, u32>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, namespace: &str, pod: &str, container: &str, pid: u32) {
        self.entries()
            .entry((namespace.to_string(), pod.to_string()))
            .or_default()
            .insert(container.to_string(), pid);
    }

    pub(crate) fn remove(&self, namespace: &str, pod: &str, container: &str) {
        let mut entries = self.entries();
        let key = (namespace.to_string(), pod.to_string());
        if let Some(containers) = entries.get_mut(&key) {
            containers.remove(container);
            if containers.is_empty() {
                entries.remove(&key);
            }
        }
    }

    fn pids(&self, namespace: &str, pod: &str) -> Vec<u32> {
        self.entries()
            .get(&(namespace.to_string(), pod.to_string()))
            .map(|containers| containers.values().copied().collect())
            .unwrap_or_default()
    }
}

/// State shared by the pod workers.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) config: KubeletConfig,
    pub(crate) api_access: identity::ApiAccess,
    pub(crate) ips: Mutex<ips::IpPool>,
    pub(crate) processes: Arc<ProcessTable>,
    /// Per node: false while it is NotReady by fault injection, when its pods' statuses freeze
    /// as if the kubelet were unreachable.
    pub(crate) node_ready: BTreeMap<String, watch::Receiver<bool>>,
    /// For probes.
    pub(crate) http: reqwest::Client,
}

/// A running kubelet. Its methods work from any thread or runtime.
pub struct KubeletHandle {
    processes: Arc<ProcessTable>,
    node_ready: BTreeMap<String, watch::Sender<bool>>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Registers the nodes (Ready when this returns) and starts running their pods, on the current
/// runtime. Container processes are killed if the thread running this runtime ends.
pub async fn start(client: Client, config: KubeletConfig) -> anyhow::Result<KubeletHandle> {
    std::fs::create_dir_all(config.root.join("logs"))
        .with_context(|| format!("creating {}", config.root.display()))?;
    let (shutdown, _) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut node_ready = BTreeMap::new();
    let mut node_ready_receivers = BTreeMap::new();
    for node in &config.nodes {
        let (ready, ready_receiver) = watch::channel(true);
        tasks.push(
            node::register(
                client.clone(),
                node.clone(),
                ready_receiver.clone(),
                shutdown.subscribe(),
            )
            .await?,
        );
        node_ready.insert(node.name.clone(), ready);
        node_ready_receivers.insert(node.name.clone(), ready_receiver);
    }
    let processes = Arc::new(ProcessTable::default());
    let shared = Arc::new(Shared {
        api_access: identity::ApiAccess::from_kubeconfig(&config.kubeconfig)?,
        client,
        config,
        ips: Mutex::new(ips::IpPool::machine_wide().context("routing the pod IP range")?),
        processes: processes.clone(),
        node_ready: node_ready_receivers,
        // Probes go straight to the pod, never through a proxy from the environment.
        http: reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .build()?,
    });
    tasks.push(tokio::spawn(pods::run(shared, shutdown.subscribe())));
    Ok(KubeletHandle {
        processes,
        node_ready,
        shutdown,
        tasks: Mutex::new(tasks),
    })
}

impl KubeletHandle {
    /// SIGKILLs the container processes of a pod (and their children); returns how many
    /// containers were running. The kubelet restarts them per the pod's `restartPolicy`.
    pub fn kill_pod_processes(&self, namespace: &str, pod: &str) -> usize {
        let pids = self.processes.pids(namespace, pod);
        for pid in &pids {
            let _ = crate::child::signal_group(*pid, libc::SIGKILL);
        }
        pids.len()
    }

    /// `false` stops the node's heartbeats after reporting Ready=False with the not-ready
    /// taint; `true` resumes them.
    pub fn set_node_ready(&self, node: &str, ready: bool) -> anyhow::Result<()> {
        let sender = self
            .node_ready
            .get(node)
            .ok_or_else(|| anyhow!("this kubelet runs no node {node:?}"))?;
        sender.send_replace(ready);
        Ok(())
    }

    /// Stops every pod's processes (leaving the pods in the API) and the heartbeats.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in tasks {
            let _ = task.await;
        }
    }
}
