//! Pod identity: ServiceAccount tokens from the TokenRequest API, bound to the pod, and a
//! kubeconfig that carries one to the process (`KUBECONFIG`, which kube-rs reads first).

use std::path::Path;

use anyhow::{Context, anyhow};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::PostParams;
use kube::config::Kubeconfig;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Lifetime of the token in a pod's kubeconfig; the kubelet does not rotate it.
const KUBECONFIG_TOKEN_SECONDS: i64 = 24 * 3600;

/// How pods reach the API server: its URL and CA, taken from the kubelet's kubeconfig.
#[derive(Clone, Debug)]
pub(crate) struct ApiAccess {
    server: String,
    ca_data: Option<String>,
    ca_file: Option<String>,
}

impl ApiAccess {
    pub(crate) fn from_kubeconfig(path: &Path) -> anyhow::Result<Self> {
        let kubeconfig =
            Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
        let context_name = kubeconfig.current_context.clone().unwrap_or_default();
        let cluster_name = kubeconfig
            .contexts
            .iter()
            .find(|context| context.name == context_name)
            .and_then(|context| context.context.as_ref())
            .map(|context| context.cluster.clone());
        let cluster = kubeconfig
            .clusters
            .iter()
            .find(|cluster| Some(&cluster.name) == cluster_name.as_ref())
            .or(kubeconfig.clusters.first())
            .and_then(|cluster| cluster.cluster.clone())
            .ok_or_else(|| anyhow!("{} names no cluster", path.display()))?;
        Ok(Self {
            server: cluster
                .server
                .ok_or_else(|| anyhow!("{} has no server URL", path.display()))?,
            ca_data: cluster.certificate_authority_data,
            ca_file: cluster.certificate_authority,
        })
    }

    /// A kubeconfig (JSON is valid YAML) for `token`, defaulting to the pod's namespace.
    pub(crate) fn kubeconfig(&self, namespace: &str, token: &str) -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": {
                "server": self.server,
                "certificate-authority-data": self.ca_data,
                "certificate-authority": self.ca_file,
            }}],
            "users": [{"name": "pod", "user": {"token": token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "cluster", "user": "pod", "namespace": namespace}}],
            "current-context": "pod",
        })
    }
}

/// A token of the pod's ServiceAccount, bound to the pod (it dies with it). No audiences
/// means the API server's own.
pub(crate) async fn request_token(
    client: &Client,
    pod: &Pod,
    audiences: Vec<String>,
    expiration_seconds: Option<i64>,
) -> anyhow::Result<String> {
    let namespace = pod.namespace().unwrap_or_default();
    let account = service_account_name(pod);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(audiences).filter(|audiences| !audiences.is_empty()),
            expiration_seconds,
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        }),
        ..TokenRequest::default()
    };
    let response = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{account}"))?;
    response
        .status
        .and_then(|status| status.token)
        .ok_or_else(|| anyhow!("the TokenRequest for {namespace}/{account} returned no token"))
}

fn service_account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.clone())
        .unwrap_or_else(|| "default".into())
}

/// The pod's `automountServiceAccountToken`, else its ServiceAccount's, else true.
async fn automounts_token(client: &Client, pod: &Pod) -> anyhow::Result<bool> {
    if let Some(automount) = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.automount_service_account_token)
    {
        return Ok(automount);
    }
    let namespace = pod.namespace().unwrap_or_default();
    let account = service_account_name(pod);
    let service_account = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .get(&account)
        .await
        .with_context(|| format!("reading ServiceAccount {namespace}/{account}"))?;
    Ok(service_account
        .automount_service_account_token
        .unwrap_or(true))
}

/// Writes `dir/kubeconfig` with a token of the pod's ServiceAccount and returns its path, or
/// `None` when the pod opts out of token automounting.
pub(crate) async fn write_pod_kubeconfig(
    client: &Client,
    access: &ApiAccess,
    pod: &Pod,
    dir: &Path,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    if !automounts_token(client, pod).await? {
        return Ok(None);
    }
    let token = request_token(client, pod, Vec::new(), Some(KUBECONFIG_TOKEN_SECONDS)).await?;
    let kubeconfig = access.kubeconfig(&pod.namespace().unwrap_or_default(), &token);
    let path = dir.join("kubeconfig");
    std::fs::create_dir_all(dir)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&kubeconfig)?)?;
    Ok(Some(path))
}
