//! Node registration and heartbeats: the Ready condition, the `kube-node-lease` Lease, and
//! the not-ready taint (there is no node lifecycle controller, so the kubelet manages it).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::status::HOST_IP;

const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
const LEASE_DURATION_SECONDS: i32 = 40;
const LEASE_NAMESPACE: &str = "kube-node-lease";
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// A node the kubelet registers: its name, capacity (= allocatable) and labels.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    /// `cpu`, `memory`, `pods`, `ephemeral-storage` and extended resources such as
    /// `nvidia.com/gpu` or `nvidia.com/mig-1g.18gb`, as quantities.
    pub resources: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl NodeConfig {
    /// A node with 16 CPUs, 64 GiB of memory, room for 110 pods and no GPUs.
    pub fn new(name: &str) -> Self {
        let resources = [
            ("cpu", "16"),
            ("memory", "64Gi"),
            ("pods", "110"),
            ("ephemeral-storage", "100Gi"),
        ];
        Self {
            name: name.to_string(),
            resources: resources
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            labels: BTreeMap::new(),
        }
    }

    /// Sets a resource's capacity, e.g. `.with_resource("nvidia.com/gpu", "4")`.
    pub fn with_resource(mut self, name: &str, quantity: &str) -> Self {
        self.resources
            .insert(name.to_string(), quantity.to_string());
        self
    }

    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    fn node(&self) -> Node {
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), self.name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert(
            "kubernetes.io/arch".into(),
            std::env::consts::ARCH.replace("x86_64", "amd64"),
        );
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec::default()),
            status: None,
        }
    }

    fn status(&self, ready: bool, ready_since: &Time, now: &Time) -> NodeStatus {
        let resources: BTreeMap<String, Quantity> = self
            .resources
            .iter()
            .map(|(name, quantity)| (name.clone(), Quantity(quantity.clone())))
            .collect();
        let fine = |type_: &str, reason: &str| NodeCondition {
            type_: type_.into(),
            status: "False".into(),
            reason: Some(reason.into()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(ready_since.clone()),
            ..NodeCondition::default()
        };
        let (status, reason, message) = if ready {
            (
                "True",
                "KubeletReady",
                "the atelier local kubelet is posting ready status",
            )
        } else {
            (
                "False",
                "KubeletNotReady",
                "heartbeats stopped (fault injection)",
            )
        };
        NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            conditions: Some(vec![
                fine("MemoryPressure", "KubeletHasSufficientMemory"),
                fine("DiskPressure", "KubeletHasNoDiskPressure"),
                fine("PIDPressure", "KubeletHasSufficientPID"),
                NodeCondition {
                    type_: "Ready".into(),
                    status: status.into(),
                    reason: Some(reason.into()),
                    message: Some(message.into()),
                    last_heartbeat_time: Some(now.clone()),
                    last_transition_time: Some(ready_since.clone()),
                },
            ]),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: HOST_IP.into(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: self.name.clone(),
                },
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: std::env::consts::ARCH.replace("x86_64", "amd64"),
                operating_system: "linux".into(),
                os_image: "atelier local kubelet".into(),
                kernel_version: String::new(),
                container_runtime_version: "atelier-process://0.1.0".into(),
                kubelet_version: "v1.36.3".into(),
                kube_proxy_version: String::new(),
                boot_id: String::new(),
                machine_id: self.name.clone(),
                system_uuid: self.name.clone(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        }
    }
}

/// Creates the Node (or takes over an existing one), posts a first ready heartbeat and starts
/// heartbeating every 10 s until `shutdown`. `ready` false stops the heartbeats after one last
/// status with Ready=False and the not-ready taint.
pub(crate) async fn register(
    client: Client,
    node: NodeConfig,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let api: Api<Node> = Api::all(client.clone());
    match api.create(&PostParams::default(), &node.node()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error).with_context(|| format!("registering node {}", node.name)),
    }
    let mut heartbeat = Heartbeat {
        api,
        leases: Api::namespaced(client, LEASE_NAMESPACE),
        node,
        ready_since: Time(Timestamp::now()),
        was_ready: true,
    };
    heartbeat.beat(true).await?;
    Ok(tokio::spawn(heartbeat.run(ready, shutdown)))
}

struct Heartbeat {
    api: Api<Node>,
    leases: Api<Lease>,
    node: NodeConfig,
    ready_since: Time,
    was_ready: bool,
}

impl Heartbeat {
    async fn run(mut self, mut ready: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                changed = ready.changed() => if changed.is_err() { return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let is_ready = *ready.borrow_and_update();
            if !is_ready && !self.was_ready {
                continue; // a NotReady node is silent
            }
            if let Err(error) = self.beat(is_ready).await {
                tracing::warn!(node = %self.node.name, "heartbeat failed: {error:#}");
            }
        }
    }

    async fn beat(&mut self, ready: bool) -> anyhow::Result<()> {
        let now = Time(Timestamp::now());
        if ready != self.was_ready {
            self.ready_since = now.clone();
            self.was_ready = ready;
        }
        let status = self.node.status(ready, &self.ready_since, &now);
        let name = &self.node.name;
        let node = self
            .api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .with_context(|| format!("updating node {name}'s status"))?;
        self.update_taints(&node, ready).await?;
        if ready {
            self.renew_lease(&node, now).await?;
        }
        Ok(())
    }

    /// Without a node lifecycle controller, the kubelet itself removes the not-ready taint that
    /// admission puts on new nodes (and puts it back while NotReady).
    async fn update_taints(&self, node: &Node, ready: bool) -> anyhow::Result<()> {
        let current = node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.clone())
            .unwrap_or_default();
        let mut wanted: Vec<Taint> = current
            .iter()
            .filter(|taint| taint.key != NOT_READY_TAINT && taint.key != UNREACHABLE_TAINT)
            .cloned()
            .collect();
        if !ready {
            wanted.push(Taint {
                key: NOT_READY_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            });
        }
        if wanted != current {
            self.api
                .patch(
                    &node.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"taints": wanted}})),
                )
                .await
                .context("updating node taints")?;
        }
        Ok(())
    }

    async fn renew_lease(&self, node: &Node, now: Time) -> anyhow::Result<()> {
        let name = node.name_any();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(LEASE_NAMESPACE.into()),
                // Garbage collected with the Node.
                owner_references: node.controller_owner_ref(&()).map(|owner| vec![owner]),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.clone()),
                lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
                renew_time: Some(MicroTime(now.0)),
                ..LeaseSpec::default()
            }),
        };
        self.leases
            .patch(
                &name,
                &PatchParams::apply("atelier-kubelet").force(),
                &Patch::Apply(&lease),
            )
            .await
            .with_context(|| format!("renewing the lease of node {name}"))?;
        Ok(())
    }
}
