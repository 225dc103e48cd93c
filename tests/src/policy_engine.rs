//! The NetworkPolicy engine of the tests: kube-router's network-policy controller
//! (`--run-firewall` only, iptables + ipset), built from its Go module by
//! `tests/cluster/build.sh`. It filters the pods' traffic on the host's netfilter paths (the
//! local kubelet routes every pod through the host, see `kubelet/network.rs`). Tests only:
//! kube-router v2.1.0 has published advisories (see `tests/cluster/README.md`).
//!
//! Its iptables chains and ipsets are the machine's, so one engine runs at a time; a cluster
//! starts it only when asked ([`crate::ClusterOptions::network_policies`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::{child, paths};

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct PolicyEngine {
    process: Child,
    log: PathBuf,
}

impl PolicyEngine {
    /// Starts kube-router for `node` (registered already) with the admin `kubeconfig`; its log
    /// goes to `dir/kube-router.log`.
    pub(crate) async fn start(kubeconfig: &Path, node: &str, dir: &Path) -> anyhow::Result<Self> {
        let binary = paths::tool("kube-router");
        if !binary.exists() {
            bail!(
                "{} is missing: build it with tests/cluster/build.sh kube-router",
                binary.display()
            );
        }
        let log = dir.join("kube-router.log");
        let out = File::create(&log)?;
        let mut command = Command::new(&binary);
        command
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--hostname-override={node}"))
            .args([
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--enable-cni=false",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--health-port=0",
                "--metrics-port=0",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        child::die_with_parent(command.as_std_mut(), libc::SIGTERM);
        let process = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut engine = Self { process, log };
        engine.wait_synced().await?;
        Ok(engine)
    }

    /// Until kube-router has written its first rules (its chain in the filter table's FORWARD).
    async fn wait_synced(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.process.try_wait()? {
                bail!(
                    "kube-router exited ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            let rules = Command::new("iptables")
                .args(["-S", "FORWARD"])
                .output()
                .await
                .context("running iptables")?;
            if String::from_utf8_lossy(&rules.stdout).contains("KUBE-ROUTER-FORWARD") {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "kube-router set up no rules within 60 s; its log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then removes its iptables chains and ipsets (`tests/cluster/kube-router-cleanup.sh`).
    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.process.id() {
            let _ = child::signal_process(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(STOP_TIMEOUT, self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
        let script = paths::workspace_root().join("tests/cluster/kube-router-cleanup.sh");
        match Command::new(&script).output().await {
            Ok(output) if output.status.success() => {}
            Ok(output) => tracing::warn!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => tracing::warn!("running {}: {error}", script.display()),
        }
    }
}
