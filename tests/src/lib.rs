//! Test support for Atelier's end-to-end tests.
//!
//! - [`TestCluster`]: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler in one `atelier-testcluster` process) with Atelier's CRDs installed, a local
//!   kubelet and a local volume provisioner, torn down with the test process.
//! - [`kubelet`]: runs pod containers as local processes, each pod in a network namespace of
//!   its own on an address 198.18.1.N routed from the host.
//! - [`provisioner`]: the `local` StorageClass, backed by directories.
//! - `policy_engine`: kube-router's network-policy controller, for clusters that ask for it
//!   ([`ClusterOptions::network_policies`]).
//! - fault injection on [`TestCluster`]: kill a pod's process, make a node NotReady, pause the
//!   API server.
//!
//! A test binary shares one cluster; each test works in namespaces of its own and makes its
//! own clients (a `kube::Client` is bound to the runtime that made it, and every
//! `#[tokio::test]` has its own):
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use atelier_tests::TestCluster;
//! let cluster = TestCluster::shared().await;
//! let client = cluster.client().await;
//! let namespace = cluster.create_namespace("my-test").await?;
//! # Ok(()) }
//! ```
//!
//! Container images run as the binary named like the image's last path segment
//! (`ghcr.io/atelier/atelier-operator:0.1.0` → `atelier-operator`) from the cargo output
//! directory of the test (`target/debug`, or `$ATELIER_BIN_DIR`): build the binaries a test
//! deploys before running it (`cargo build -p atelier-operator -p atelier-inference`). The
//! control plane binary comes from `tests/cluster/build.sh` (`$ATELIER_TESTCLUSTER` overrides).

mod child;
pub mod cluster;
mod control_plane;
pub mod crds;
mod faults;
pub mod kubelet;
pub mod names;
pub mod oidc;
pub mod paths;
mod policy_engine;
pub mod provisioner;
mod proxy;
pub mod wait;

pub use child::TestProcess;
pub use cluster::{ClusterOptions, TestCluster};
pub use kubelet::NodeConfig;
pub use names::unique_name;
pub use wait::{DEFAULT_TIMEOUT, wait_for};
