//! Test support for Atelier's end-to-end tests.
//!
//! - [`TestCluster`]: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler in one `atelier-testcluster` process) with Atelier's CRDs installed, a local
//!   kubelet and a local volume provisioner, torn down with the test process.
//! - [`kubelet`]: runs pod containers as local processes on loopback addresses 127.0.0.N.
//! - [`provisioner`]: the `local` StorageClass, backed by directories.
//! - fault injection on [`TestCluster`]: kill a pod's process, make a node NotReady, pause the
//!   API server.

mod child;
pub mod cluster;
mod control_plane;
pub mod crds;
mod faults;
pub mod kubelet;
pub mod names;
pub mod paths;
pub mod provisioner;
mod proxy;
pub mod wait;

pub use cluster::{ClusterOptions, TestCluster};
pub use kubelet::NodeConfig;
pub use names::unique_name;
pub use wait::{DEFAULT_TIMEOUT, wait_for};
