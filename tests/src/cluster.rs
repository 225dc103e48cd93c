//! [`TestCluster`]: a real control plane with Atelier's CRDs, a local kubelet and a local
//! volume provisioner, for end-to-end tests.
//!
//! Everything runs on a dedicated background thread with its own tokio runtime, so that one
//! cluster can serve every `#[tokio::test]` of a test binary (each has its own runtime, and a
//! `kube::Client` only works on the runtime that made it): tests make their own clients with
//! [`TestCluster::client`]. Child processes die with the test process (PR_SET_PDEATHSIG).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::sync::{OnceCell, oneshot};

use crate::control_plane::ControlPlane;
use crate::kubelet::{self, KubeletConfig, KubeletHandle, NodeConfig};
use crate::policy_engine::PolicyEngine;
use crate::proxy::{self, ProxySwitch};
use crate::wait::{DEFAULT_TIMEOUT, wait_for};
use crate::{child, crds, paths, provisioner};

/// What to run in a [`TestCluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Nodes of the local kubelet.
    pub nodes: Vec<NodeConfig>,
    /// Where container images are looked up as binaries.
    pub bin_dir: PathBuf,
    /// Enforce NetworkPolicies with kube-router ([`crate::policy_engine`]); one such cluster
    /// at a time on a machine.
    pub network_policies: bool,
}

impl Default for ClusterOptions {
    /// One node `local-1` with 8 `nvidia.com/gpu` (room for the GPU-holding tenants of one test
    /// binary); binaries from [`paths::default_bin_dir`].
    fn default() -> Self {
        Self {
            nodes: vec![NodeConfig::new("local-1").with_resource("nvidia.com/gpu", "8")],
            bin_dir: paths::default_bin_dir(),
            network_policies: false,
        }
    }
}

/// A running cluster. Dropping it stops everything (the shared one lives as long as the test
/// process).
pub struct TestCluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server_url: String,
    config: kube::Config,
    options: ClusterOptions,
    crds: Vec<String>,
    pub(crate) kubelet: Arc<KubeletHandle>,
    pub(crate) api_proxy: ProxySwitch,
    background: Option<Background>,
}

/// The thread that owns the processes; dropping `stop` makes it tear them down.
struct Background {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// What the background thread keeps to stop the cluster.
struct Services {
    control_plane: ControlPlane,
    kubelet: Arc<KubeletHandle>,
    provisioner: tokio::task::JoinHandle<()>,
    policy_engine: Option<PolicyEngine>,
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts a cluster of its own with [`ClusterOptions::default`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Self> {
        let (started_sender, started) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("atelier-test-cluster".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for the test cluster");
                runtime.block_on(async move {
                    match start_services(options).await {
                        Ok((cluster, services)) => {
                            let _ = started_sender.send(Ok(cluster));
                            let _ = stopped.await;
                            services.stop().await;
                        }
                        Err(error) => {
                            let _ = started_sender.send(Err(error));
                        }
                    }
                });
            })?;
        let mut cluster = started.await.context("the test cluster thread died")??;
        cluster.background = Some(Background { stop, thread });
        Ok(cluster)
    }

    /// The cluster shared by all tests of this test binary, started on first use. Panics if it
    /// cannot start.
    pub async fn shared() -> &'static TestCluster {
        static SHARED: OnceCell<TestCluster> = OnceCell::const_new();
        SHARED
            .get_or_try_init(Self::start)
            .await
            .unwrap_or_else(|error| panic!("starting the shared test cluster: {error:#}"))
    }

