//! `Tenant`: one team's isolated GPU space (cluster-scoped).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A team: who belongs to it, how many GPUs it may use, how its inference pods run, where its
/// images are stored and how many it may generate per day.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "atelier.dev",
    version = "v1alpha1",
    kind = "Tenant",
    shortname = "tn",
    status = "TenantStatus",
    derive = "PartialEq",
    printcolumn(name = "Namespace", type_ = "string", json_path = ".status.namespace"),
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpus.max"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[kube(validation = Rule::new("size(self.metadata.name) <= 53").message("tenant names are at most 53 characters, so that the namespace atelier-<name> is a valid name"))]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Human-readable name shown in the web page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// OIDC groups and users that belong to the tenant, with their role.
    #[serde(default)]
    pub members: Vec<Member>,
    #[serde(default)]
    pub gpus: GpuSpec,
    #[serde(default)]
    pub inference: InferenceSpec,
    #[serde(default)]
    pub storage: StorageSpec,
    #[serde(default)]
    pub quota: QuotaSpec,
    #[serde(default)]
    pub limits: JobLimits,
    /// Client networks (CIDR) allowed to use the tenant through the API; empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_source_cidrs: Vec<String>,
}

/// One OIDC group or one user, mapped to a role in the tenant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.group) != has(self.user)").message("a member names exactly one of group or user"))]
pub struct Member {
    /// An OIDC group (value of the groups claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// An OIDC user id (value of the user id claim, e.g. the email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), pattern(crate::names::USER_NAME_PATTERN))]
    pub user: Option<String>,
    pub role: Role,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Generates images and sees only their own.
    User,
    /// Sees the tenant's queue, usage and every image; cancels jobs; resets quotas.
    Admin,
}

/// GPUs the tenant may use, in the node's extended resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.perReplica <= self.max").message("gpus.perReplica must not exceed gpus.max"))]
pub struct GpuSpec {
    /// Extended resource name, e.g. `nvidia.com/gpu` or a MIG profile `nvidia.com/mig-1g.18gb`.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(min = 1, max = 253))]
    pub resource_name: String,
    /// GPUs each inference replica asks for.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 16))]
    pub per_replica: u32,
    /// GPUs the whole tenant may hold at once (enforced by a ResourceQuota).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub max: u32,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            resource_name: default_gpu_resource(),
            per_replica: 1,
            max: 1,
        }
    }
}

/// How the tenant's inference pods run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas").message("inference.minReplicas must not exceed inference.maxReplicas"))]
pub struct InferenceSpec {
    /// Inference image; the operator's default image when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub model: ModelSource,
    /// Replicas kept even without demand (0 allows scale to zero).
    #[serde(default)]
    #[schemars(range(max = 64))]
    pub min_replicas: u32,
    /// Upper bound of replicas; defaults to gpus.max / gpus.perReplica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: Option<u32>,
    /// Jobs one replica runs at once.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 16))]
    pub concurrency: u32,
    /// Idle time after which the model moves from GPU to host memory.
    #[serde(default = "default_idle_offload")]
    pub idle_offload_after: Duration,
    /// Idle time after which the inference Deployment scales to `minReplicas`.
    #[serde(default = "default_scale_to_zero")]
    pub scale_down_after: Duration,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// CPU request and limit of one inference container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit of one inference container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

impl Default for InferenceSpec {
    fn default() -> Self {
        Self {
            image: None,
            model: ModelSource::default(),
            min_replicas: 0,
            max_replicas: None,
            concurrency: 1,
            idle_offload_after: default_idle_offload(),
            scale_down_after: default_scale_to_zero(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            cpu: None,
            memory: None,
        }
    }
}

/// Where the model weights come from, mounted read-only at `/models`. Tenant namespaces enforce
/// the `restricted` Pod Security level, which forbids hostPath volumes, so weights always come
/// through a PersistentVolume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.claimName) && has(self.volumeName))").message("model names at most one of claimName or volumeName"))]
pub struct ModelSource {
    /// An existing PersistentVolumeClaim in the tenant namespace holding the model directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// A PersistentVolume prepared by the platform admin; the operator claims it (read-only)
    /// for the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// Model directory inside the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
    #[serde(default)]
    pub precision: Precision,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Precision {
    Bf16,
    /// Transformer weights kept in float8 e4m3: half the weight memory of bf16.
    #[default]
    Fp8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
        }
    }
}

/// The tenant's output volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    #[serde(default = "default_storage_size")]
    pub size: Quantity,
    /// Storage class; the cluster default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    #[serde(default)]
    pub access_mode: AccessMode,
    /// Keep the output volume (and so every image) when the tenant is deleted.
    #[serde(default = "yes")]
    pub retain_on_delete: bool,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            access_mode: AccessMode::default(),
            retain_on_delete: true,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AccessMode {
    /// Inference pods then need to share the node of the outputs server (pod affinity).
    #[default]
    ReadWriteOnce,
    ReadWriteMany,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteMany => "ReadWriteMany",
        }
    }
}

