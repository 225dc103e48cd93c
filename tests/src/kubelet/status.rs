//! The pod status the kubelet reports, computed from what it knows about the containers.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub(crate) const HOST_IP: &str = "127.0.0.1";

/// Conditions this kubelet owns; any other (PodScheduled, DisruptionTarget…) is kept as is.
const OWN_CONDITIONS: [&str; 4] = [
    "PodReadyToStartContainers",
    "Initialized",
    "ContainersReady",
    "Ready",
];

/// What the kubelet knows about one container.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ContainerRecord {
    pub(crate) name: String,
    pub(crate) image: String,
    pub(crate) state: ContainerState,
    pub(crate) last_state: Option<ContainerState>,
    pub(crate) restart_count: i32,
    pub(crate) ready: bool,
    pub(crate) started: bool,
    pub(crate) container_id: Option<String>,
    /// Terminated and not going to be restarted.
    pub(crate) finished: bool,
}

impl ContainerRecord {
    pub(crate) fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            state: waiting("ContainerCreating", None),
            last_state: None,
            restart_count: 0,
            ready: false,
            started: false,
            container_id: None,
            finished: false,
        }
    }

    /// Never ran yet: the pod is still Pending because of it.
    fn never_ran(&self) -> bool {
        self.state.waiting.is_some() && self.last_state.is_none() && self.restart_count == 0
    }

    fn status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: String::new(),
            container_id: self.container_id.clone(),
            ready: self.ready,
            restart_count: self.restart_count,
            started: Some(self.started),
            state: Some(self.state.clone()),
            last_state: Some(self.last_state.clone().unwrap_or_default()),
            ..ContainerStatus::default()
        }
    }
}

/// The current time to the second, as the API stores it, so that what the kubelet wrote and
/// what the API shows compare equal.
pub(crate) fn now() -> Timestamp {
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// The part of a pod's status this kubelet writes.
pub(crate) fn written_part(status: &PodStatus) -> PodStatus {
    PodStatus {
        phase: status.phase.clone(),
        conditions: status.conditions.clone(),
        host_ip: status.host_ip.clone(),
        host_ips: status.host_ips.clone(),
        pod_ip: status.pod_ip.clone(),
        pod_ips: status.pod_ips.clone(),
        start_time: status.start_time.clone(),
        container_statuses: status.container_statuses.clone(),
        ..PodStatus::default()
    }
}

pub(crate) fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_string()),
            message,
        }),
        ..ContainerState::default()
    }
}

/// Pending while a container has not started yet, Running while any runs or will restart,
/// then Failed if any container failed, else Succeeded.
pub(crate) fn phase(containers: &[ContainerRecord]) -> &'static str {
    if containers.is_empty() || containers.iter().any(ContainerRecord::never_ran) {
        "Pending"
    } else if containers.iter().any(|container| !container.finished) {
        "Running"
    } else if containers.iter().any(|container| {
        container
            .state
            .terminated
            .as_ref()
            .is_some_and(|terminated| terminated.exit_code != 0)
    }) {
        "Failed"
    } else {
        "Succeeded"
    }
}

/// The inputs of a pod's status.
pub(crate) struct PodView<'a> {
    pub(crate) pod: &'a Pod,
    pub(crate) pod_ip: Option<&'a str>,
    pub(crate) start_time: Option<&'a Time>,
    pub(crate) containers: &'a [ContainerRecord],
    /// The status last written, whose conditions keep their transition times.
    pub(crate) previous: Option<&'a PodStatus>,
}

