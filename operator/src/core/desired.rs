//! Every object a Tenant owns, computed from its spec alone. The tenant controller applies these
//! with server-side apply; nothing here talks to the cluster.

use std::collections::BTreeMap;

use atelier_crds::names::{
    self, API_TOKEN_KEY, API_TOKEN_SECRET, HTTP_PORT, HTTP_PORT_NAME, INFERENCE, LABEL_COMPONENT,
    LABEL_MANAGED_BY, LABEL_NAME, LABEL_PART_OF, LABEL_TENANT, OUTPUTS, OUTPUTS_CLAIM,
    WORKLOAD_SERVICE_ACCOUNT,
};
use atelier_crds::{AccessMode, Role, Tenant};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    LimitRange, Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use super::quantity;

/// Operator-wide settings that shape tenant objects.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image of inference and outputs pods when the tenant names none.
    pub default_inference_image: String,
    /// Where inference pods compute (their `--device`).
    pub inference_device: InferenceDevice,
    /// Namespace of the operator and API: the only source of traffic to tenant pods.
    pub platform_namespace: String,
    /// ClusterRoles (shipped by the chart) bound to the tenant's OIDC groups and users.
    pub admin_cluster_role: String,
    pub member_cluster_role: String,
    /// Prefix the API server adds to OIDC users and groups (`--oidc-username-prefix`), so that
    /// RoleBindings name the identities `kubectl` users really have.
    pub kubectl_identity_prefix: String,
}

/// The device inference pods compute on. Their GPUs are requested either way: `cpu` is for
/// clusters whose nodes advertise GPUs that the binary does not use (the local test cluster and
/// `make demo`, whose kubelet runs the CPU build).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InferenceDevice {
    Cuda,
    Cpu,
}

impl InferenceDevice {
    fn as_arg(self) -> &'static str {
        match self {
            InferenceDevice::Cuda => "cuda",
            InferenceDevice::Cpu => "cpu",
        }
    }
}

/// CPU and memory of the outputs server: it only lists and streams files.
const OUTPUTS_CPU: &str = "100m";
const OUTPUTS_MEMORY: &str = "128Mi";
const DEFAULT_INFERENCE_CPU: &str = "2";
const DEFAULT_INFERENCE_MEMORY: &str = "8Gi";
/// Where the tenant's pods find their API token.
const API_TOKEN_DIR: &str = "/var/run/atelier/api-token";
const API_TOKEN_FILE: &str = "/var/run/atelier/api-token/token";

/// The Secret with the tenant's API token; created once (the token is random, so it is not
/// applied with the other objects, which would replace it on every reconcile).
pub fn api_token_secret(tenant: &Tenant, owner: &OwnerReference, token: &str) -> Secret {
    let mut labels = base_labels(tenant.metadata.name.as_deref().unwrap_or_default());
    labels.insert(LABEL_NAME.into(), API_TOKEN_SECRET.into());
    typed(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": API_TOKEN_SECRET,
            "namespace": tenant.namespace_name(),
            "labels": labels,
            "ownerReferences": [owner],
        },
        "type": "Opaque",
        "stringData": { API_TOKEN_KEY: token },
    }))
}

/// Name of the PVC the operator creates when the model comes from a named PersistentVolume.
pub const MODEL_CLAIM: &str = "model";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("gpus.perReplica ({per_replica}) exceeds gpus.max ({max})")]
    GpuBudget { per_replica: u32, max: u32 },
    #[error("inference.model names no volume: set claimName or volumeName")]
    NoModelVolume,
    #[error("{field} {value:?} is not a Kubernetes quantity (such as 500m, 2, 8Gi)")]
    Quantity { field: &'static str, value: String },
}

/// The objects of one tenant, in the order they are applied.
pub struct TenantObjects {
    pub namespace: Namespace,
    pub resource_quota: ResourceQuota,
    pub limit_range: LimitRange,
    pub network_policies: Vec<NetworkPolicy>,
    pub service_account: ServiceAccount,
    pub role_bindings: Vec<RoleBinding>,
    pub claims: Vec<PersistentVolumeClaim>,
    pub services: Vec<Service>,
    pub outputs_deployment: Deployment,
    pub inference_deployment: Deployment,
}

