//! The `atelier-testcluster` process: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler in one binary built by `tests/cluster/build.sh`.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::{child, paths};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) struct ControlPlane {
    process: Child,
    /// Where the API server listens (`READY https://127.0.0.1:PORT`).
    pub(crate) address: SocketAddr,
}

/// The binary: `$ATELIER_TESTCLUSTER`, else the one `tests/cluster/build.sh` installs.
fn binary() -> PathBuf {
    std::env::var_os("ATELIER_TESTCLUSTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::tool("atelier-testcluster"))
}

impl ControlPlane {
    /// Starts the control plane in `dir` (where it writes `kubeconfig`, its data and our
    /// `testcluster.log`) and waits until it reports ready.
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<Self> {
        let binary = binary();
        if !binary.exists() {
            bail!(
                "{} is missing: build it with tests/cluster/build.sh (or set ATELIER_TESTCLUSTER)",
                binary.display()
            );
        }
        let log_path = dir.join("testcluster.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut command = Command::new(&binary);
        command
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        child::die_with_parent(command.as_std_mut(), libc::SIGTERM);
        let mut process = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = process.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let waited =
            tokio::time::timeout(STARTUP_TIMEOUT, read_ready_line(&mut lines, &log_path)).await;
        let server_url = match waited {
            Ok(Ok(url)) => url,
            Ok(Err(error)) => {
                let status = process.wait().await?;
                return Err(error.context(format!(
                    "atelier-testcluster exited ({status}) before it was ready; its log:\n{}",
                    log_tail(&log_path)
                )));
            }
            Err(_) => bail!(
                "atelier-testcluster was not ready within {STARTUP_TIMEOUT:?}; its log:\n{}",
                log_tail(&log_path)
            ),
        };
        // Keep draining stdout, or the process would block once the pipe fills up.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                append_line(&log_path, &line);
            }
        });
        let address = server_url
            .strip_prefix("https://")
            .and_then(|rest| rest.trim_end_matches('/').parse().ok())
            .ok_or_else(|| anyhow!("unexpected server URL {server_url:?}"))?;
        Ok(Self { process, address })
    }

    /// SIGTERM, then SIGKILL if it has not stopped in time.
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
    }
}

async fn read_ready_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    log_path: &Path,
) -> anyhow::Result<String> {
    while let Some(line) = lines.next_line().await? {
        append_line(log_path, &line);
        if let Some(url) = line.trim().strip_prefix("READY ") {
            return Ok(url.trim().to_string());
        }
    }
    bail!("its output ended without a READY line")
}

fn append_line(path: &Path, line: &str) {
    if let Ok(mut file) = OpenOptions::new().append(true).open(path) {
        let _ = writeln!(file, "{line}");
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
