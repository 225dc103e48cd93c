//! Fault injection on a [`TestCluster`].

use anyhow::bail;
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::TestCluster;
use crate::wait::{DEFAULT_TIMEOUT, wait_for};

impl TestCluster {
    /// SIGKILLs the processes of a pod's containers, as if they crashed; the kubelet restarts
    /// them per the pod's `restartPolicy`. Fails if none is running.
    pub fn kill_pod_process(&self, namespace: &str, pod: &str) -> anyhow::Result<()> {
        if self.kubelet.kill_pod_processes(namespace, pod) == 0 {
            bail!("pod {namespace}/{pod} has no running container process");
        }
        Ok(())
    }

    /// Makes a node NotReady (its heartbeats stop, the Ready condition turns False and the
    /// `node.kubernetes.io/not-ready:NoSchedule` taint keeps new pods off it), or Ready again.
    /// Returns once the Node object shows both. Its running pods keep running, but their
    /// statuses are no longer updated while it is NotReady.
    pub async fn set_node_ready(&self, node: &str, ready: bool) -> anyhow::Result<()> {
        self.kubelet.set_node_ready(node, ready)?;
        let nodes: Api<Node> = Api::all(self.client().await);
        let wanted = if ready { "True" } else { "False" };
        wait_for(
            &format!("node {node} Ready={wanted}"),
            DEFAULT_TIMEOUT,
            || async {
                let current = nodes.get(node).await?;
                let condition_shows = current
                    .status
                    .and_then(|status| status.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|condition| condition.type_ == "Ready" && condition.status == wanted);
                let tainted = current
                    .spec
                    .and_then(|spec| spec.taints)
                    .unwrap_or_default()
                    .iter()
                    .any(|taint| {
                        taint.key == "node.kubernetes.io/not-ready" && taint.effect == "NoSchedule"
                    });
                Ok((condition_shows && tainted != ready).then_some(()))
            },
        )
        .await
    }

    /// Makes the API server unreachable through [`TestCluster::kubeconfig_path`]'s address
    /// (which the kubelet, the tests and the pods use): open connections are cut and new ones
    /// closed at once. The control plane itself keeps running.
    pub fn pause_api_server(&self) {
        self.api_proxy.pause();
    }

    pub fn resume_api_server(&self) {
        self.api_proxy.resume();
    }
}
