//! One container's life: start its process, probe it, restart it per the pod's
//! `restartPolicy` with exponential back-off, stop it with a grace period.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, Probe,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::process::Child;
use tokio::sync::{Notify, watch};

use super::Shared;
use super::probes::{Threshold, initial_delay, period, probe_once};
use super::process::{self, Launch};
use super::status::{ContainerRecord, now, waiting};
use crate::child::signal_group;

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// A container that ran this long before exiting restarts without back-off history.
const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// Everything a container's supervisor needs; the pod worker reads `records`.
pub(crate) struct ContainerRun {
    pub(crate) shared: Arc<Shared>,
    pub(crate) namespace: String,
    pub(crate) pod: String,
    pub(crate) index: usize,
    pub(crate) container: Container,
    pub(crate) launch: Launch,
    pub(crate) restart_policy: String,
    pub(crate) pod_ip: String,
    pub(crate) records: Arc<Mutex<Vec<ContainerRecord>>>,
    pub(crate) changed: Arc<Notify>,
    /// Set to the grace period when the container must stop.
    pub(crate) stop: watch::Receiver<Option<Duration>>,
}

struct Exit {
    terminated: ContainerStateTerminated,
    /// Ended because the kubelet stopped it, not by itself.
    stopped: bool,
}

impl ContainerRun {
    pub(crate) async fn run(mut self) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let started_at = now();
            let exit = match process::spawn(&self.launch) {
                Ok(child) => self.supervise(child, started_at).await,
                Err(error) => Exit {
                    terminated: ContainerStateTerminated {
                        exit_code: 128,
                        reason: Some("StartError".into()),
                        message: Some(format!(
                            "starting {}: {error}",
                            self.launch.program.display()
                        )),
                        started_at: Some(Time(started_at)),
                        finished_at: Some(Time(now())),
                        ..ContainerStateTerminated::default()
                    },
                    stopped: false,
                },
            };
            let terminated = ContainerState {
                terminated: Some(exit.terminated.clone()),
                ..ContainerState::default()
            };
            let restarts = match self.restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => exit.terminated.exit_code != 0,
                _ => true,
            };
            if exit.stopped || !restarts {
                self.update(|record| {
                    record.state = terminated;
                    record.ready = false;
                    record.finished = true;
                });
                return;
            }
            let ran_for = now().duration_since(started_at).unsigned_abs();
            if ran_for >= BACKOFF_RESET {
                backoff = INITIAL_BACKOFF;
            }
            let message = format!(
                "back-off {backoff:?} restarting failed container {}",
                self.container.name
            );
            self.update(|record| {
                record.state = waiting("CrashLoopBackOff", Some(message));
                record.last_state = Some(terminated.clone());
                record.ready = false;
            });
            let stopped = tokio::select! {
                _ = tokio::time::sleep(backoff) => false,
                _ = self.stop.wait_for(Option::is_some) => true,
            };
            if stopped {
                self.update(|record| {
                    record.state = terminated;
                    record.finished = true;
                });
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            self.update(|record| record.restart_count += 1);
        }
    }

    fn update(&self, change: impl FnOnce(&mut ContainerRecord)) {
        let mut records = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        change(&mut records[self.index]);
        drop(records);
        self.changed.notify_one();
    }

    /// Runs the process until it exits or must stop.
    async fn supervise(&self, mut child: Child, started_at: Timestamp) -> Exit {
        let pid = child
            .id()
            .expect("a process that was just spawned has an id");
        let name = self.container.name.clone();
        let container_id = format!("atelier://{pid}");
        self.shared
            .processes
            .insert(&self.namespace, &self.pod, &name, pid);
        tracing::debug!(
            log = %self.launch.log_path.display(),
            "started container {}/{}/{name} (pid {pid})", self.namespace, self.pod
        );
        let has_readiness_probe = self.container.readiness_probe.is_some();
        self.update(|record| {
            record.state = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(started_at)),
                }),
                ..ContainerState::default()
            };
            record.started = true;
            record.ready = !has_readiness_probe;
            record.container_id = Some(container_id.clone());
        });
        let mut stop = self.stop.clone();
        let ended = tokio::select! {
            status = child.wait() => Ok(status),
            grace = stop.wait_for(Option::is_some) => Err(grace.ok().and_then(|grace| *grace).unwrap_or_default()),
            () = self.probe(pid) => unreachable!("probing never ends"),
        };
        let (status, stopped) = match ended {
            Ok(status) => (status, false),
            Err(grace) => (terminate(&mut child, pid, grace).await, true),
        };
        // The process group may outlive its leader (a shell's children): end it too.
        let _ = signal_group(pid, libc::SIGKILL);
        self.shared
            .processes
            .remove(&self.namespace, &self.pod, &name);
        let (exit_code, signal) = match &status {
            Ok(status) => exit_code(status),
            Err(_) => (128, None),
        };
        Exit {
            terminated: ContainerStateTerminated {
                exit_code,
                signal,
                reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
                message: status.err().map(|error| error.to_string()),
                started_at: Some(Time(started_at)),
                finished_at: Some(Time(now())),
                container_id: Some(container_id),
            },
            stopped,
        }
    }

    /// Readiness sets the container's `ready`; a failed liveness probe kills the process,
    /// which then restarts per policy. Never returns.
    async fn probe(&self, pid: u32) {
        let readiness = async {
            if let Some(probe) = &self.container.readiness_probe {
                self.run_probe(probe, false, |ready| {
                    self.update(|record| record.ready = ready)
                })
                .await;
            }
        };
        let liveness = async {
            if let Some(probe) = &self.container.liveness_probe {
                self.run_probe(probe, true, |alive| {
                    if !alive {
                        tracing::info!(
                            "liveness probe of {}/{}/{} failed: killing it",
                            self.namespace,
                            self.pod,
                            self.container.name
                        );
                        let _ = signal_group(pid, libc::SIGKILL);
                    }
                })
                .await;
            }
        };
        futures::join!(readiness, liveness);
        std::future::pending().await
    }

    async fn run_probe(
        &self,
        probe: &Probe,
        initially_passing: bool,
        mut on_change: impl FnMut(bool),
    ) {
        tokio::time::sleep(initial_delay(probe)).await;
        let mut threshold = Threshold::new(probe, initially_passing);
        let mut interval = tokio::time::interval(period(probe));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ports = self.container.ports.clone().unwrap_or_default();
        loop {
            interval.tick().await;
            let result = probe_once(&self.shared.http, probe, &self.pod_ip, &ports).await;
            if let Err(error) = &result {
                tracing::debug!(
                    "probe of {}/{}/{}: {error}",
                    self.namespace,
                    self.pod,
                    self.container.name
                );
            }
            if let Some(passing) = threshold.observe(result.is_ok()) {
                on_change(passing);
            }
        }
    }
}

/// SIGTERM to the process group, SIGKILL after `grace`.
async fn terminate(child: &mut Child, pid: u32, grace: Duration) -> std::io::Result<ExitStatus> {
    let _ = signal_group(pid, libc::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = signal_group(pid, libc::SIGKILL);
            child.wait().await
        }
    }
}

/// The exit code Kubernetes reports (128 + signal for a killed process) and the signal.
fn exit_code(status: &ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(signal)) => (128 + signal, Some(signal)),
        (None, None) => (128, None),
    }
}
