//! `atelier-kubelet`: the local kubelet and volume provisioner of the test cluster, for
//! `make demo` against a running `atelier-testcluster`. Runs until SIGTERM or Ctrl-C, then
//! stops its pods' processes.

use std::path::PathBuf;

use anyhow::Context;
use atelier_tests::kubelet::{self, KubeletConfig, NodeConfig};
use atelier_tests::{paths, provisioner};
use clap::Parser;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    about = "Runs pods bound to local nodes as local processes, each pod in a network namespace of its own on 198.18.1.N, and provisions `local` volumes"
)]
struct Args {
    /// Admin kubeconfig of the cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Pod directories (`pods/`), container logs (`logs/`) and volumes (`volumes/`).
    #[arg(long)]
    root: PathBuf,
    /// Where image names are looked up as binaries [default: this executable's directory].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Node names (repeatable).
    #[arg(long = "node", default_value = "local-1")]
    nodes: Vec<String>,
    /// GPUs per node.
    #[arg(long, default_value_t = 4)]
    gpus: u32,
    /// The extended resource name of the GPUs, e.g. nvidia.com/mig-1g.18gb.
    #[arg(long, default_value = "nvidia.com/gpu")]
    gpu_resource: String,
    /// More node capacity as NAME=QUANTITY (repeatable), e.g. nvidia.com/mig-1g.18gb=7.
    #[arg(long = "resource", value_parser = parse_resource)]
    resources: Vec<(String, String)>,
}

fn parse_resource(text: &str) -> Result<(String, String), String> {
    let (name, quantity) = text.split_once('=').ok_or("expected NAME=QUANTITY")?;
    Ok((name.to_string(), quantity.to_string()))
}

// A current-thread runtime: container processes die with the thread that spawned them.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,atelier_tests=debug".into()),
        )
        .init();
    let args = Args::parse();
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?,
    )?;
    let gpus = args.gpus.to_string();
    let nodes = args
        .nodes
        .iter()
        .map(|name| {
            let node = NodeConfig::new(name).with_resource(&args.gpu_resource, &gpus);
            args.resources
                .iter()
                .fold(node, |node, (resource, quantity)| {
                    node.with_resource(resource, quantity)
                })
        })
        .collect();
    let bin_dir = args.bin_dir.unwrap_or_else(paths::default_bin_dir);
    let config = KubeletConfig::new(&args.kubeconfig, &args.root, &bin_dir, nodes);

    provisioner::ensure_storage_class(&client).await?;
    let provisioner = tokio::spawn(provisioner::run(client.clone(), args.root.join("volumes")));
    let kubelet = kubelet::start(client, config).await?;
    tracing::info!(
        "kubelet running nodes {:?} with binaries from {}",
        args.nodes,
        bin_dir.display()
    );

    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping the pods' processes");
    kubelet.shutdown().await;
    provisioner.abort();
    Ok(())
}
