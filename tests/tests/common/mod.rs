//! Shared by the operator's end-to-end tests: run the operator as a process, give tenants the
//! tiny model, and build tenant manifests.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod client;
pub mod platform;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use atelier_crds::{GenerationJob, Tenant};
use atelier_tests::{TestCluster, TestProcess, paths, unique_name, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    LimitRange, Namespace, PersistentVolume, PersistentVolumeClaim, ResourceQuota, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

pub const INFERENCE_IMAGE: &str = "ghcr.io/atelier-dev/atelier-inference:test";

/// The operator's controller, run as a local process with the admin kubeconfig.
pub struct Operator {
    process: TestProcess,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(cluster: &TestCluster, extra_args: &[&str]) -> anyhow::Result<Self> {
        let log = cluster
            .dir()
            .join(format!("{}.log", unique_name("operator")));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(cluster.bin_dir().join("atelier-operator"));
        command
            .arg("controller")
            .arg(format!("--inference-image={INFERENCE_IMAGE}"))
            .arg("--inference-device=cpu")
            .arg("--platform-namespace=atelier-system")
            .arg("--metrics-listen=127.0.0.1:0")
            .args(extra_args)
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env("RUST_LOG", "info,atelier_operator=debug")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let (process, _) =
            TestProcess::spawn(command).context("starting atelier-operator (build it first)")?;
        Ok(Self { process, log })
    }

    /// Kills the operator at once, as a crash or a lost node would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The operator's Prometheus metrics, as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let address = wait_for(
            "the operator's metrics address",
            Duration::from_secs(30),
            || async {
                Ok(self.logs().lines().find_map(|line| {
                    let entry: Value = serde_json::from_str(line).ok()?;
                    (entry["message"] == "serving metrics")
                        .then(|| entry["address"].as_str().map(String::from))?
                }))
            },
        )
        .await?;
        Ok(reqwest::get(format!("http://{address}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?)
    }
}

/// A tiny random-weight Flux model directory, made once per test binary.
pub async fn tiny_model(cluster: &TestCluster) -> &'static Path {
    static MODEL: OnceCell<PathBuf> = OnceCell::const_new();
    MODEL
        .get_or_init(|| async {
            let dir = std::env::temp_dir().join(unique_name("atelier-tiny-model"));
            let status = Command::new(cluster.bin_dir().join("atelier-inference"))
                .args(["make-tiny-model", "--out"])
                .arg(&dir)
                .status()
                .expect("running atelier-inference make-tiny-model");
            assert!(status.success(), "make-tiny-model failed");
            dir
        })
        .await
}

/// A PersistentVolume holding the tiny model, for one tenant's `inference.model.volumeName`.
pub async fn model_volume(cluster: &TestCluster) -> anyhow::Result<String> {
    let dir = tiny_model(cluster).await;
    let name = unique_name("model");
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": { "path": dir.to_string_lossy(), "type": "Directory" },
        },
    }))?;
    Api::<PersistentVolume>::all(cluster.client().await)
        .create(&PostParams::default(), &volume)
        .await?;
    Ok(name)
}

/// A tenant spec in the shape of examples/tenant.yaml, merged with `overrides`.
pub fn tenant_manifest(name: &str, model_volume: &str, overrides: Value) -> Tenant {
    let mut spec = json!({
        "displayName": "Test team",
        "members": [
            { "group": "team-users", "role": "user" },
            { "group": "team-admins", "role": "admin" },
        ],
        "gpus": { "resourceName": "nvidia.com/gpu", "perReplica": 1, "max": 2 },
        "inference": {
            "model": { "volumeName": model_volume, "precision": "bf16" },
            "cpu": "500m",
            "memory": "1Gi",
            "idleOffloadAfter": "1m",
            "scaleDownAfter": "10m",
        },
        "storage": { "size": "1Gi" },
        "quota": { "imagesPerUserPerDay": 50 },
        "limits": { "maxSteps": 50, "maxWidth": 512, "maxHeight": 512 },
    });
    merge(&mut spec, overrides);
    Tenant::new(
        name,
        serde_json::from_value(spec).expect("a valid tenant spec"),
    )
}