    /// An admin (system:masters) client on the caller's runtime.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("a client from the test cluster's kubeconfig")
    }

    /// The admin client configuration, to derive others (e.g. `auth_info.impersonate`).
    pub fn kube_config(&self) -> kube::Config {
        self.config.clone()
    }

    /// The admin kubeconfig (through the pausable proxy, see [`TestCluster::pause_api_server`]).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT` of the API server (through the proxy).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The cluster's private directory (control plane data and `testcluster.log`, kubelet
    /// root, volumes).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bin_dir(&self) -> &Path {
        &self.options.bin_dir
    }

    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    pub fn node_names(&self) -> Vec<&str> {
        self.options
            .nodes
            .iter()
            .map(|node| node.name.as_str())
            .collect()
    }

    /// Names of the CRDs installed from `charts/atelier/crds` (none while it is empty).
    pub fn crds(&self) -> &[String] {
        &self.crds
    }

    pub fn container_log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        kubelet::container_log_path(&self.kubelet_root(), namespace, pod, container)
    }

    /// The logs of every container of a pod, for failure messages.
    pub fn pod_logs(&self, namespace: &str, pod: &str) -> String {
        let prefix = format!("{namespace}_{pod}_");
        let Ok(entries) = std::fs::read_dir(self.kubelet_root().join("logs")) else {
            return String::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with(&prefix))
            })
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|path| {
                format!(
                    "==> {} <==\n{}",
                    path.display(),
                    std::fs::read_to_string(path).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Creates a namespace with a unique name from `prefix` and waits for its `default`
    /// ServiceAccount (pods cannot be created before it exists).
    pub async fn create_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        let client = self.client().await;
        let name = crate::unique_name(prefix);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, &name);
        wait_for(
            &format!("the default ServiceAccount of {name}"),
            DEFAULT_TIMEOUT,
            || async { Ok(accounts.get_opt("default").await?.map(|_| ())) },
        )
        .await?;
        Ok(name)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(background) = self.background.take() {
            drop(background.stop);
            let _ = background.thread.join();
        }
    }
}

/// Runs on the background thread: control plane, proxy, CRDs, provisioner, kubelet.
async fn start_services(options: ClusterOptions) -> anyhow::Result<(TestCluster, Services)> {
    let dir = cluster_dir()?;
    let control_plane = ControlPlane::start(dir.path()).await?;
    let (proxy_address, api_proxy) = proxy::start(control_plane.address).await?;
    let server_url = format!("https://{proxy_address}");
    let kubeconfig = dir.path().join("admin-via-proxy.kubeconfig");
    write_proxied_kubeconfig(&dir.path().join("kubeconfig"), &kubeconfig, &server_url)?;
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await
    .context("loading the admin kubeconfig")?;
    let client = Client::try_from(config.clone())?;
    let crds = crds::install_crds(&client, &paths::crd_dir()).await?;
    provisioner::ensure_storage_class(&client).await?;
    let provisioner = tokio::spawn(provisioner::run(client.clone(), dir.path().join("volumes")));
    let kubelet_config = KubeletConfig::new(
        &kubeconfig,
        &dir.path().join("kubelet"),
        &options.bin_dir,
        options.nodes.clone(),
    );
    let kubelet = Arc::new(kubelet::start(client, kubelet_config).await?);
    let policy_engine = match options.nodes.first() {
        Some(node) if options.network_policies => {
            Some(PolicyEngine::start(&dir.path().join("kubeconfig"), &node.name, dir.path()).await?)
        }
        _ => None,
    };
    let cluster = TestCluster {
        dir: dir.path().to_path_buf(),
        kubeconfig,
        server_url,
        config,
        options,
        crds,
        kubelet: kubelet.clone(),
        api_proxy,
        background: None,
    };
    let services = Services {
        control_plane,
        kubelet,
        provisioner,
        policy_engine,
        dir,
    };
    Ok((cluster, services))
}

impl Services {
    async fn stop(self) {
        if let Some(engine) = self.policy_engine {
            engine.stop().await;
        }
        self.kubelet.shutdown().await;
        self.provisioner.abort();
        self.control_plane.stop().await;
        drop(self.dir);
    }
}

/// A fresh directory `<tmp>/atelier-clusters/<pid>-…`, after removing those of test processes
/// that are gone (the shared cluster's directory outlives its process).
fn cluster_dir() -> anyhow::Result<tempfile::TempDir> {
    let base = std::env::temp_dir().join("atelier-clusters");
    std::fs::create_dir_all(&base)?;
    for entry in std::fs::read_dir(&base)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !child::process_exists(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(&base)?)
}

/// Copies the admin kubeconfig with every cluster's server replaced by `server_url`.
fn write_proxied_kubeconfig(source: &Path, target: &Path, server_url: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(source).with_context(|| format!("reading {}", source.display()))?;
    let mut kubeconfig: serde_yaml::Value = serde_yaml::from_str(&text)?;
    if let Some(clusters) = kubeconfig
        .get_mut("clusters")
        .and_then(|clusters| clusters.as_sequence_mut())
    {
        for cluster in clusters {
            if let Some(cluster) = cluster
                .get_mut("cluster")
                .and_then(|cluster| cluster.as_mapping_mut())
            {
                cluster.insert("server".into(), server_url.into());
            }
        }
    }
    std::fs::write(target, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(())
}
