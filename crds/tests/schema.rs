//! The CRD schemas: committed YAML is current, schemas are structural, defaults and round trips.

use atelier_crds::{GenerationJob, GenerationJobSpec, JobPhase, Tenant, TenantSpec};
use kube::CustomResourceExt;
use serde_json::{Value, json};

#[test]
fn committed_crds_match_crdgen() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/atelier/crds");
    for crd in atelier_crds::all_crds() {
        let path = dir.join(atelier_crds::crd_file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == atelier_crds::crd_yaml(&crd),
            "{} is stale: run `make crds` and commit the result",
            path.display()
        );
    }
}

/// Every schema node says its type, or explicitly keeps unknown fields / is int-or-string, as the
/// API server requires of structural schemas.
fn assert_structural(path: &str, schema: &Value) {
    let object = schema
        .as_object()
        .unwrap_or_else(|| panic!("{path}: schema is not an object"));
    let typed = object.contains_key("type")
        || object.get("x-kubernetes-int-or-string") == Some(&json!(true))
        || object.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    assert!(typed, "{path} has no type: {schema}");
    for forbidden in ["$ref", "anyOf", "oneOf"] {
        if object.contains_key(forbidden) && !object.contains_key("x-kubernetes-int-or-string") {
            // anyOf/oneOf are allowed only as value validations beside a type.
            assert!(
                object.contains_key("type") || forbidden == "$ref",
                "{path} uses {forbidden} without a type"
            );
            assert_ne!(forbidden, "$ref", "{path} has an unresolved $ref");
        }
    }
    if let Some(Value::Object(properties)) = object.get("properties") {
        for (name, property) in properties {
            assert_structural(&format!("{path}.{name}"), property);
        }
    }
    if let Some(items) = object.get("items") {
        assert_structural(&format!("{path}[]"), items);
    }
    if let Some(Value::Object(_)) = object.get("additionalProperties") {
        assert_structural(&format!("{path}{{}}"), &object["additionalProperties"]);
    }
}

#[test]
fn schemas_are_structural() {
    for crd in atelier_crds::all_crds() {
        let crd = serde_json::to_value(&crd).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_structural(crd["metadata"]["name"].as_str().unwrap(), schema);
    }
}

#[test]
fn crds_have_status_short_names_and_columns() {
    let job = serde_json::to_value(GenerationJob::crd()).unwrap();
    assert_eq!(job["spec"]["names"]["shortNames"], json!(["gj"]));
    assert_eq!(job["spec"]["scope"], "Namespaced");
    let version = &job["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for column in ["Phase", "User", "Step", "Age"] {
        assert!(columns.contains(&column), "missing column {column}");
    }
    let tenant = serde_json::to_value(Tenant::crd()).unwrap();
    assert_eq!(tenant["spec"]["names"]["shortNames"], json!(["tn"]));
    assert_eq!(tenant["spec"]["scope"], "Cluster");
}

#[test]
fn job_defaults_match_what_a_user_expects() {
    let spec: GenerationJobSpec =
        serde_json::from_value(json!({ "prompt": "a fox", "user": "ann" })).unwrap();
    assert_eq!(
        (spec.width, spec.height, spec.steps, spec.num_images),
        (1024, 1024, 28, 1)
    );
    assert_eq!(spec.guidance, 3.5);
    assert!(!spec.cancel);
    // The same defaults are in the schema, so the API server fills them in too.
    let crd = serde_json::to_value(GenerationJob::crd()).unwrap();
    let properties = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    assert_eq!(properties["width"]["default"], 1024);
    assert_eq!(properties["steps"]["default"], 28);
    assert_eq!(properties["guidance"]["default"], 3.5);
    assert_eq!(properties["steps"]["maximum"], 100.0);
}

#[test]
fn cel_rules_are_in_the_schema() {
    let crd = serde_json::to_string(&GenerationJob::crd()).unwrap();
    for message in [
        "width must be a multiple of 16",
        "spec.user is immutable",
        "generation parameters are immutable",
    ] {
        assert!(crd.contains(message), "missing rule: {message}");
    }
    let tenant = serde_json::to_string(&Tenant::crd()).unwrap();
    assert!(tenant.contains("gpus.perReplica must not exceed gpus.max"));
}

#[test]
fn tenant_round_trips_and_fills_defaults() {
    let spec: TenantSpec = serde_json::from_value(json!({
        "members": [{ "group": "team-a", "role": "admin" }],
        "gpus": { "max": 2 },
        "inference": { "model": { "volumeName": "weights" }, "idleOffloadAfter": "2m" },
    }))
    .unwrap();
    assert_eq!(spec.gpus.resource_name, "nvidia.com/gpu");
    assert_eq!(spec.quota.images_per_user_per_day, 50);
    assert!(spec.storage.retain_on_delete);
    let tenant = Tenant::new("team-a", spec);
    assert_eq!(tenant.namespace_name(), "atelier-team-a");
    assert_eq!(tenant.replica_ceiling(), 2);
    let text = serde_yaml::to_string(&tenant).unwrap();
    let back: Tenant = serde_yaml::from_str(&text).unwrap();
    assert_eq!(back, tenant);
}

#[test]
fn job_status_round_trips() {
    let mut job = GenerationJob::new(
        "gen-1",
        serde_json::from_value(json!({ "prompt": "p", "user": "u" })).unwrap(),
    );
    job.status = Some(serde_json::from_value(json!({
        "phase": "Succeeded", "attempts": 1, "seed": 7,
        "progress": { "step": 28, "totalSteps": 28 },
        "outputs": [{ "path": "/outputs/u/x.png", "sha256": "ab", "width": 1024, "height": 1024, "bytes": 10 }],
    }))
    .unwrap());
    assert_eq!(job.phase(), JobPhase::Succeeded);
    assert!(job.phase().is_finished());
    let back: GenerationJob = serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
    assert_eq!(back, job);
}