pub fn merge(base: &mut Value, overrides: Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (key, value) in overrides {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, value) => *base = value,
    }
}

/// Creates a tenant and waits until its namespace exists, so that jobs can be created in it.
pub async fn create_tenant(cluster: &TestCluster, overrides: Value) -> anyhow::Result<Tenant> {
    let client = cluster.client().await;
    let volume = model_volume(cluster).await?;
    let tenant = tenant_manifest(&unique_name("tn"), &volume, overrides);
    let created = Api::<Tenant>::all(client.clone())
        .create(&PostParams::default(), &tenant)
        .await?;
    let namespaces = Api::<Namespace>::all(client);
    let namespace = created.namespace_name();
    wait_for(
        &format!("namespace {namespace}"),
        Duration::from_secs(60),
        || async { Ok(namespaces.get_opt(&namespace).await?.map(drop)) },
    )
    .await?;
    Ok(created)
}

/// The token the tenant's inference and outputs pods require (`Authorization: Bearer`).
pub async fn pod_token(cluster: &TestCluster, namespace: &str) -> anyhow::Result<String> {
    let secret = Api::<Secret>::namespaced(cluster.client().await, namespace)
        .get(atelier_crds::names::API_TOKEN_SECRET)
        .await?;
    let data = secret.data.unwrap_or_default();
    let token = data
        .get(atelier_crds::names::API_TOKEN_KEY)
        .context("the token Secret has no token")?;
    Ok(String::from_utf8(token.0.clone())?)
}

/// Deletes the tenant at the end of a test, so that its inference pods give their GPUs back to
/// the other tests on the shared node.
pub async fn delete_tenant(cluster: &TestCluster, tenant: &Tenant) {
    Api::<Tenant>::all(cluster.client().await)
        .delete(&tenant.name_any(), &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|error| panic!("deleting tenant {}: {error}", tenant.name_any()));
}

/// Creates a tenant that keeps an inference pod up (`inference.minReplicas: 1` unless
/// `overrides` says otherwise) and waits until it is Ready.
pub async fn create_ready_tenant(
    cluster: &TestCluster,
    overrides: Value,
) -> anyhow::Result<Tenant> {
    let mut spec = json!({ "inference": { "minReplicas": 1 } });
    merge(&mut spec, overrides);
    let tenant = create_tenant(cluster, spec).await?;
    wait_tenant_ready(cluster, &tenant.name_any(), Duration::from_secs(180)).await?;
    Ok(tenant)
}

/// Waits until the tenant's status says Ready.
pub async fn wait_tenant_ready(
    cluster: &TestCluster,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Tenant> {
    let tenants = Api::<Tenant>::all(cluster.client().await);
    wait_for(&format!("tenant {name} Ready"), timeout, || async {
        let tenant = tenants.get(name).await?;
        let ready = tenant
            .status
            .as_ref()
            .is_some_and(|s| atelier_crds::conditions::is_true(&s.conditions, "Ready"));
        Ok(ready.then_some(tenant))
    })
    .await
}

/// A job in the tenant's namespace for `user`, small enough for the tiny model.
pub fn job_manifest(user: &str, overrides: Value) -> GenerationJob {
    let mut spec = json!({ "prompt": "a red fox in the snow", "user": user, "width": 256, "height": 256, "steps": 4, "seed": 7 });
    merge(&mut spec, overrides);
    let mut job = GenerationJob::new("", serde_json::from_value(spec).expect("a valid job spec"));
    job.metadata.name = None;
    job.metadata.generate_name = Some("gen-".into());
    job
}

pub async fn create_job(
    cluster: &TestCluster,
    namespace: &str,
    user: &str,
    overrides: Value,
) -> anyhow::Result<GenerationJob> {
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, namespace);
    Ok(jobs
        .create(&PostParams::default(), &job_manifest(user, overrides))
        .await?)
}

