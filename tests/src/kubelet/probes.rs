//! Readiness and liveness probes (httpGet and tcpSocket on the pod IP; exec and gRPC probes
//! are not run and count as passing).

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::TcpStream;

/// Turns single probe results into a state change after `successThreshold` successes or
/// `failureThreshold` failures in a row.
pub(crate) struct Threshold {
    success_threshold: u32,
    failure_threshold: u32,
    passing: bool,
    streak: u32,
}

impl Threshold {
    pub(crate) fn new(probe: &Probe, initially_passing: bool) -> Self {
        Self {
            success_threshold: positive(probe.success_threshold, 1),
            failure_threshold: positive(probe.failure_threshold, 3),
            passing: initially_passing,
            streak: 0,
        }
    }

    /// Records a result; returns the new state when it changes.
    pub(crate) fn observe(&mut self, success: bool) -> Option<bool> {
        if success == self.passing {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if success {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if self.streak < needed {
            return None;
        }
        self.passing = success;
        self.streak = 0;
        Some(success)
    }
}

fn positive(value: Option<i32>, default: u32) -> u32 {
    value
        .and_then(|value| u32::try_from(value).ok())
        .filter(|value| *value > 0)
        .unwrap_or(default)
}

pub(crate) fn initial_delay(probe: &Probe) -> Duration {
    Duration::from_secs(positive(probe.initial_delay_seconds, 0).into())
}

pub(crate) fn period(probe: &Probe) -> Duration {
    Duration::from_secs(positive(probe.period_seconds, 10).into())
}

/// One probe attempt against the container at `pod_ip`.
pub(crate) async fn probe_once(
    http: &reqwest::Client,
    probe: &Probe,
    pod_ip: &str,
    ports: &[ContainerPort],
) -> Result<(), String> {
    let timeout = Duration::from_secs(positive(probe.timeout_seconds, 1).into());
    if let Some(action) = &probe.http_get {
        let port = resolve_port(&action.port, ports)?;
        let scheme = action
            .scheme
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_lowercase();
        let host = action
            .host
            .as_deref()
            .filter(|host| !host.is_empty())
            .unwrap_or(pod_ip);
        let path = action.path.as_deref().unwrap_or("/");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let mut request = http
            .get(format!("{scheme}://{host}:{port}{path}"))
            .timeout(timeout);
        for header in action.http_headers.iter().flatten() {
            request = request.header(&header.name, &header.value);
        }
        let response = request.send().await.map_err(|error| error.to_string())?;
        let status = response.status();
        return if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!(
                "HTTP probe failed with statuscode: {}",
                status.as_u16()
            ))
        };
    }
    if let Some(action) = &probe.tcp_socket {
        let port = resolve_port(&action.port, ports)?;
        let host = action
            .host
            .as_deref()
            .filter(|host| !host.is_empty())
            .unwrap_or(pod_ip);
        return match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("dial tcp {host}:{port}: timeout")),
        };
    }
    Ok(())
}

/// A numeric port, or the container port of that name.
fn resolve_port(port: &IntOrString, ports: &[ContainerPort]) -> Result<u16, String> {
    let number = match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(name) => match name.parse() {
            Ok(number) => number,
            Err(_) => ports
                .iter()
                .find(|port| port.name.as_deref() == Some(name))
                .map(|port| port.container_port)
                .ok_or_else(|| format!("no container port named {name:?}"))?,
        },
    };
    u16::try_from(number).map_err(|_| format!("invalid port {number}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(success_threshold: i32, failure_threshold: i32) -> Probe {
        Probe {
            success_threshold: Some(success_threshold),
            failure_threshold: Some(failure_threshold),
            ..Probe::default()
        }
    }

    #[test]
    fn state_changes_after_enough_results_in_a_row() {
        let mut readiness = Threshold::new(&probe(2, 3), false);
        assert_eq!(readiness.observe(true), None);
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(true), None);
        assert_eq!(readiness.observe(true), Some(true));
        assert_eq!(readiness.observe(true), None);
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(false), None);
        assert_eq!(readiness.observe(false), Some(false));
    }

    #[test]
    fn defaults_apply_to_unset_and_invalid_values() {
        let mut liveness = Threshold::new(&Probe::default(), true);
        assert_eq!(liveness.observe(false), None);
        assert_eq!(liveness.observe(false), None);
        assert_eq!(liveness.observe(false), Some(false));
        assert_eq!(
            period(&Probe {
                period_seconds: Some(0),
                ..Probe::default()
            }),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn named_ports_resolve_through_the_container_ports() {
        let ports = [ContainerPort {
            name: Some("http".into()),
            container_port: 8080,
            ..ContainerPort::default()
        }];
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &ports),
            Ok(8080)
        );
        assert_eq!(resolve_port(&IntOrString::Int(9000), &ports), Ok(9000));
        assert!(resolve_port(&IntOrString::String("grpc".into()), &ports).is_err());
    }
}