/// Daily image quotas, reserved when a job is admitted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSpec {
    #[serde(default = "default_images_per_user")]
    #[schemars(range(min = 0, max = 100000))]
    pub images_per_user_per_day: u32,
    /// No tenant-wide limit when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000000))]
    pub images_per_tenant_per_day: Option<u32>,
    /// Jobs one user may have waiting at once.
    #[serde(default = "default_max_queued")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_queued_per_user: u32,
    /// IANA time zone of the day boundary, e.g. `Europe/Paris`.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// GenerationJob objects the tenant namespace may hold, finished ones included. Not
    /// enforced yet (see docs/operations.md).
    #[serde(default = "default_max_jobs")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_jobs: u32,
}

impl Default for QuotaSpec {
    fn default() -> Self {
        Self {
            images_per_user_per_day: default_images_per_user(),
            images_per_tenant_per_day: None,
            max_queued_per_user: default_max_queued(),
            time_zone: default_time_zone(),
            max_jobs: default_max_jobs(),
        }
    }
}

/// Bounds on job parameters, checked at admission.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobLimits {
    #[serde(default = "default_max_steps")]
    #[schemars(range(min = 1, max = 100))]
    pub max_steps: u32,
    #[serde(default = "default_max_side")]
    #[schemars(range(min = 256, max = 2048))]
    pub max_width: u32,
    #[serde(default = "default_max_side")]
    #[schemars(range(min = 256, max = 2048))]
    pub max_height: u32,
    #[serde(default = "default_max_images")]
    #[schemars(range(min = 1, max = 4))]
    pub max_images: u32,
    /// Timeout of a job that sets none.
    #[serde(default = "default_job_timeout")]
    pub default_timeout: Duration,
    /// Attempts after a lost inference pod before the job fails.
    #[serde(default = "default_max_retries")]
    #[schemars(range(max = 10))]
    pub max_retries: u32,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_steps: default_max_steps(),
            max_width: default_max_side(),
            max_height: default_max_side(),
            max_images: default_max_images(),
            default_timeout: default_job_timeout(),
            max_retries: default_max_retries(),
        }
    }
}

/// Observed state of a tenant, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TenantPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub ready_replicas: u32,
    #[serde(default)]
    pub gpus_in_use: u32,
    #[serde(default)]
    pub queued: u32,
    #[serde(default)]
    pub running: u32,
    /// Last time a job was queued or running; scale-down counts idle time from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_time: Option<Time>,
    /// The day (in the quota time zone) that `usage` counts, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_day: Option<String>,
    /// Images reserved per user on `usageDay`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<UserUsage>,
    /// The jobs whose images `usage` counts, by job uid: a job reserves once however often its
    /// admission is retried, and gives its images back once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<Reservation>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TenantPhase {
    Pending,
    Ready,
    Degraded,
    Terminating,
}

/// One user's reserved images today.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserUsage {
    pub user: String,
    pub images: u32,
}

/// One job's images counted in `usage`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// The GenerationJob's uid.
    pub job: String,
    pub user: String,
    pub images: u32,
}

impl Tenant {
    /// The namespace that holds the tenant's jobs, pods and volume.
    pub fn namespace_name(&self) -> String {
        namespace_for(self.metadata.name.as_deref().unwrap_or_default())
    }

    /// Replicas the tenant may run: `maxReplicas`, bounded by the GPU budget.
    pub fn replica_ceiling(&self) -> u32 {
        let by_gpus = self.spec.gpus.max / self.spec.gpus.per_replica.max(1);
        self.spec
            .inference
            .max_replicas
            .map_or(by_gpus, |max| max.min(by_gpus))
    }
}

/// `atelier-<tenant>`: the namespace of a tenant.
pub fn namespace_for(tenant: &str) -> String {
    format!("atelier-{tenant}")
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}
fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_idle_offload() -> Duration {
    "5m".parse().expect("valid duration")
}
fn default_scale_to_zero() -> Duration {
    "15m".parse().expect("valid duration")
}
fn default_storage_size() -> Quantity {
    Quantity("50Gi".into())
}
fn default_images_per_user() -> u32 {
    50
}
fn default_max_queued() -> u32 {
    10
}
fn default_max_jobs() -> u32 {
    5000
}
fn default_time_zone() -> String {
    "UTC".into()
}
fn default_max_steps() -> u32 {
    50
}
fn default_max_side() -> u32 {
    2048
}
fn default_max_images() -> u32 {
    4
}
fn default_job_timeout() -> Duration {
    "10m".parse().expect("valid duration")
}
fn default_max_retries() -> u32 {
    2
}