/// Computes the tenant's objects with `inference_replicas` inference pods.
pub fn tenant_objects(
    tenant: &Tenant,
    owner: &OwnerReference,
    settings: &Settings,
    inference_replicas: u32,
) -> Result<TenantObjects, SpecError> {
    let spec = &tenant.spec;
    if spec.gpus.per_replica > spec.gpus.max {
        return Err(SpecError::GpuBudget {
            per_replica: spec.gpus.per_replica,
            max: spec.gpus.max,
        });
    }
    let model = &spec.inference.model;
    let model_claim = match (&model.claim_name, &model.volume_name) {
        (Some(claim), _) => claim.clone(),
        (None, Some(_)) => MODEL_CLAIM.to_string(),
        (None, None) => return Err(SpecError::NoModelVolume),
    };
    let name = tenant.metadata.name.clone().unwrap_or_default();
    let ns = tenant.namespace_name();
    let meta = |object_name: &str, component: Option<&str>| {
        let mut labels = base_labels(&name);
        if let Some(component) = component {
            labels.insert(LABEL_COMPONENT.into(), component.into());
        }
        json!({
            "name": object_name,
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [owner],
        })
    };

    let mut namespace_labels = base_labels(&name);
    namespace_labels.insert(
        "pod-security.kubernetes.io/enforce".into(),
        "restricted".into(),
    );
    namespace_labels.insert(
        "pod-security.kubernetes.io/enforce-version".into(),
        "latest".into(),
    );
    let namespace = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": ns, "labels": namespace_labels, "ownerReferences": [owner] },
    });

    let gpu = &spec.gpus.resource_name;
    let ceiling = tenant.replica_ceiling();
    let inference_cpu = quantity_or(&spec.inference.cpu, DEFAULT_INFERENCE_CPU);
    let inference_memory = quantity_or(&spec.inference.memory, DEFAULT_INFERENCE_MEMORY);
    let quota_cpu = scaled("inference.cpu", &inference_cpu, ceiling, OUTPUTS_CPU)?;
    let quota_memory = scaled(
        "inference.memory",
        &inference_memory,
        ceiling,
        OUTPUTS_MEMORY,
    )?;
    let resource_quota = json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": meta("atelier-quota", None),
        "spec": { "hard": {
            format!("requests.{gpu}"): spec.gpus.max.to_string(),
            "requests.cpu": quota_cpu,
            "limits.cpu": quota_cpu,
            "requests.memory": quota_memory,
            "limits.memory": quota_memory,
            // Outputs and model claims, and room for an admin-made model claim beside them.
            "persistentvolumeclaims": "4",
            "pods": (ceiling + 1 + ceiling).to_string(),
        }},
    });

    let limit_range = json!({
        "apiVersion": "v1", "kind": "LimitRange",
        "metadata": meta("atelier-defaults", None),
        "spec": { "limits": [{
            "type": "Container",
            "defaultRequest": { "cpu": "100m", "memory": "128Mi" },
            "default": { "cpu": "500m", "memory": "512Mi" },
        }]},
    });

    let network_policies = vec![
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta("default-deny-ingress", None),
            "spec": { "podSelector": {}, "policyTypes": ["Ingress"] },
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta("allow-from-platform", None),
            "spec": {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{ "namespaceSelector": { "matchLabels": {
                        "kubernetes.io/metadata.name": settings.platform_namespace,
                    }}}],
                    "ports": [{ "protocol": "TCP", "port": HTTP_PORT }],
                }],
            },
        }),
    ];

    let service_account = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": meta(WORKLOAD_SERVICE_ACCOUNT, None),
        "automountServiceAccountToken": false,
    });

    // Both bindings always exist, without subjects when the role has no members: applying one
    // without subjects takes away the access its last member had.
    let role_bindings = [(Role::Admin, &settings.admin_cluster_role, "atelier-admins"), (Role::User, &settings.member_cluster_role, "atelier-members")]
        .into_iter()
        .map(|(role, cluster_role, binding)| {
            let subjects: Vec<Value> = spec
                .members
                .iter()
                .filter(|m| m.role == role)
                .filter_map(|m| match (&m.group, &m.user) {
                    (Some(group), _) => Some(json!({ "kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": format!("{}{group}", settings.kubectl_identity_prefix) })),
                    (None, Some(user)) => Some(json!({ "kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": format!("{}{user}", settings.kubectl_identity_prefix) })),
                    (None, None) => None,
                })
                .collect();
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": meta(binding, None),
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role },
                "subjects": subjects,
            })
        })
        .collect::<Vec<_>>();

    let storage = &spec.storage;
    let mut outputs_claim_spec = json!({
        "accessModes": [storage.access_mode.as_str()],
        "resources": { "requests": { "storage": storage.size } },
    });
    if let Some(class) = &storage.storage_class_name {
        outputs_claim_spec["storageClassName"] = json!(class);
    }
    let mut claims = vec![json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": meta(OUTPUTS_CLAIM, Some(OUTPUTS)),
        "spec": outputs_claim_spec,
    })];
    if let (None, Some(volume)) = (&model.claim_name, &model.volume_name) {
        claims.push(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": meta(MODEL_CLAIM, Some(INFERENCE)),
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "volumeName": volume,
                // Binds to the named volume only; an empty class keeps the default class away.
                "storageClassName": "",
                "resources": { "requests": { "storage": "1Mi" } },
            },
        }));
    }

    let services = [INFERENCE, OUTPUTS]
        .into_iter()
        .map(|component| json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(component, Some(component)),
            "spec": {
                "selector": { LABEL_TENANT: name, LABEL_COMPONENT: component },
                "ports": [{ "name": HTTP_PORT_NAME, "port": HTTP_PORT, "targetPort": HTTP_PORT_NAME, "protocol": "TCP" }],
            },
        }))
        .collect::<Vec<_>>();

    let image = spec
        .inference
        .image
        .clone()
        .unwrap_or_else(|| settings.default_inference_image.clone());
    let model_dir = match &model.sub_path {
        Some(sub) => format!("/models/{}", sub.trim_start_matches('/')),
        None => "/models".to_string(),
    };
    let inference_args = vec![
        "serve".to_string(),
        format!("--model-dir={model_dir}"),
        "--outputs-dir=/outputs".to_string(),
        format!("--listen=$(POD_IP):{HTTP_PORT}"),
        format!("--device={}", settings.inference_device.as_arg()),
        format!("--precision={}", model.precision.as_str()),
        format!("--concurrency={}", spec.inference.concurrency),
        format!("--idle-offload={}", spec.inference.idle_offload_after),
        format!("--api-token-file={API_TOKEN_FILE}"),
    ];
    let inference_resources = json!({
        "requests": { gpu: spec.gpus.per_replica.to_string(), "cpu": inference_cpu, "memory": inference_memory },
        "limits": { gpu: spec.gpus.per_replica.to_string(), "cpu": inference_cpu, "memory": inference_memory },
    });
    let mut inference_pod = pod_spec(
        INFERENCE,
        &image,
        inference_args,
        inference_resources,
        vec![
            json!({ "name": "models", "mountPath": "/models", "readOnly": true }),
            json!({ "name": "outputs", "mountPath": "/outputs" }),
            json!({ "name": "tmp", "mountPath": "/tmp" }),
        ],
        vec![
            json!({ "name": "models", "persistentVolumeClaim": { "claimName": model_claim, "readOnly": true } }),
            json!({ "name": "outputs", "persistentVolumeClaim": { "claimName": OUTPUTS_CLAIM } }),
            json!({ "name": "tmp", "emptyDir": { "sizeLimit": "1Gi" } }),
        ],
    );
    if !spec.inference.node_selector.is_empty() {
        inference_pod["nodeSelector"] = json!(spec.inference.node_selector);
    }
    if !spec.inference.tolerations.is_empty() {
        inference_pod["tolerations"] = json!(spec.inference.tolerations);
    }
    if storage.access_mode == AccessMode::ReadWriteOnce {
        // A ReadWriteOnce volume attaches to one node: inference pods must run where the
        // outputs server (which always runs) has it mounted.
        inference_pod["affinity"] = json!({ "podAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": { "matchLabels": { LABEL_TENANT: name, LABEL_COMPONENT: OUTPUTS } },
            "topologyKey": "kubernetes.io/hostname",
        }]}});
    }
    let inference_deployment = deployment(
        &meta(INFERENCE, Some(INFERENCE)),
        &name,
        INFERENCE,
        inference_replicas,
        inference_pod,
    );

    let outputs_pod = pod_spec(
        OUTPUTS,
        &image,
        vec![
            "serve-outputs".into(),
            "--outputs-dir=/outputs".into(),
            format!("--listen=$(POD_IP):{HTTP_PORT}"),
            format!("--api-token-file={API_TOKEN_FILE}"),
        ],
        json!({
            "requests": { "cpu": OUTPUTS_CPU, "memory": OUTPUTS_MEMORY },
            "limits": { "cpu": OUTPUTS_CPU, "memory": OUTPUTS_MEMORY },
        }),
        vec![json!({ "name": "outputs", "mountPath": "/outputs", "readOnly": true })],
        vec![
            json!({ "name": "outputs", "persistentVolumeClaim": { "claimName": OUTPUTS_CLAIM, "readOnly": true } }),
        ],
    );
    let outputs_deployment = deployment(
        &meta(OUTPUTS, Some(OUTPUTS)),
        &name,
        OUTPUTS,
        1,
        outputs_pod,
    );

    Ok(TenantObjects {
        namespace: typed(namespace),
        resource_quota: typed(resource_quota),
        limit_range: typed(limit_range),
        network_policies: network_policies.into_iter().map(typed).collect(),
        service_account: typed(service_account),
        role_bindings: role_bindings.into_iter().map(typed).collect(),
        claims: claims.into_iter().map(typed).collect(),
        services: services.into_iter().map(typed).collect(),
        outputs_deployment: typed(outputs_deployment),
        inference_deployment: typed(inference_deployment),
    })
}

