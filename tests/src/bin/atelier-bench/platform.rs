//! The platform under test: a [`TestCluster`] whose inference "image" is `atelier-inference
//! serve --simulate`, the operator's controller as a process, tenants and jobs.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use atelier_crds::{GenerationJob, Tenant};
use atelier_tests::{ClusterOptions, NodeConfig, TestCluster, TestProcess, paths};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

use crate::procs;

/// Image of the inference and outputs pods: the simulated server, instant steps.
pub const FAST_IMAGE: &str = "bench.local/atelier-inference:bench";
/// Image whose inference steps take [`SLOW_STEP_DELAY`] each (the fault run).
pub const SLOW_IMAGE: &str = "bench.local/atelier-inference-slow:bench";
pub const SLOW_STEP_DELAY: &str = "100ms";
/// Users of every tenant are members of this group.
pub const USERS_GROUP: &str = "bench-users";
/// Parallel API calls when creating many objects.
const CREATE_PARALLELISM: usize = 16;

/// How a tenant runs.
#[derive(Clone, Debug)]
pub struct TenantShape {
    /// Inference replicas kept without demand (`minReplicas`; at least one at most).
    pub replicas: u32,
    pub concurrency: u32,
    pub image: Option<&'static str>,
}

pub struct Platform {
    pub cluster: TestCluster,
    pub client: kube::Client,
    pub work: PathBuf,
    model_dir: PathBuf,
    pub operator: Option<Operator>,
    outputs_dirs: std::sync::Mutex<BTreeMap<String, PathBuf>>,
}

/// The operator's controller, as a process.
pub struct Operator {
    process: TestProcess,
    pub pid: u32,
    pub log: PathBuf,
}

impl Operator {
    pub fn cpu_seconds(&self) -> f64 {
        procs::cpu_seconds(self.pid).unwrap_or(0.0)
    }

