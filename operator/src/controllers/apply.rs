//! Server-side apply that stays silent in the steady state: an object is patched only when it is
//! missing, when a field we set differs from the live object, or when what we want changed.
//! Fields the API server or other controllers add are left alone, and nothing is written when
//! everything is as desired.
//!
//! Each applied object carries a hash of the whole desired object in an annotation. A field we
//! stop setting (the last member of a RoleBinding, a nodeSelector) changes the hash, so the
//! object is applied again, and server-side apply removes the fields our field manager set
//! before and no longer does.

use std::fmt::Debug;

use atelier_crds::names::FIELD_MANAGER;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::core::quantity;

/// The annotation with the hash of the desired object last applied.
pub const DESIRED_HASH: &str = "atelier.dev/desired-hash";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Unchanged,
    Created,
    /// The object existed but had drifted from the desired state.
    Repaired,
    /// The object is no longer desired and was deleted.
    Pruned,
}

/// Makes the live object match `desired` on every field `desired` sets, and drops the fields
/// we set before and `desired` no longer does.
pub async fn ensure<K>(api: &Api<K>, desired: &K) -> kube::Result<Applied>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let live = api.get_opt(&name).await?;
    let desired_json = with_hash(serde_json::to_value(desired).map_err(kube::Error::SerdeError)?);
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

/// `desired` with the hash of itself in the `DESIRED_HASH` annotation.
fn with_hash(mut desired: Value) -> Value {
    let hash = format!("{:x}", Sha256::digest(desired.to_string()));
    let metadata = desired
        .as_object_mut()
        .expect("a Kubernetes object is a JSON object")
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    let annotations = metadata
        .as_object_mut()
        .expect("metadata is an object")
        .entry("annotations")
        .or_insert_with(|| Value::Object(Default::default()));
    annotations
        .as_object_mut()
        .expect("annotations are an object")
        .insert(DESIRED_HASH.to_string(), Value::String(hash));
    desired
}

/// Whether every field of `desired` is present in `live` with the same value. Lists must match
/// element by element (an empty list and a missing one are the same); quantities compare by
/// value (`1000m` equals `1`).
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => want.iter().all(|(key, value)| {
            let absent = value.is_null() || value.as_array().is_some_and(Vec::is_empty);
            match have.get(key) {
                Some(live) => is_subset(value, live),
                None => absent,
            }
        }),
        (Value::Array(want), Value::Array(have)) => {
            want.len() == have.len() && want.iter().zip(have).all(|(w, h)| is_subset(w, h))
        }
        (Value::String(want), Value::String(have)) => {
            want == have || quantity::same_amount(want, have)
        }
        (Value::Number(want), Value::Number(have)) => want.as_f64() == have.as_f64(),
        (want, have) => want == have,
    }
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
    fn a_field_no_longer_desired_changes_the_hash() {
        let live = with_hash(
            json!({ "metadata": { "name": "x" }, "spec": { "nodeSelector": { "gpu": "a100" } } }),
        );
        let cleared = with_hash(json!({ "metadata": { "name": "x" }, "spec": {} }));
        // Without the hash the cleared object is a subset of the live one, and nothing is applied.
        assert!(!is_subset(&cleared, &live));
        assert!(is_subset(&live, &live));
        assert!(is_subset(&json!({ "subjects": [] }), &json!({})));
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
        assert!(is_subset(
            &json!({ "cpu": "1.5" }),
            &json!({ "cpu": "1500m" })
        ));
        assert!(!is_subset(&json!({ "cpu": "2" }), &json!({ "cpu": "1" })));
        assert!(!is_subset(
            &json!({ "name": "abc" }),
            &json!({ "name": "abd" })
        ));
    }
}