fn base_labels(tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_TENANT.to_string(), tenant.to_string()),
        (
            LABEL_MANAGED_BY.to_string(),
            names::FIELD_MANAGER.to_string(),
        ),
        (LABEL_PART_OF.to_string(), "atelier".to_string()),
    ])
}

/// A restricted-profile pod: non-root, read-only root filesystem, no privilege escalation, no
/// capabilities, RuntimeDefault seccomp, no Kubernetes API token; the tenant's API token
/// ([`API_TOKEN_SECRET`]) mounted at [`API_TOKEN_DIR`].
fn pod_spec(
    component: &str,
    image: &str,
    args: Vec<String>,
    resources: Value,
    mut mounts: Vec<Value>,
    mut volumes: Vec<Value>,
) -> Value {
    mounts.push(json!({ "name": "api-token", "mountPath": API_TOKEN_DIR, "readOnly": true }));
    volumes.push(json!({ "name": "api-token", "secret": { "secretName": API_TOKEN_SECRET } }));
    json!({
        "serviceAccountName": WORKLOAD_SERVICE_ACCOUNT,
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "containers": [{
            "name": component,
            "image": image,
            "args": args,
            "env": [
                { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
                { "name": "RUST_LOG", "value": "info" },
            ],
            "ports": [{ "name": HTTP_PORT_NAME, "containerPort": HTTP_PORT, "protocol": "TCP" }],
            "readinessProbe": { "httpGet": { "path": "/readyz", "port": HTTP_PORT_NAME }, "periodSeconds": 2, "failureThreshold": 3 },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": HTTP_PORT_NAME }, "periodSeconds": 10, "failureThreshold": 6 },
            "resources": resources,
            "volumeMounts": mounts,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true,
                "capabilities": { "drop": ["ALL"] },
            },
        }],
        "volumes": volumes,
    })
}