    pub fn peak_rss(&self) -> u64 {
        procs::peak_rss(self.pid).unwrap_or(0)
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// `$ATELIER_CACHE/bench/run-<pid>`, after removing those of runs that are gone. Not under
/// `/tmp`: inference pods mount an emptyDir there, which would hide the image wrappers and the
/// model directory.
pub fn default_work_dir() -> anyhow::Result<PathBuf> {
    let base = paths::cache_dir().join("bench");
    std::fs::create_dir_all(&base)?;
    for entry in std::fs::read_dir(&base)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix("run-")
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(base.join(format!("run-{}", std::process::id())))
}

/// The target directory the benchmark binary runs from (`target/debug`).
pub fn real_bin_dir() -> PathBuf {
    paths::default_bin_dir()
}

/// A directory of "images" for the kubelet: shell wrappers that start the real
/// `atelier-inference` in simulate mode (`ATELIER_SIMULATE`; `serve-outputs` ignores it).
pub fn image_dir(work: &Path) -> anyhow::Result<PathBuf> {
    let real = real_bin_dir().join("atelier-inference");
    if !real.is_file() {
        bail!("{} is missing: run `make build` first", real.display());
    }
    let dir = work.join("images");
    std::fs::create_dir_all(&dir)?;
    for (name, delay) in [
        ("atelier-inference", "0s"),
        ("atelier-inference-slow", SLOW_STEP_DELAY),
    ] {
        let script = format!(
            "#!/bin/sh\n# atelier-bench: the inference image in simulate mode.\nATELIER_SIMULATE=true ATELIER_SIMULATE_STEP_DELAY={delay} exec '{}' \"$@\"\n",
            real.display()
        );
        let path = dir.join(name);
        std::fs::write(&path, script)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(dir)
}

impl Platform {
    /// A cluster with one big node (room for hundreds of pods and GPUs), or none at all
    /// (`kubelet = false`: nothing runs, objects are only reconciled).
    pub async fn start(work: &Path, kubelet: bool) -> anyhow::Result<Self> {
        let images = image_dir(work)?;
        let nodes = if kubelet {
            vec![
                NodeConfig::new("bench-1")
                    .with_resource("cpu", "1000")
                    .with_resource("memory", "4Ti")
                    .with_resource("pods", "1000")
                    .with_resource("nvidia.com/gpu", "1000"),
            ]
        } else {
            Vec::new()
        };
        let cluster = TestCluster::start_with(ClusterOptions {
            nodes,
            bin_dir: images,
            network_policies: false,
        })
        .await?;
        let client = cluster.client().await;
        let model_dir = work.join("model");
        std::fs::create_dir_all(&model_dir)?;
        Ok(Self {
            cluster,
            client,
            work: work.to_path_buf(),
            model_dir,
            operator: None,
            outputs_dirs: Default::default(),
        })
    }

    /// (Re)starts the operator's controller: a fresh process, so its peak memory is its own.
    pub async fn start_operator(&mut self) -> anyhow::Result<()> {
        if let Some(mut old) = self.operator.take() {
            old.kill();
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = self.work.join(format!(
            "operator-{}.log",
            jiff::Timestamp::now().as_millisecond()
        ));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(real_bin_dir().join("atelier-operator"));
        command
            .arg("controller")
            .arg(format!("--inference-image={FAST_IMAGE}"))
            .arg("--inference-device=cpu")
            .arg("--platform-namespace=atelier-system")
            .arg(format!("--metrics-listen=127.0.0.1:{port}"))
            .env("KUBECONFIG", self.cluster.kubeconfig_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let (process, _) = TestProcess::spawn(command).context("starting atelier-operator")?;
        let metrics_url = format!("http://127.0.0.1:{port}/metrics");
        let pid = process.id();
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http
            .get(&metrics_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if Instant::now() > deadline {
                bail!(
                    "the operator did not serve metrics within 30 s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.operator = Some(Operator { process, pid, log });
        Ok(())
    }

    pub fn stop_operator(&mut self) {
        if let Some(mut operator) = self.operator.take() {
            operator.kill();
        }
    }

    pub fn operator(&self) -> &Operator {
        self.operator.as_ref().expect("the operator runs")
    }

    /// Creates model PersistentVolumes and tenants `names`, `CREATE_PARALLELISM` at a time.
    pub async fn create_tenants(
        &self,
        names: &[String],
        shape: &TenantShape,
    ) -> anyhow::Result<()> {
        let volumes = Api::<PersistentVolume>::all(self.client.clone());
        let tenants = Api::<Tenant>::all(self.client.clone());
        futures::stream::iter(names.iter().map(|name| {
            let volumes = volumes.clone();
            let tenants = tenants.clone();
            let shape = shape.clone();
            async move {
                let volume = format!("bench-model-{name}");
                let pv: PersistentVolume = serde_json::from_value(json!({
                    "metadata": { "name": volume },
                    "spec": {
                        "capacity": { "storage": "1Gi" },
                        "accessModes": ["ReadOnlyMany"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": "",
                        "hostPath": { "path": self.model_dir.to_string_lossy(), "type": "Directory" },
                    },
                }))?;
                create_or_keep(&volumes, &pv).await?;
                let tenant = tenant_manifest(name, &volume, &shape)?;
                create_or_keep(&tenants, &tenant).await?;
                anyhow::Ok(())
            }
        }))
        .buffer_unordered(CREATE_PARALLELISM)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(())
    }

    /// Deletes tenants and waits until they are gone (their namespaces with them).
    pub async fn delete_tenants(&self, names: &[String], timeout: Duration) -> anyhow::Result<()> {
        let tenants = Api::<Tenant>::all(self.client.clone());
        for name in names {
            match tenants.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(error) => return Err(error.into()),
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = tenants
                .list(&Default::default())
                .await?
                .items
                .iter()
                .filter(|t| names.iter().any(|n| Some(n) == t.metadata.name.as_ref()))
                .count();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{left} tenants still exist {timeout:?} after their deletion");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The tenant's output directory on this machine: the hostPath of its outputs PV.
    pub async fn outputs_dir(&self, namespace: &str) -> anyhow::Result<PathBuf> {
        if let Some(dir) = self
            .outputs_dirs
            .lock()
            .expect("not poisoned")
            .get(namespace)
        {
            return Ok(dir.clone());
        }
        let path =
            atelier_tests::provisioner::claim_dir(&self.client, namespace, "outputs").await?;
        self.outputs_dirs
            .lock()
            .expect("not poisoned")
            .insert(namespace.to_string(), path.clone());
        Ok(path)
    }

    /// The images of the jobs `uids` (with their `tracks`) on the volumes of `namespaces`,
    /// checked against the jobs: one per Succeeded job, none of the others.
    pub async fn check_files(
        &self,
        namespaces: &[String],
        uids: &[String],
        tracks: &[crate::jobs::JobTrack],
    ) -> anyhow::Result<crate::faults::FileCheck> {
        let jobs: std::collections::HashMap<String, crate::jobs::JobTrack> =
            uids.iter().cloned().zip(tracks.iter().cloned()).collect();
        let ours: std::collections::HashSet<String> = uids
            .iter()
            .map(|uid| crate::faults::job8_of_id(uid))
            .collect();
        let mut files = Vec::new();
        for namespace in namespaces {
            let dir = self.outputs_dir(namespace).await?;
            files.extend(
                crate::faults::png_files(&dir)
                    .into_iter()
                    .filter(|f| crate::faults::job8_of_file(f).is_some_and(|j| ours.contains(j))),
            );
        }
        Ok(crate::faults::check_files(&files, &jobs))
    }

    /// The API server's request counters (`apiserver_request_total`).
    pub async fn request_counts(&self) -> anyhow::Result<RequestCounts> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = self.client.request_text(request).await?;
        Ok(RequestCounts::parse(&text))
    }

    /// Copies the pods' logs (and the control plane's) into the working directory, which
    /// outlives the cluster's own directory.
    pub fn save_logs(&self) {
        let target = self.work.join("cluster-logs");
        let _ = std::fs::create_dir_all(&target);
        let logs = self.cluster.kubelet_root().join("logs");
        for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            let _ = std::fs::copy(entry.path(), target.join(entry.file_name()));
        }
        let _ = std::fs::copy(
            self.cluster.dir().join("testcluster.log"),
            target.join("testcluster.log"),
        );
    }

    /// The API server's version, for the report.
    pub async fn kubernetes_version(&self) -> String {
        self.client
            .apiserver_version()
            .await
            .map(|v| v.git_version)
            .unwrap_or_else(|_| "unknown".into())
    }
}

async fn create_or_keep<K>(api: &Api<K>, object: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// A tenant like examples/tenant.yaml, with a fixed replica count, a quota no benchmark reaches
/// and small CPU and memory requests (the pods are local processes).
pub fn tenant_manifest(
    name: &str,
    model_volume: &str,
    shape: &TenantShape,
) -> anyhow::Result<Tenant> {
    let mut inference = json!({
        "model": { "volumeName": model_volume, "precision": "bf16" },
        "cpu": "10m",
        "memory": "64Mi",
        "minReplicas": shape.replicas,
        "maxReplicas": shape.replicas.max(1),
        "concurrency": shape.concurrency,
        "idleOffloadAfter": "1h",
        "scaleDownAfter": "1h",
    });
    if let Some(image) = shape.image {
        inference["image"] = json!(image);
    }
    let spec = json!({
        "displayName": format!("Benchmark tenant {name}"),
        "members": [{ "group": USERS_GROUP, "role": "user" }],
        "gpus": { "resourceName": "nvidia.com/gpu", "perReplica": 1, "max": shape.replicas.max(1) },
        "inference": inference,
        "storage": { "size": "1Gi" },
        "quota": { "imagesPerUserPerDay": 100000, "maxQueuedPerUser": 10000 },
        "limits": { "maxSteps": 50, "maxWidth": 512, "maxHeight": 512, "maxRetries": 3 },
    });
    Ok(Tenant::new(name, serde_json::from_value(spec)?))
}

/// A job for `user`, 256×256, `steps` steps, in the shape the API creates.
pub fn job_manifest(user: &str, steps: u32, seed: u64) -> GenerationJob {
    let spec = json!({
        "prompt": "a lighthouse at dusk, benchmark",
        "user": user,
        "width": 256,
        "height": 256,
        "steps": steps,
        "seed": seed,
    });
    let mut job = GenerationJob::new("", serde_json::from_value(spec).expect("a valid job spec"));
    job.metadata.name = None;
    job.metadata.generate_name = Some("b-".into());
    job
}

/// What counts as a tenant being done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantDone {
    /// `Ready=True` (its outputs pod runs).
    Ready,
    /// Ready, and `minReplicas` inference pods ready too (jobs can be dispatched at once).
    Serving,
    /// Status written for the current generation with the namespace recorded: every object
    /// applied (used without a kubelet, where no pod ever runs).
    Reconciled,
}

impl TenantDone {
    pub fn holds(self, tenant: &Tenant) -> bool {
        let Some(status) = &tenant.status else {
            return false;
        };
        match self {
            TenantDone::Ready => atelier_crds::conditions::is_true(&status.conditions, "Ready"),
            TenantDone::Serving => {
                atelier_crds::conditions::is_true(&status.conditions, "Ready")
                    && status.ready_replicas >= tenant.spec.inference.min_replicas
            }
            TenantDone::Reconciled => {
                status.namespace.is_some()
                    && status.observed_generation.is_some()
                    && status.observed_generation == tenant.metadata.generation
            }
        }
    }
}

/// Watches tenants and notes when each first satisfied a [`TenantDone`].
pub struct TenantWatch {
    store: Store<Tenant>,
    task: tokio::task::JoinHandle<()>,
}

impl TenantWatch {
    pub async fn start(client: &kube::Client) -> anyhow::Result<Self> {
        let (store, writer) = reflector::store::<Tenant>();
        let stream = reflector::reflector(
            writer,
            watcher(
                Api::<Tenant>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {});
        let task = tokio::spawn(stream);
        store.wait_until_ready().await?;
        Ok(Self { store, task })
    }

    /// Waits until every tenant of `names` holds `done`; returns when each first did, measured
    /// from `since` (polled every 100 ms).
    pub async fn wait(
        &self,
        names: &[String],
        done: TenantDone,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Duration>> {
        let reached = self.wait_partial(names, done, since, timeout).await;
        if reached.len() < names.len() {
            bail!(
                "{} of {} tenants {done:?} after {timeout:?}",
                reached.len(),
                names.len()
            );
        }
        Ok(reached)
    }

    /// Like [`TenantWatch::wait`], but returns the times of those that got there by `timeout`.
    pub async fn wait_partial(
        &self,
        names: &[String],
        done: TenantDone,
        since: Instant,
        timeout: Duration,
    ) -> Vec<Duration> {
        let mut reached: BTreeMap<&str, Duration> = BTreeMap::new();
        let deadline = Instant::now() + timeout;
        loop {
            let state: BTreeMap<String, Arc<Tenant>> = self
                .store
                .state()
                .into_iter()
                .filter_map(|t| Some((t.metadata.name.clone()?, t)))
                .collect();
            for name in names {
                if !reached.contains_key(name.as_str())
                    && state.get(name).is_some_and(|t| done.holds(t))
                {
                    reached.insert(name, since.elapsed());
                }
            }
            if reached.len() == names.len() || Instant::now() > deadline {
                return reached.into_values().collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TenantWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `apiserver_request_total` by (verb, resource, subresource).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestCounts(pub BTreeMap<(String, String, String), f64>);

/// Verbs that write.
pub const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

impl RequestCounts {
    pub fn parse(text: &str) -> Self {
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let labels = parse_labels(labels);
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            *counts
                .entry((get("verb"), get("resource"), get("subresource")))
                .or_default() += value;
            // Conflicts (optimistic concurrency lost) once more on their own, e.g. "PUT 409".
            if get("code") == "409" {
                *counts
                    .entry((
                        format!("{} 409", get("verb")),
                        get("resource"),
                        get("subresource"),
                    ))
                    .or_default() += value;
            }
        }
        Self(counts)
    }

    /// `self − before`, keeping positive differences.
    pub fn since(&self, before: &RequestCounts) -> RequestCounts {
        let mut out = BTreeMap::new();
        for (key, value) in &self.0 {
            let delta = value - before.0.get(key).copied().unwrap_or(0.0);
            if delta > 0.0 {
                out.insert(key.clone(), delta);
            }
        }
        RequestCounts(out)
    }

    /// Sum over entries matching `verbs` and (if given) `resource`.
    pub fn sum(&self, verbs: &[&str], resource: Option<&str>) -> f64 {
        self.0
            .iter()
            .filter(|((verb, res, _), _)| {
                verbs.contains(&verb.as_str()) && resource.is_none_or(|r| r == res)
            })
            .map(|(_, v)| v)
            .sum::<f64>()
            + 0.0 // an empty float sum is -0.0
    }

    /// As JSON: `{"VERB resource[/subresource]": count}`.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|((verb, resource, sub), value)| {
                    let key = if sub.is_empty() {
                        format!("{verb} {resource}")
                    } else {
                        format!("{verb} {resource}/{sub}")
                    };
                    (key, json!(value))
                })
                .collect(),
        )
    }
}

/// `a="x",b="y"` → map (values may contain escaped quotes and commas).
pub fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counters_by_verb_and_resource() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="atelier.dev",resource="generationjobs",scope="resource",subresource="",verb="POST",version="v1alpha1"} 10
apiserver_request_total{code="200",component="apiserver",dry_run="",group="atelier.dev",resource="generationjobs",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 30
apiserver_request_total{code="409",component="apiserver",dry_run="",group="atelier.dev",resource="generationjobs",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="LIST",version="v1"} 5
"#;
        let before = RequestCounts::parse(text);
        let after = RequestCounts::parse(&text.replace("} 30", "} 45"));
        let delta = after.since(&before);
        assert_eq!(delta.sum(&WRITE_VERBS, Some("generationjobs")), 15.0);
        assert_eq!(before.sum(&WRITE_VERBS, Some("generationjobs")), 42.0);
        assert_eq!(before.sum(&["LIST"], None), 5.0);
        assert_eq!(before.to_json()["PATCH generationjobs/status"], json!(32.0));
    }

    #[test]
    fn label_values_may_hold_commas_and_escaped_quotes() {
        let labels = parse_labels(r#"a="x,y",b="say \"hi\"",c="""#);
        assert_eq!(labels["a"], "x,y");
        assert_eq!(labels["b"], "say \"hi\"");
        assert_eq!(labels["c"], "");
    }

    #[test]
    fn tenants_are_done_when_their_status_says_so() {
        let shape = TenantShape {
            replicas: 1,
            concurrency: 2,
            image: None,
        };
        let mut tenant = tenant_manifest("t", "v", &shape).unwrap();
        tenant.metadata.generation = Some(1);
        assert!(!TenantDone::Reconciled.holds(&tenant));
        tenant.status = Some(atelier_crds::TenantStatus {
            namespace: Some("atelier-t".into()),
            observed_generation: Some(1),
            ..Default::default()
        });
        assert!(TenantDone::Reconciled.holds(&tenant));
        assert!(!TenantDone::Ready.holds(&tenant));
    }
}
