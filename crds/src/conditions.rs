//! Status conditions shared by both resources, in the shape of `metav1.Condition`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const ADMITTED: &str = "Admitted";
pub const COMPLETE: &str = "Complete";

/// Sets `kind` to the given status, keeping `lastTransitionTime` when the status does not change
/// so that clients can tell how long a condition has held. Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: &Time,
) -> bool {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(existing) => {
            let unchanged = existing.status == status
                && existing.reason == reason
                && existing.message == message
                && existing.observed_generation == observed_generation;
            if unchanged {
                return false;
            }
            if existing.status != status {
                existing.last_transition_time = now.clone();
            }
            existing.status = status;
            existing.reason = reason.to_string();
            existing.message = message;
            existing.observed_generation = observed_generation;
            true
        }
        None => {
            conditions.push(Condition {
                type_: kind.to_string(),
                status,
                reason: reason.to_string(),
                message,
                observed_generation,
                last_transition_time: now.clone(),
            });
            true
        }
    }
}

/// Whether condition `kind` is present and `True`.
pub fn is_true(conditions: &[Condition], kind: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == kind && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conditions = Vec::new();
        assert!(set_condition(
            &mut conditions,
            READY,
            false,
            "Creating",
            "wait",
            Some(1),
            &at(10)
        ));
        assert!(set_condition(
            &mut conditions,
            READY,
            false,
            "Scaling",
            "still",
            Some(1),
            &at(20)
        ));
        assert_eq!(conditions[0].last_transition_time, at(10));
        assert!(set_condition(
            &mut conditions,
            READY,
            true,
            "Ready",
            "ok",
            Some(1),
            &at(30)
        ));
        assert_eq!(conditions[0].last_transition_time, at(30));
        assert!(!set_condition(
            &mut conditions,
            READY,
            true,
            "Ready",
            "ok",
            Some(1),
            &at(40)
        ));
        assert!(is_true(&conditions, READY));
        assert!(!is_true(&conditions, DEGRADED));
    }
}