fn deployment(meta: &Value, tenant: &str, component: &str, replicas: u32, pod: Value) -> Value {
    let mut labels = base_labels(tenant);
    labels.insert(LABEL_COMPONENT.into(), component.into());
    labels.insert(LABEL_NAME.into(), format!("atelier-{component}"));
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { LABEL_TENANT: tenant, LABEL_COMPONENT: component } },
            // Recreate: a new inference pod needs the GPU the old one holds.
            "strategy": { "type": "Recreate" },
            "template": { "metadata": { "labels": labels }, "spec": pod },
        },
    })
}

fn quantity_or(
    quantity: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    default: &str,
) -> String {
    quantity
        .as_ref()
        .map_or_else(|| default.to_string(), |q| q.0.clone())
}

/// `per_replica × replicas + extra` as a quantity, exact in base units (`1.5` CPUs × 3 + `100m`
/// is `4.6`). `field` names the tenant's setting when `per_replica` is not a quantity.
fn scaled(
    field: &'static str,
    per_replica: &str,
    replicas: u32,
    extra: &str,
) -> Result<String, SpecError> {
    quantity::scaled(per_replica, replicas, extra).ok_or_else(|| SpecError::Quantity {
        field,
        value: per_replica.to_string(),
    })
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("desired objects are built to match their Kubernetes type")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(extra: Value) -> Tenant {
        let mut spec = json!({
            "members": [{ "group": "team-a", "role": "user" }, { "group": "team-a-admins", "role": "admin" }],
            "gpus": { "max": 2 },
            "inference": { "model": { "volumeName": "flux-weights", "subPath": "majicflus" } },
        });
        merge(&mut spec, extra);
        let mut tenant = Tenant::new("team-a", serde_json::from_value(spec).unwrap());
        tenant.metadata.uid = Some("uid-1".into());
        tenant
    }

    fn merge(base: &mut Value, extra: Value) {
        match (base, extra) {
            (Value::Object(base), Value::Object(extra)) => {
                for (k, v) in extra {
                    merge(base.entry(k).or_insert(Value::Null), v);
                }
            }
            (base, value) => *base = value,
        }
    }

    fn settings() -> Settings {
        Settings {
            default_inference_image: "ghcr.io/atelier/atelier-inference:0.1.0".into(),
            inference_device: InferenceDevice::Cuda,
            platform_namespace: "atelier-system".into(),
            admin_cluster_role: "atelier-tenant-admin".into(),
            member_cluster_role: "atelier-tenant-member".into(),
            kubectl_identity_prefix: "oidc:".into(),
        }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "atelier.dev/v1alpha1".into(),
            kind: "Tenant".into(),
            name: "team-a".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn every_object_is_owned_and_lives_in_the_tenant_namespace() {
        let objects = tenant_objects(&tenant(json!({})), &owner(), &settings(), 1).unwrap();
        assert_eq!(
            objects.namespace.metadata.name.as_deref(),
            Some("atelier-team-a")
        );
        let labels = objects.namespace.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");
        let metas = [
            &objects.resource_quota.metadata,
            &objects.limit_range.metadata,
            &objects.service_account.metadata,
            &objects.inference_deployment.metadata,
            &objects.outputs_deployment.metadata,
        ];
        for meta in metas {
            assert_eq!(meta.namespace.as_deref(), Some("atelier-team-a"));
            assert_eq!(meta.owner_references.as_ref().unwrap()[0].uid, "uid-1");
        }
        assert_eq!(objects.claims.len(), 2, "outputs and the model claim");
        assert_eq!(objects.role_bindings.len(), 2);
    }

    #[test]
    fn quota_caps_gpus_and_sums_cpu_and_memory() {
        let objects = tenant_objects(
            &tenant(json!({ "inference": { "cpu": "2", "memory": "8Gi" } })),
            &owner(),
            &settings(),
            0,
        )
        .unwrap();
        let hard = objects.resource_quota.spec.unwrap().hard.unwrap();
        assert_eq!(hard["requests.nvidia.com/gpu"].0, "2");
        assert_eq!(amount(&hard["requests.cpu"].0), amount("4100m"));
        assert_eq!(
            amount(&hard["requests.memory"].0),
            amount(&(16u128 * (1 << 30) + 128 * (1 << 20)).to_string())
        );
    }

    fn amount(text: &str) -> rust_decimal::Decimal {
        quantity::base_units(text).unwrap()
    }

    #[test]
    fn fractional_quantities_are_scaled_too() {
        let objects = tenant_objects(
            &tenant(json!({ "inference": { "cpu": "1.5", "memory": "1.5Gi" } })),
            &owner(),
            &settings(),
            0,
        )
        .unwrap();
        let hard = objects.resource_quota.spec.unwrap().hard.unwrap();
        assert_eq!(amount(&hard["limits.cpu"].0), amount("3100m"));
        assert_eq!(amount(&hard["limits.memory"].0), amount("3200Mi"));
    }

    #[test]
    fn a_setting_that_is_no_quantity_is_named() {
        let result = tenant_objects(
            &tenant(json!({ "inference": { "memory": "lots" } })),
            &owner(),
            &settings(),
            0,
        );
        let error = result.err().unwrap();
        assert_eq!(
            error,
            SpecError::Quantity {
                field: "inference.memory",
                value: "lots".into()
            }
        );
        assert!(
            error.to_string().starts_with("inference.memory \"lots\""),
            "{error}"
        );
    }

    proptest::proptest! {
        /// However a per-replica amount is written, the quota is that amount times the
        /// replicas plus the outputs server's, to the milli-CPU and to the byte.
        #[test]
        fn the_quota_is_replicas_times_the_request_plus_the_outputs_server(
            millis in 1u64..10_000_000,
            mebibytes in 1u64..1_000_000,
            replicas in 0u32..100,
            written in 0usize..4,
        ) {
            let cpu = match written {
                0 => format!("{millis}m"),
                1 => format!("{}.{:03}", millis / 1000, millis % 1000),
                2 => format!("{}k", millis as f64 / 1_000_000.0),
                _ => format!("{}", millis as f64 / 1000.0),
            };
            let memory = match written {
                0 => format!("{mebibytes}Mi"),
                1 => format!("{}Ki", mebibytes * 1024),
                2 => format!("{}Gi", mebibytes as f64 / 1024.0),
                _ => format!("{}", mebibytes << 20),
            };
            let cpu_total = scaled("inference.cpu", &cpu, replicas, OUTPUTS_CPU).unwrap();
            let memory_total = scaled("inference.memory", &memory, replicas, OUTPUTS_MEMORY).unwrap();
            let expected_millis = millis * u64::from(replicas) + 100;
            proptest::prop_assert_eq!(amount(&cpu_total), amount(&format!("{expected_millis}m")));
            let expected_bytes = (mebibytes * u64::from(replicas) + 128) << 20;
            proptest::prop_assert_eq!(
                amount(&memory_total),
                rust_decimal::Decimal::from(expected_bytes),
                "{} for {} x {}", memory_total, memory, replicas
            );
        }
    }

    #[test]
    fn inference_pods_ask_for_their_gpus_and_run_restricted() {
        let objects = tenant_objects(&tenant(json!({ "gpus": { "resourceName": "nvidia.com/mig-1g.18gb", "perReplica": 1, "max": 3 } })), &owner(), &settings(), 2).unwrap();
        let spec = objects.inference_deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.unwrap();
        let container = &pod.containers[0];
        let limits = container
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["nvidia.com/mig-1g.18gb"].0, "1");
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        let args = container.args.as_ref().unwrap();
        assert!(args.contains(&"--model-dir=/models/majicflus".to_string()));
        assert!(args.contains(&"--device=cuda".to_string()), "{args:?}");
        assert!(
            pod.affinity.is_some(),
            "ReadWriteOnce outputs need affinity to the outputs pod"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn read_write_many_needs_no_affinity() {
        let objects = tenant_objects(
            &tenant(json!({ "storage": { "accessMode": "ReadWriteMany" } })),
            &owner(),
            &settings(),
            1,
        )
        .unwrap();
        assert!(
            objects
                .inference_deployment
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .affinity
                .is_none()
        );
    }

    #[test]
    fn impossible_gpu_budget_is_an_error() {
        let bad = tenant(json!({ "gpus": { "perReplica": 4, "max": 2 } }));
        assert_eq!(
            tenant_objects(&bad, &owner(), &settings(), 0).err(),
            Some(SpecError::GpuBudget {
                per_replica: 4,
                max: 2
            })
        );
    }

    #[test]
    fn a_model_is_required() {
        let mut bad = tenant(json!({}));
        bad.spec.inference.model.volume_name = None;
        assert_eq!(
            tenant_objects(&bad, &owner(), &settings(), 0).err(),
            Some(SpecError::NoModelVolume)
        );
    }

    #[test]
    fn role_bindings_use_the_kubectl_identity_prefix() {
        let objects = tenant_objects(&tenant(json!({})), &owner(), &settings(), 0).unwrap();
        let admins = objects
            .role_bindings
            .iter()
            .find(|b| b.metadata.name.as_deref() == Some("atelier-admins"))
            .unwrap();
        assert_eq!(
            admins.subjects.as_ref().unwrap()[0].name,
            "oidc:team-a-admins"
        );
        assert_eq!(admins.role_ref.name, "atelier-tenant-admin");
    }
}
