//! Server-side apply that stays silent in the steady state: an object is patched only when it is
//! missing or when a field we set differs from the live object. Fields the API server or other
//! controllers add are left alone, and nothing is written when everything is as desired.

use std::fmt::Debug;

use atelier_crds::names::FIELD_MANAGER;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Created,
    /// The object existed but had drifted from the desired state.
    Repaired,
}

/// Makes the live object match `desired` on every field `desired` sets.
pub async fn ensure<K>(api: &Api<K>, desired: &K) -> kube::Result<Applied>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let live = api.get_opt(&name).await?;
    let desired_json = serde_json::to_value(desired).map_err(kube::Error::SerdeError)?;
    if let Some(live) = &live {
        let live_json = serde_json::to_value(live).map_err(kube::Error::SerdeError)?;
        if is_subset(&desired_json, &live_json) {
            return Ok(Applied::Unchanged);
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&desired_json),
    )
    .await?;
    Ok(if live.is_some() {
        Applied::Repaired
    } else {
        Applied::Created
    })
}

/// Whether every field of `desired` is present in `live` with the same value. Lists must match
/// element by element; quantities compare by value (`1000m` equals `1`).
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => want.iter().all(|(key, value)| {
            value.is_null() || have.get(key).is_some_and(|live| is_subset(value, live))
        }),
        (Value::Array(want), Value::Array(have)) => {
            want.len() == have.len() && want.iter().zip(have).all(|(w, h)| is_subset(w, h))
        }
        (Value::String(want), Value::String(have)) => {
            want == have
                || matches!((quantity_millis(want), quantity_millis(have)), (Some(a), Some(b)) if a == b)
        }
        (Value::Number(want), Value::Number(have)) => want.as_f64() == have.as_f64(),
        (want, have) => want == have,
    }
}

/// The value of a Kubernetes quantity in thousandths, for the forms the operator writes.
fn quantity_millis(text: &str) -> Option<u128> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: u128 = number.parse().ok()?;
    let factor: u128 = match suffix {
        "m" => 1,
        "" => 1000,
        "k" => 1000 * 1_000,
        "M" => 1000 * 1_000_000,
        "G" => 1000 * 1_000_000_000,
        "Ki" => 1000 << 10,
        "Mi" => 1000 << 20,
        "Gi" => 1000 << 30,
        "Ti" => 1000 << 40,
        _ => return None,
    };
    Some(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_live_fields_are_fine_but_differences_are_not() {
        let desired = json!({ "spec": { "replicas": 1, "ports": [{ "port": 8080 }] } });
        let live = json!({ "spec": { "replicas": 1, "ports": [{ "port": 8080, "protocol": "TCP" }], "revisionHistoryLimit": 10 } });
        assert!(is_subset(&desired, &live));
        let drifted = json!({ "spec": { "replicas": 3, "ports": [{ "port": 8080 }] } });
        assert!(!is_subset(&desired, &drifted));
    }

    #[test]
    fn removed_list_items_count_as_drift() {
        let desired = json!({ "env": [{ "name": "A" }] });
        assert!(!is_subset(&desired, &json!({ "env": [] })));
        assert!(!is_subset(&desired, &json!({})));
    }

    #[test]
    fn quantities_compare_by_value() {
        assert!(is_subset(
            &json!({ "cpu": "1000m" }),
            &json!({ "cpu": "1" })
        ));
        assert!(is_subset(
            &json!({ "memory": "1024Mi" }),
            &json!({ "memory": "1Gi" })
        ));
        assert!(!is_subset(&json!({ "cpu": "2" }), &json!({ "cpu": "1" })));
        assert!(!is_subset(
            &json!({ "name": "abc" }),
            &json!({ "name": "abd" })
        ));
    }
}
