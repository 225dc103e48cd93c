//! `atelier-operator controller`: the Tenant and GenerationJob controllers and the dispatcher,
//! run by the leader of the operator replicas.

pub mod apply;
pub mod dispatcher;
pub mod inference_client;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod quota;
pub mod tenant;
pub mod watched_jobs;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use jiff::Timestamp;
use kube::runtime::events::{Recorder, Reporter};

use crate::core::desired::{InferenceDevice, Settings};

#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Image of inference and outputs pods for tenants that name none.
    #[arg(
        long,
        env = "ATELIER_INFERENCE_IMAGE",
        default_value = "ghcr.io/atelier-dev/atelier-inference:0.1.0"
    )]
    pub inference_image: String,
    /// Device the inference pods compute on (their `--device`); `cpu` only where the nodes'
    /// GPUs are not real (the local test cluster).
    #[arg(
        long,
        env = "ATELIER_INFERENCE_DEVICE",
        value_enum,
        default_value = "cuda"
    )]
    pub inference_device: InferenceDevice,
    /// Namespace of the operator and API, the only source allowed into tenant pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = "atelier-system")]
    pub platform_namespace: String,
    /// ClusterRole bound to each tenant's admin groups and users.
    #[arg(
        long,
        env = "ATELIER_TENANT_ADMIN_ROLE",
        default_value = "atelier-tenant-admin"
    )]
    pub tenant_admin_role: String,
    /// ClusterRole bound to each tenant's member groups and users.
    #[arg(
        long,
        env = "ATELIER_TENANT_MEMBER_ROLE",
        default_value = "atelier-tenant-member"
    )]
    pub tenant_member_role: String,
    /// Prefix of OIDC identities at the API server (its `--oidc-username-prefix`).
    #[arg(long, env = "ATELIER_KUBECTL_IDENTITY_PREFIX", default_value = "oidc:")]
    pub kubectl_identity_prefix: String,
    /// Address of the Prometheus `/metrics` and health endpoints.
    #[arg(long, env = "ATELIER_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// Take part in leader election (needed when more than one replica runs).
    #[arg(long, env = "ATELIER_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "ATELIER_LEADER_NAMESPACE",
        default_value = "atelier-system"
    )]
    pub leader_namespace: String,
    /// Identity of this replica in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address ranges job webhooks may reach although they are internal (loopback, private,
    /// link-local, shared), as comma-separated CIDRs. Empty: public addresses only.
    #[arg(long, env = "ATELIER_WEBHOOK_ALLOWED_CIDRS", value_delimiter = ',')]
    pub webhook_allowed_cidrs: Vec<ipnet::IpNet>,
    /// Test hook: a file holding an RFC 3339 time to use as "now" (the quota day boundary is
    /// then testable without waiting a day). Only in builds with the `test-hooks` feature,
    /// which the end-to-end tests enable and release images do not.
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "ATELIER_TEST_CLOCK_FILE", hide = true)]
    pub test_clock_file: Option<std::path::PathBuf>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    pub metrics: Arc<metrics::Metrics>,
    pub recorder: Recorder,
    pub clock: Clock,
    /// Every GenerationJob, indexed for admission and the dispatcher.
    pub jobs: watched_jobs::WatchedJobs,
    /// Internal ranges webhooks may reach nevertheless.
    pub webhook_allowed_cidrs: Vec<ipnet::IpNet>,
}

/// Wall clock, or (with the `test-hooks` feature) the time written in a test file.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    #[cfg(feature = "test-hooks")]
    file: Option<std::path::PathBuf>,
}

impl Clock {
    pub fn now(&self) -> Timestamp {
        #[cfg(feature = "test-hooks")]
        if let Some(now) = self
            .file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| text.trim().parse().ok())
        {
            return now;
        }
        Timestamp::now()
    }
}

pub async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let metrics = Arc::new(metrics::Metrics::default());
    let metrics_server = tokio::spawn(metrics::serve(args.metrics_listen, metrics.clone()));

    let _leadership = if args.leader_elect {
        Some(
            leader::acquire(
                client.clone(),
                &args.leader_namespace,
                "atelier-operator",
                &identity,
            )
            .await?,
        )
    } else {
        None
    };

    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: Settings {
            default_inference_image: args.inference_image.clone(),
            inference_device: args.inference_device,
            platform_namespace: args.platform_namespace.clone(),
            admin_cluster_role: args.tenant_admin_role.clone(),
            member_cluster_role: args.tenant_member_role.clone(),
            kubectl_identity_prefix: args.kubectl_identity_prefix.clone(),
        },
        metrics,
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "atelier-operator".into(),
                instance: Some(identity),
            },
        ),
        clock: Clock {
            #[cfg(feature = "test-hooks")]
            file: args.test_clock_file.clone(),
        },
        jobs: watched_jobs::WatchedJobs::default(),
        webhook_allowed_cidrs: args.webhook_allowed_cidrs.clone(),
    });

    tokio::select! {
        () = tenant::run(ctx.clone()) => anyhow::bail!("the tenant controller stopped"),
        () = job::run(ctx.clone()) => anyhow::bail!("the job controller stopped"),
        () = dispatcher::run(ctx.clone()) => anyhow::bail!("the dispatcher stopped"),
        result = metrics_server => result?.context("metrics server"),
        _ = tokio::signal::ctrl_c() => Ok(()),
        () = shutdown_signal() => Ok(()),
    }
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "atelier".into())
}