pub(crate) fn pod_status(view: &PodView, now: Timestamp) -> PodStatus {
    let phase = phase(view.containers);
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let unready: Vec<&str> = view
        .containers
        .iter()
        .filter(|container| !container.ready)
        .map(|container| container.name.as_str())
        .collect();
    let unready_reason = if terminal {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let unready_message = format!("containers with unready status: [{}]", unready.join(" "));
    let ready = unready.is_empty() && phase == "Running";
    let own = [
        (
            "PodReadyToStartContainers",
            view.pod_ip.is_some() && !terminal,
            None,
        ),
        ("Initialized", true, None),
        (
            "ContainersReady",
            unready.is_empty(),
            Some((unready_reason, &unready_message)),
        ),
        ("Ready", ready, Some((unready_reason, &unready_message))),
    ];
    let previous_conditions = view
        .previous
        .and_then(|status| status.conditions.as_deref())
        .unwrap_or_default();
    let mut conditions: Vec<PodCondition> = view
        .pod
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|condition| !OWN_CONDITIONS.contains(&condition.type_.as_str()))
        .cloned()
        .collect();
    for (type_, value, why_not) in own {
        let status = if value { "True" } else { "False" };
        let since = previous_conditions
            .iter()
            .find(|condition| condition.type_ == type_ && condition.status == status)
            .and_then(|condition| condition.last_transition_time.clone())
            .unwrap_or(Time(now));
        let (reason, message) = match why_not.filter(|_| !value) {
            Some((reason, message)) => (Some(reason.to_string()), Some(message.clone())),
            None => (None, None),
        };
        conditions.push(PodCondition {
            type_: type_.to_string(),
            status: status.to_string(),
            last_transition_time: Some(since),
            reason,
            message,
            ..PodCondition::default()
        });
    }
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        host_ip: Some(HOST_IP.to_string()),
        host_ips: Some(vec![HostIP {
            ip: HOST_IP.to_string(),
        }]),
        pod_ip: view.pod_ip.map(str::to_string),
        pod_ips: view.pod_ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
        start_time: view.start_time.cloned(),
        container_statuses: Some(
            view.containers
                .iter()
                .map(ContainerRecord::status)
                .collect(),
        ),
        ..PodStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStateTerminated};

    use super::*;

    fn running(name: &str, ready: bool) -> ContainerRecord {
        ContainerRecord {
            state: ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            },
            ready,
            started: true,
            ..ContainerRecord::new(name, "img")
        }
    }

    fn finished(name: &str, exit_code: i32) -> ContainerRecord {
        ContainerRecord {
            state: ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            },
            finished: true,
            ..ContainerRecord::new(name, "img")
        }
    }

    fn crash_looping(name: &str) -> ContainerRecord {
        ContainerRecord {
            state: waiting("CrashLoopBackOff", None),
            last_state: finished(name, 1).state.into(),
            restart_count: 1,
            ..ContainerRecord::new(name, "img")
        }
    }

    #[test]
    fn phases() {
        assert_eq!(phase(&[]), "Pending");
        assert_eq!(
            phase(&[ContainerRecord::new("a", "i"), running("b", true)]),
            "Pending"
        );
        assert_eq!(phase(&[running("a", false), finished("b", 0)]), "Running");
        assert_eq!(phase(&[crash_looping("a")]), "Running");
        assert_eq!(phase(&[finished("a", 0), finished("b", 0)]), "Succeeded");
        assert_eq!(phase(&[finished("a", 0), finished("b", 137)]), "Failed");
    }

    fn conditions(status: &PodStatus) -> Vec<(String, String)> {
        status
            .conditions
            .iter()
            .flatten()
            .map(|condition| (condition.type_.clone(), condition.status.clone()))
            .collect()
    }

    #[test]
    fn ready_only_when_every_container_is_and_scheduling_condition_is_kept() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False"},
            ]},
        }))
        .unwrap();
        let containers = [running("a", true), running("b", false)];
        let view = PodView {
            pod: &pod,
            pod_ip: Some("198.18.0.2"),
            start_time: None,
            containers: &containers,
            previous: None,
        };
        let status = pod_status(&view, Timestamp::UNIX_EPOCH);
        assert_eq!(
            conditions(&status),
            [
                ("PodScheduled", "True"),
                ("PodReadyToStartContainers", "True"),
                ("Initialized", "True"),
                ("ContainersReady", "False"),
                ("Ready", "False"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let ready = status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [b]")
        );
        assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, "198.18.0.2");

        // Transition times survive while a condition keeps its status.
        let containers = [running("a", true), running("b", true)];
        let later = Timestamp::from_second(100).unwrap();
        let view = PodView {
            containers: &containers,
            previous: Some(&status),
            ..view
        };
        let next = pod_status(&view, later);
        let time_of = |status: &PodStatus, type_: &str| {
            status
                .conditions
                .as_ref()
                .unwrap()
                .iter()
                .find(|c| c.type_ == type_)
                .unwrap()
                .last_transition_time
                .clone()
        };
        assert_eq!(
            time_of(&next, "Initialized"),
            Some(Time(Timestamp::UNIX_EPOCH))
        );
        assert_eq!(time_of(&next, "Ready"), Some(Time(later)));
    }
}