/// Waits until the job reaches a finished phase and returns it.
pub async fn wait_job_finished(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<GenerationJob> {
    wait_job(cluster, namespace, name, timeout, |job| {
        job.phase().is_finished()
    })
    .await
}

pub async fn wait_job(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
    timeout: Duration,
    done: impl Fn(&GenerationJob) -> bool,
) -> anyhow::Result<GenerationJob> {
    let jobs = Api::<GenerationJob>::namespaced(cluster.client().await, namespace);
    wait_for(&format!("job {namespace}/{name}"), timeout, || async {
        let job = jobs.get(name).await?;
        Ok(done(&job).then_some(job))
    })
    .await
}

/// Waits until the job's generation has made its first denoising step.
pub async fn wait_job_generating(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<GenerationJob> {
    wait_job(cluster, namespace, name, timeout, |job| {
        job.status
            .as_ref()
            .and_then(|s| s.progress)
            .is_some_and(|p| p.step >= 1)
    })
    .await
}

/// Applies the chart's template `name` (e.g. `templates/tenant-clusterroles.yaml`) as rendered
/// with default values, so tests use exactly what the chart ships.
pub fn apply_chart_template(cluster: &TestCluster, template: &str) -> anyhow::Result<()> {
    let chart = paths::workspace_root().join("charts/atelier");
    let rendered = Command::new(paths::tool("helm"))
        .args([
            "template",
            "atelier",
            "--namespace",
            "atelier-system",
            "--show-only",
            template,
        ])
        .arg("--values")
        .arg(chart.join("ci/default-values.yaml"))
        .arg(&chart)
        .output()?;
    anyhow::ensure!(
        rendered.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let mut apply = Command::new(paths::tool("kubectl"))
        .args(["apply", "--server-side", "-f", "-", "--kubeconfig"])
        .arg(cluster.kubeconfig_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    apply
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&rendered.stdout)?;
    let output = apply.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The value of the sample `name{labels}` in Prometheus text, where `labels` lists some of the
/// sample's labels (`tenant="x"`), in the order the operator writes them.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name && labels.iter().all(|label| rest.contains(label))
        })
        .and_then(|(_, value)| value.parse().ok())
}

/// Every object the tenant controller applies in `ns`, as `Kind/name` → the version that changes
/// when something writes it (the spec generation for a ResourceQuota, whose status the quota
/// controller keeps rewriting; the resourceVersion otherwise).
pub async fn tenant_objects(
    client: &kube::Client,
    ns: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut objects = BTreeMap::new();
    collect::<Deployment>(client, ns, &mut objects, resource_version).await?;
    collect::<Service>(client, ns, &mut objects, resource_version).await?;
    collect::<NetworkPolicy>(client, ns, &mut objects, resource_version).await?;
    collect::<RoleBinding>(client, ns, &mut objects, resource_version).await?;
    collect::<LimitRange>(client, ns, &mut objects, resource_version).await?;
    collect::<PersistentVolumeClaim>(client, ns, &mut objects, resource_version).await?;
    collect::<Secret>(client, ns, &mut objects, resource_version).await?;
    collect::<ResourceQuota>(client, ns, &mut objects, |meta| {
        format!("generation {:?}", meta.generation)
    })
    .await?;
    Ok(objects)
}

fn resource_version(meta: &ObjectMeta) -> String {
    meta.resource_version.clone().unwrap_or_default()
}

async fn collect<K>(
    client: &kube::Client,
    ns: &str,
    into: &mut BTreeMap<String, String>,
    version: impl Fn(&ObjectMeta) -> String,
) -> anyhow::Result<()>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    for object in Api::<K>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        let meta = object.meta();
        into.insert(
            format!("{}/{}", K::kind(&()), meta.name.clone().unwrap_or_default()),
            version(meta),
        );
    }
    Ok(())
}

/// The PNG files in `user`'s folder of the tenant's volume (none when the folder does not exist).
pub async fn user_pngs(
    cluster: &TestCluster,
    namespace: &str,
    user: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let dir = outputs_dir(cluster, namespace).await?.join(user);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    Ok(entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|path| path.extension().is_some_and(|x| x == "png"))
        .collect())
}

/// The tenant's output directory on the local node: the hostPath of its outputs PV.
pub async fn outputs_dir(cluster: &TestCluster, namespace: &str) -> anyhow::Result<PathBuf> {
    atelier_tests::provisioner::claim_dir(&cluster.client().await, namespace, "outputs").await
}
